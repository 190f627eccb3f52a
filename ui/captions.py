"""Captioning a run's dataset from the Dataset tab: the ``captioning`` package, or file names without it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from trainer.scan import caption_from_filename
from trainer.trigger import with_trigger
from ui import store


def caption_run(run_dir: Path, captioner: str, trigger: str, overwrite: bool,
                progress: Callable[[int, int], None], cancel: threading.Event) -> str:
    """Write captions for every image of ``run_dir``; returns the one-line report the tab shows."""
    try:
        import captioning

        caption_folder, options_cls = captioning.caption_folder, captioning.CaptionOptions
    except (ImportError, AttributeError):
        return caption_from_names(run_dir, trigger, overwrite, progress)
    report = caption_folder(str(store.dataset_dir(run_dir)), captioner=captioner or "auto",
                            options=options_cls(trigger=trigger, overwrite=overwrite),
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


def caption_from_names(run_dir: Path, trigger: str, overwrite: bool, progress: Callable[[int, int], None]) -> str:
    """Captions from file names (``red_barn-02.png`` → ``red barn``), the trigger in front."""
    items = store.list_items(run_dir)
    written = kept = 0
    for i, item in enumerate(items, 1):
        if item.caption and not overwrite:
            kept += 1
        else:
            store.write_caption(run_dir, item.name, with_trigger(caption_from_filename(item.name), trigger))
            written += 1
        progress(i, len(items))
    return f"{written} caption(s) written from file names, {kept} kept"
