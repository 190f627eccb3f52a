"""Small, torch-free file helpers shared by the trainer, the mixer and the web app."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when ``path`` (after resolving links and ``..``) lies inside ``root``."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file, read in chunks (base checkpoints can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def newest_first(paths: Iterable[Path]) -> list[Path]:
    """``paths`` by modification time, newest first; one removed while listing (a run being deleted) goes last."""
    def mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    return sorted(paths, key=mtime, reverse=True)
