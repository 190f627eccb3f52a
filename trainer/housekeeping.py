"""What a run folder holds on disk, and giving space back: its earlier checkpoints, or the whole run.

No torch here: the web app asks for every run it shows. Whether a run may be touched (it is not training,
not queued) is the caller's to check: the queue knows that, this module only knows files.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoint import checkpoint_dirs, checkpoint_step
from trainer.errors import UserError

# top-level entries of a run folder, by what an artist calls them (anything else counts as "other")
_KINDS = {"checkpoints": "checkpoints", "samples": "samples", "export": "exports", "dataset": "dataset",
          "thumbs": "dataset", "removed": "dataset"}
_EXPORT_SUFFIXES = (".safetensors", ".zip")  # lora.safetensors, lora_diffusers.safetensors, <run>_a1111.zip


@dataclass(frozen=True)
class RunUsage:
    """Bytes a run folder takes, by kind."""

    checkpoints: int = 0
    checkpoint_count: int = 0
    samples: int = 0
    exports: int = 0
    dataset: int = 0
    other: int = 0  # events, config, caches

    @property
    def total(self) -> int:
        return self.checkpoints + self.samples + self.exports + self.dataset + self.other


def _size(path: Path, seen: set[tuple[int, int]]) -> int:
    """Bytes under ``path`` (a file or a folder; links not followed), each file counted once across calls
    sharing ``seen``: the Export tab's downloads are hard links to the exports, which take no second copy."""
    total = 0
    files = [str(path)] if not path.is_dir() or path.is_symlink() else \
        [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    for name in files:
        try:
            st = os.lstat(name)
        except OSError:  # removed meanwhile (a checkpoint rotated away)
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def run_usage(run_dir: str | Path) -> RunUsage:
    """What ``run_dir`` takes on disk, by kind."""
    run_dir = Path(run_dir)
    sizes = dict.fromkeys(("checkpoints", "samples", "exports", "dataset", "other"), 0)
    if not run_dir.is_dir():
        return RunUsage()
    seen: set[tuple[int, int]] = set()
    for entry in sorted(run_dir.iterdir(), key=lambda e: e.is_dir()):  # the run's own files before its links
        if entry.is_dir() and not entry.is_symlink():
            kind = _KINDS.get(entry.name, "other")
        else:
            kind = "exports" if entry.suffix in _EXPORT_SUFFIXES else "other"
        sizes[kind] += _size(entry, seen)
    return RunUsage(checkpoint_count=len(checkpoint_dirs(run_dir)), **sizes)


def prune_checkpoints(run_dir: str | Path, keep: int = 1) -> tuple[list[int], int]:
    """Delete all but the last ``keep`` checkpoints (the last one lets the run train on); returns the steps
    deleted and the bytes given back. Exported steps (``export/<run>-stepN.safetensors``) are files of
    their own and stay."""
    if keep < 1:
        raise UserError("keep at least the last checkpoint: a run without one cannot train on")
    doomed, freed = prunable(run_dir, keep)
    deleted = []
    for path in doomed:
        try:
            shutil.rmtree(path)
        except OSError as err:
            raise UserError(f"could not delete checkpoint {path.name} ({err.strerror or err}); "
                            + (f"step {', '.join(map(str, deleted))} went before it" if deleted else "none went")) from None
        deleted.append(checkpoint_step(path))
    return deleted, freed


def prunable(run_dir: str | Path, keep: int = 1) -> tuple[list[Path], int]:
    """The checkpoints :func:`prune_checkpoints` would delete, and their size."""
    doomed = checkpoint_dirs(Path(run_dir))[:-keep] if keep >= 1 else []
    seen: set[tuple[int, int]] = set()
    return doomed, sum(_size(path, seen) for path in doomed)


DELETED_PREFIX = ".deleted-"  # a run folder on its way out: hidden from every list, removed at the next start


def hide_run_folder(run_dir: str | Path) -> Path:
    """Rename a run folder to a hidden name of its own in the same folder (atomic), so no page or queue
    sees half a run while it is removed; returns the new path (rename it back to undo)."""
    run_dir = Path(run_dir)
    hidden = run_dir.with_name(f"{DELETED_PREFIX}{run_dir.name}-{time.time_ns()}")
    try:
        os.replace(run_dir, hidden)
    except OSError as err:
        raise UserError(f"cannot delete '{run_dir.name}' ({err.strerror or err}); close programs using its "
                        "files and try again") from None
    return hidden


def remove_hidden(hidden: str | Path) -> bool:
    """Remove a folder :func:`hide_run_folder` made; False if something in it could not be removed (a file
    held open elsewhere): what is left stays hidden and :func:`sweep_deleted` tries again later."""
    shutil.rmtree(hidden, ignore_errors=True)
    return not Path(hidden).exists()


def sweep_deleted(outputs_dir: str | Path) -> None:
    """Finish deletions an earlier process left halfway (see :func:`remove_hidden`)."""
    folder = Path(outputs_dir)
    if folder.is_dir():
        for hidden in folder.glob(f"{DELETED_PREFIX}*"):
            if hidden.is_dir() and not hidden.is_symlink():
                shutil.rmtree(hidden, ignore_errors=True)


def human_bytes(n: int) -> str:
    """``1536`` → ``1.5 KB`` (powers of 1024, as the rest of the app counts MB and GB)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
