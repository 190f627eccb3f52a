"""The Studio's dataset side: pictures and their captions, bulk caption edits, auto-captioning and the
dataset check. The files work is ``ui.store``'s, ``ui.caption_tools``' and ``trainer.dataset_check``'s.

A mixin of :class:`ui.studio.Studio`: it uses ``run_dir``, ``limits``, ``dataset_note``, ``jobs``,
``gpu_free``, the check's caches ``_facts``, ``_readers`` and ``_readers_lock``, and ``_captioning`` (each run's
Caption all stop flag).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Optional

from trainer.dataset_check import (CaptionReader, Finding, check_bare_captions, check_captions, check_images,
                                   check_uncaptioned, file_facts,
                                   load_caption_reader, token_count)
from trainer.demo_data import DEMO_TRIGGER, write_style_set
from trainer.errors import ImageError, UserError
from trainer.job import LIVE
from trainer.scan import caption_from_filename, read_caption
from trainer.trigger import check_trigger, with_trigger
from ui import caption_tools, choices, store
from ui.format import first_few
from ui.captions import caption_run


class CaptionJob(NamedTuple):
    """A Caption all under way: its stop flag, and where it runs."""

    flag: threading.Event
    device: str


class RunDataset:
    """A run's dataset (see the module docstring)."""

    def import_uploads(self, run: str, paths: list[str]) -> store.ImportReport:
        return store.import_uploads(paths, self.run_dir(run), self.limits)

    def add_demo_images(self, run: str, style: str, n: int = 20) -> store.ImportReport:
        """Add ``n`` captioned images of a demo style (``trainer.demo_data``) to ``run``, through the normal import.

        For trying the studio offline on a demo base: the captions start with the trigger
        ``zkstyle``, which becomes the run's trigger word.
        """
        with tempfile.TemporaryDirectory() as tmp:
            images = write_style_set(style, Path(tmp) / style, n=n, seed=0, trigger=DEMO_TRIGGER)
            report = self.import_uploads(run, [str(p) for p in images] + [str(p.with_suffix(".txt")) for p in images])
        self.save_settings(run, trigger=DEMO_TRIGGER)
        return report

    def items(self, run: str) -> list[store.Item]:
        return store.list_items(self.run_dir(run))

    def set_caption(self, run: str, name: str, text: str) -> bool:
        """Write the caption of picture ``name``; False (nothing written) when ``text`` is what it says already.
        The page saves when a caption box loses focus: a click in and out of the empty box of a picture without
        a caption would otherwise make it train on no words instead of its file name's."""
        run_dir = self.run_dir(run)
        if " ".join(str(text).split()) == store.read_caption(run_dir, name):
            return False
        store.write_caption(run_dir, name, text)
        return True

    def remove_image(self, run: str, name: str) -> None:
        store.remove_item(self.run_dir(run), name)

    def restore_image(self, run: str) -> str:
        """Put the picture removed last back; returns its name."""
        return store.restore_removed(self.run_dir(run))

    def settings(self, run: str) -> dict:
        return store.load_settings(self.run_dir(run))

    def save_settings(self, run: str, **values) -> None:
        run_dir = self.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        store.save_settings(run_dir, **values)

    # ---- captions of the whole dataset at once (ui.caption_tools) -----------------------------
    def replace_in_captions(self, run: str, find: str, replace: str, whole_words: bool = True,
                            match_case: bool = False) -> str:
        changed, total = caption_tools.replace_in_captions(self.run_dir(run), find, replace, whole_words, match_case)
        if not changed:
            return f"{find.strip()!r} is in none of the {total} captions: nothing changed." + self._unreadable_note(run)
        return (f"Replaced {find.strip()!r} with {replace.strip()!r} in {changed} of {total} captions "
                "(Undo takes it back)." + self._unreadable_note(run) + self.dataset_note(run))

    def add_trigger_to_captions(self, run: str, trigger: str) -> str:
        changed, total = caption_tools.add_trigger(self.run_dir(run), trigger)
        trigger = " ".join(trigger.split())
        self.save_settings(run, trigger=trigger)
        missing = len(caption_tools.uncaptioned(self.run_dir(run)))
        left = (f" {missing} picture(s) without a caption were left as they are: training puts {trigger!r} before "
                "the words of their file names (the check above names them)." if missing else "")
        if not changed:
            head = f"All {total} captions already hold {trigger!r}." if total else "No picture has a caption yet."
            return head + left + self._unreadable_note(run)
        return (f"Added {trigger!r} to {changed} of {total} captions (Undo takes it back)." + left
                + self._unreadable_note(run) + self.dataset_note(run))

    def _unreadable_note(self, run: str) -> str:
        names = caption_tools.unreadable(self.run_dir(run))
        if not names:
            return ""
        return (f" Left alone {len(names)} caption file(s) that are not UTF-8 text ({first_few(names)}): re-save "
                "them as UTF-8 (training reads their pictures' file names instead).")

    def undo_captions(self, run: str) -> str:
        restored, kept = caption_tools.undo(self.run_dir(run))
        text = f"Undone: {restored} caption(s) are back as they were."
        if kept:
            text += f" {kept} caption(s) edited by hand (or whose picture was removed) since were left as they are."
        return text + (self.dataset_note(run) if restored else "")

    def tag_counts(self, run: str, top: int = 30) -> tuple[list[tuple[str, int]], int]:
        """The captions' ``top`` most common tags, and how many captions there are."""
        return caption_tools.tag_counts(self.run_dir(run), top)

    def word_counts(self, run: str) -> list[tuple[str, int]]:
        """The words found in the most captions (for sentence captions, where no tag repeats)."""
        return caption_tools.word_counts(self.run_dir(run))

    def dataset_check(self, run: str, resolution: int, base: str = "",
                      trigger: Optional[str] = None) -> tuple[list[Finding], int]:
        """What in ``run``'s dataset would make a LoRA trained at ``resolution`` on ``base`` (with ``trigger``
        put first in captions) worse, and how many pictures were looked at. Fingerprints come from the
        thumbnails and sizes from the file headers, so this is quick enough to run after every change;
        captions are counted in ``base``'s tokenizer when its folder is at hand (the first time imports
        transformers: seconds)."""
        items = store.list_items(self.run_dir(run))
        facts, known = [], {}
        for item in items:
            thumb = item.thumb if item.thumb != item.path else None
            try:
                key = tuple((st.st_mtime_ns, st.st_size) for st in map(os.stat, filter(None, (item.path, thumb))))
                cached = self._facts.get(item.path)
                found = cached[1] if cached and cached[0] == key else file_facts(item.name, item.path, thumb,
                                                                                  self.limits)
            except (ImageError, OSError):
                continue  # training skips it with the reason; the upload already refused what it could tell
            known[item.path] = (key, found)
            facts.append(found)
        self._facts.update(known)  # pictures unchanged since the last look are not opened again
        findings = check_images(facts, resolution)
        uncaptioned = {i.name for i in items if read_caption(Path(i.path).with_suffix(".txt")) is None}
        findings += check_uncaptioned(sorted(uncaptioned))
        if trigger is None:  # the one saved with the run (the Dataset tab sends what its box holds now)
            trigger = str(self.settings(run).get("trigger") or "")
        findings += check_bare_captions([(i.name, i.caption) for i in items if i.name not in uncaptioned], trigger)
        reader = self._caption_reader(base) if base and items else None
        if reader is not None:
            captions = [(i.name, with_trigger(caption_from_filename(i.name) if i.name in uncaptioned else i.caption,
                                              trigger)) for i in items]
            findings += check_captions(captions, partial(token_count, reader.tokenizer), reader.limit, reader.encoder)
        return findings, len(facts)

    def _caption_reader(self, base: str) -> Optional[CaptionReader]:
        """``base``'s caption tokenizer, loaded once per base; None while it is not at hand (looked for again next
        time: a demo base's folder appears when it is first built)."""
        with self._readers_lock:  # two checks at once (an upload also fills the trigger box) load it once
            if self._readers.get(base) is None:
                self._readers[base] = load_caption_reader(base)
            return self._readers[base]

    captioners = staticmethod(choices.captioners)

    def caption_all(self, run: str, captioner: str, trigger: str, overwrite: bool,
                    progress: Callable[[int, int], None] = lambda done, total: None) -> str:
        """Write captions for every image (on the GPU when there is one and no run trains or waits to); returns a
        one-line report. :meth:`stop_captioning` stops it after the batch at hand. While it captions on the GPU,
        Start and Resume wait for it (:meth:`refuse_while_captioning_on_gpu`)."""
        run_dir = self.run_dir(run)
        if not store.list_items(run_dir):
            raise UserError("the dataset is empty: add images first")
        trigger = check_trigger(trigger or "")  # refused before it is saved as the run's trigger
        self.save_settings(run, trigger=trigger)
        device = self._caption_device()
        stop = self._captioning[run_dir.name] = CaptionJob(threading.Event(), device)
        try:
            return caption_run(run_dir, captioner, trigger, overwrite, progress, stop.flag, device)
        finally:
            self._captioning.pop(run_dir.name, None)

    def refuse_while_captioning_on_gpu(self) -> None:
        """Training beside a captioner on the GPU could run either out of memory: a Start waits for it.

        Raises:
            UserError: a Caption all runs on the GPU (the message says which and what to do).
        """
        busy = [name for name, job in list(self._captioning.items()) if job.device != "cpu"]
        if busy:
            raise UserError(f"'{busy[0]}' is being captioned on the GPU, and training beside it could run either out "
                            "of GPU memory: start when it is done, or stop it on the Dataset tab")

    def stop_captioning(self, run: str, wait: float = 2.0) -> str:
        """Stop the run's Caption all after the batch at hand; the captions written so far stay. A Stop pressed
        just after Caption all may arrive first: it waits ``wait`` seconds for the captioning to begin."""
        name = self.run_dir(run).name
        deadline = time.monotonic() + wait
        while (job := self._captioning.get(name)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if job is None:
            return "Nothing is being captioned."
        job.flag.set()
        return "Stopping after the pictures at hand…"

    def _caption_device(self) -> str:
        """cuda when a GPU is free of training, now and queued (a captioner beside a run could take the memory it
        needs)."""
        if any(job.state in LIVE for job in self.jobs()) or self.gpu_free() is None:
            return "cpu"
        return "cuda"
