"""Atomic file writes: write a temp file next to the target, fsync, then rename.

A crash or a full disk midway leaves the old file (or none), never half a file. The new file gets the
permissions an ordinary ``open()`` would give it (or keeps the old file's): ``mkstemp``'s private 0600
would hide an export from ComfyUI or A1111 running as another user or in a container.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from trainer.errors import WriteError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}; check that the folder exists and is writable") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, file_mode_for(path))
        os.replace(tmp_path, path)
    except OSError as err:
        raise WriteError(f"writing {path.name} failed ({err.strerror or err}); {what_to_do(err, path.parent)}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def what_to_do(err: OSError, folder: Path) -> str:
    """The advice after a failed write: permissions for a refusal, else space (what a failed write mostly is)."""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"check that {folder} is writable. Nothing half-written was left behind"
    return "the disk may be full. Nothing half-written was left behind; free space and try again"


def file_mode_for(path: Path) -> int:
    """The old file's permissions, else 0666 less the process umask (what ``open(path, "w")`` gives)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The umask, read without setting it (``os.umask`` can only be read by changing it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")  # the same bytes on every system


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def same_file_as(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``dst`` holding what ``src`` holds now, under its own name: a hard link (no second copy on disk), or a
    copy where the file system has no links. Kept while it still is ``src`` (same inode, or a copy of the same
    size and time); ``src`` replaced since (a writer renames a new file over it) makes it again."""
    src, dst = Path(src), Path(dst)
    try:
        if os.path.samefile(src, dst):
            return dst
        a, b = src.stat(), dst.stat()
        if (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns):
            return dst
    except OSError:
        pass  # no dst yet
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.link")
    try:  # linked under a temp name, then renamed over dst: a reader sees the old file or the new one
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        with atomic_path(dst) as copy:  # no links here (or src vanished: copy2 then says so)
            shutil.copy2(src, copy)
    return dst


def copy_new(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst``, which must not exist yet: never replaces a file, and a failure midway (a full
    disk) leaves no part of the copy under ``dst``'s name.

    Raises:
        FileExistsError: ``dst`` exists (a file someone else put there first).
        WriteError: the copy failed; nothing was left behind.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        tmp.unlink(missing_ok=True)  # left by a crash of a process with the same pid
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.chmod(tmp, file_mode_for(dst))
        try:  # a link fails where dst appeared meanwhile, where a rename would replace it
            os.link(tmp, dst)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: the check above is what guards dst
            os.replace(tmp, dst)
    except FileExistsError:
        raise
    except OSError as err:
        raise WriteError(f"copying to {dst.name} failed ({err.strerror or err}); {what_to_do(err, dst.parent)}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically, in the format its name ends with (``.png``, ``.jpg``, ``.webp`` …).

    Raises:
        WriteError: the name ends in no image type PIL writes, or the write failed (nothing half-written is left).
    """
    from PIL import Image

    path = Path(path)
    kind = Image.registered_extensions().get(path.suffix.lower())
    if kind is None or kind not in Image.SAVE:
        raise WriteError(f"{path.name}: not an image type that can be written; end the name with .png, .jpg or .webp")
    with atomic_path(path) as tmp:
        image.save(tmp, format=kind)
    return path
