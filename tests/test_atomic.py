"""Atomic writes leave ordinary files: readable by the other tools an artist loads exports with."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioning.folder import write_caption
from trainer.atomic import atomic_path, copy_new, same_file_as, write_bytes, write_text
from trainer.errors import WriteError


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("write", ["text", "safetensors", "caption"])
def test_a_new_file_gets_the_permissions_open_would_give_it(tmp_path, write):
    path = tmp_path / {"text": "config.yaml", "safetensors": "lora.safetensors", "caption": "a.txt"}[write]
    if write == "text":
        write_text(path, "rank: 8\n")
    elif write == "caption":
        write_caption(path, "zkstyle, a red circle")
    else:
        with atomic_path(path) as tmp:  # what trainer/export.py does
            save_file({"w": torch.ones(2)}, str(tmp))
        assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    assert mode(path) == 0o666 & ~umask()  # not mkstemp's private 0600
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_rewriting_a_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "studio.json"
    write_text(path, "{}")
    os.chmod(path, 0o640)
    write_text(path, '{"trigger": "zkstyle"}')
    assert mode(path) == 0o640 and path.read_text() == '{"trigger": "zkstyle"}'


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links-here"])
def test_same_file_as_follows_a_file_that_is_replaced(tmp_path, monkeypatch, links):
    """A download name for a file training rewrites: a hard link (or a copy where the file system has none),
    made again only when the source was replaced, never touching the source's permissions."""
    if not links:
        def refuse(src, dst):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", refuse)
    src, dst = tmp_path / "lora.safetensors", tmp_path / "export" / "final" / "r1.safetensors"
    write_bytes(src, b"first")
    os.chmod(src, 0o640)
    assert same_file_as(src, dst) == dst and dst.read_bytes() == b"first"
    assert os.path.samefile(src, dst) == links and mode(src) == 0o640
    made = dst.stat().st_ino
    assert same_file_as(src, dst).stat().st_ino == made  # unchanged source: kept as it is
    write_bytes(src, b"second!")
    assert same_file_as(src, dst).read_bytes() == b"second!" and dst.stat().st_ino != made
    assert sorted(p.name for p in dst.parent.iterdir()) == ["r1.safetensors"]  # no temp names left behind


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links-here"])
def test_copy_new_never_replaces_a_file_nor_leaves_half_a_copy(tmp_path, monkeypatch, links):
    if not links:
        def refuse(src, dst):
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", refuse)
    src = tmp_path / "upload.bin"
    src.write_bytes(b"x" * 3_000_000)
    dst = tmp_path / "dataset" / "a.png"
    dst.parent.mkdir()
    assert copy_new(src, dst).read_bytes() == src.read_bytes() and mode(dst) == 0o666 & ~umask()
    with pytest.raises(FileExistsError):
        copy_new(tmp_path / "upload.bin", dst)
    assert dst.read_bytes() == src.read_bytes()

    def disk_full(fin, fout, length=0):
        fout.write(fin.read(50))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copyfileobj", disk_full)
    with pytest.raises(WriteError, match=r"copying to b.png failed \(No space left on device\); the disk may be full"):
        copy_new(src, dst.with_name("b.png"))
    assert sorted(p.name for p in dst.parent.iterdir()) == ["a.png"]  # no b.png, no temp file


@pytest.mark.parametrize("error, advice", [
    (OSError(28, "No space left on device"), "the disk may be full. Nothing half-written was left behind; free "
                                              "space and try again"),
    (PermissionError(13, "Permission denied"), "check that {folder} is writable. Nothing half-written was left "
                                               "behind"),
    (OSError(30, "Read-only file system"), "check that {folder} is writable. Nothing half-written was left behind"),
])
def test_a_failed_write_says_what_to_do_about_its_cause(tmp_path, monkeypatch, error, advice):
    """A full disk asks for space; a refusal names the folder to fix, not a disk that has room."""
    def refuse(src, dst):
        raise error

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteError) as caught:
        write_text(tmp_path / "config.yaml", "rank: 8\n")
    assert str(caught.value) == f"writing config.yaml failed ({error.strerror}); " + advice.format(folder=tmp_path)
    assert list(tmp_path.iterdir()) == []
