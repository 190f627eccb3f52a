"""Captioning a run's dataset from the Dataset tab through the ``captioning`` package."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from captioning import CaptionOptions, caption_folder
from ui import store


def caption_run(run_dir: Path, captioner: str, trigger: str, overwrite: bool,
                progress: Callable[[int, int], None], cancel: threading.Event) -> str:
    """Write captions for every image of ``run_dir``; returns the one-line report the tab shows."""
    report = caption_folder(str(store.dataset_dir(run_dir)), captioner=captioner or "auto",
                            options=CaptionOptions(trigger=trigger, overwrite=overwrite),
                            progress=progress, cancel=cancel)
    parts = [f"{len(report.written)} caption(s) written" + (f" with {report.backend}" if report.backend else "")]
    if report.kept:
        parts.append(f"{len(report.kept)} kept (tick 'overwrite' to replace them)")
    if report.skipped:
        parts.append("skipped: " + "; ".join(f"{f}: {why}" for f, why in report.skipped[:5]))
    if report.fallback_reason:
        parts.append(f"note: {report.fallback_reason}")
    if report.cancelled:
        parts.append("cancelled")
    return ", ".join(parts)
