"""Captioning a run's dataset from the Dataset tab through the ``captioning`` package."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from captioning import CaptionerUnavailable, CaptionOptions, caption_folder
from ui import caption_tools, store


def caption_run(run_dir: Path, captioner: str, trigger: str, overwrite: bool,
                progress: Callable[[int, int], None], cancel: threading.Event, device: str = "cpu") -> str:
    """Write captions for every image of ``run_dir``; returns the one-line report the tab shows. What it wrote
    is recorded as the last bulk change, even when captioning failed midway, so "Undo the last change to all
    captions" takes it back (with overwrite on, it replaced captions written by hand). A captioner that cannot
    run on ``device`` (WD14 with the CPU build of onnxruntime) runs on the CPU."""
    before = caption_tools.captions_now(run_dir)

    def caption_on(where: str):
        return caption_folder(str(store.dataset_dir(run_dir)), captioner=captioner or "auto",
                              options=CaptionOptions(trigger=trigger, overwrite=overwrite),
                              progress=progress, cancel=cancel, device=where)

    try:
        try:
            report = caption_on(device)
        except CaptionerUnavailable:
            if device == "cpu":
                raise
            report = caption_on("cpu")
    finally:
        changed = caption_tools.record_change(run_dir, before, caption_tools.captions_now(run_dir))
    parts = [f"{len(report.written)} caption(s) written" + (f" with {report.backend}" if report.backend else "")]
    if report.kept:
        parts.append(f"{len(report.kept)} kept (tick 'overwrite' to replace them)")
    if report.skipped:
        more = len(report.skipped) - 5
        parts.append("skipped: " + "; ".join(f"{f}: {why}" for f, why in report.skipped[:5])
                     + (f"; and {more} more" if more > 0 else ""))
    if report.fallback_reason:
        parts.append(f"note: {report.fallback_reason}")
    if report.cancelled:
        parts.append("stopped (the captions written so far are kept)")
    replaced = sum(before.get(name) is not None for name in changed)
    if replaced:
        parts.append(f"{replaced} earlier caption(s) replaced (“Undo the last change to all captions” puts them back)")
    return ", ".join(parts)
