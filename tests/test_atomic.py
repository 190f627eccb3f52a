"""Atomic writes leave ordinary files: readable by the other tools an artist loads exports with."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from captioning.folder import write_caption
from trainer.atomic import atomic_path, write_text


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
