"""Edits across all captions of a run at once, without gradio: find & replace, add the trigger, undo, tag and word
counts.

An auto-captioner says "a painting of" in every caption, or misses the trigger word;
fixing 80 captions one box at a time is what artists complain about. Every edit first
records the captions it changes, before and after, in ``dataset/.captions-undo.json`` (one
level), so the last bulk change can be taken back without undoing a caption edited by hand
since; each caption is written atomically.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from trainer.atomic import write_text
from trainer.errors import UserError
from trainer.images import is_image_name
from trainer.trigger import check_trigger, has_trigger
from ui import store

UNDO_FILE = ".captions-undo.json"  # hidden: the trainer reads only images and their .txt sidecars


def _image_names(run_dir: Path) -> list[str]:
    data = store.dataset_dir(run_dir)
    if not data.is_dir():
        return []
    return sorted((p.name for p in data.iterdir() if p.is_file() and not p.name.startswith(".")
                   and is_image_name(p.name)), key=str.lower)


def captions_now(run_dir: Path) -> dict[str, str | None]:
    """image name → its caption, None for an image without a caption file (training reads words from its file
    name). Caption files that are not UTF-8 text are left out: no tool reads or overwrites them
    (:func:`unreadable` names them)."""
    captions = {}
    for name in _image_names(run_dir):
        txt = (store.dataset_dir(run_dir) / name).with_suffix(".txt")
        try:
            captions[name] = txt.read_bytes().decode("utf-8-sig").strip()
        except FileNotFoundError:
            captions[name] = None
        except UnicodeDecodeError:
            continue
        except OSError as err:  # a locked or unreadable file: nothing may be decided for it
            raise UserError(f"cannot read the caption {txt.name} ({err.strerror or err}); nothing was changed") \
                from None
    return captions


def unreadable(run_dir: Path) -> list[str]:
    """The caption files of the dataset's images that are not UTF-8 text, which the bulk edits leave alone."""
    readable = captions_now(run_dir)
    return [str(Path(name).with_suffix(".txt")) for name in _image_names(run_dir) if name not in readable]


def tidy(caption: str) -> str:
    """One line without the stray commas and spaces a deletion leaves: ``a , , cat ,`` → ``a, cat``."""
    parts = [" ".join(part.split()) for part in caption.split(",")]
    return ", ".join(part for part in parts if part)


def record_change(run_dir: Path, old: dict[str, str | None], new: dict[str, str | None]) -> dict[str, str]:
    """Record for :func:`undo` the captions of ``new`` that differ from ``old`` (None: no caption file), before
    and after; returns those changed. Auto-captioning records what it wrote the same way, after writing."""
    changed = {name: text for name, text in new.items() if name in old and text is not None and text != old[name]}
    if changed:
        record = {"before": {name: old[name] for name in changed}, "after": changed}
        write_text(store.dataset_dir(run_dir) / UNDO_FILE, json.dumps(record, ensure_ascii=False, indent=1))
    return changed


def _apply(run_dir: Path, old: dict[str, str], new: dict[str, str]) -> int:
    """Write the captions of ``new`` that differ from ``old``, after recording them before and after for
    :func:`undo`; returns how many changed."""
    changed = record_change(run_dir, old, new)
    for name, text in changed.items():
        store.write_caption(run_dir, name, text)
    return len(changed)


def _pattern(find: str, whole_words: bool, match_case: bool) -> re.Pattern:
    text = re.escape(find)
    if whole_words:  # \b fails next to punctuation: "words" are what no letter or digit continues
        text = rf"(?<!\w){text}(?!\w)"
    return re.compile(text, 0 if match_case else re.IGNORECASE)


def replace_in_captions(run_dir: Path, find: str, replace: str, whole_words: bool = True,
                        match_case: bool = False) -> tuple[int, int]:
    """Replace ``find`` with ``replace`` in every caption; returns (captions changed, captions in all).

    Raises:
        UserError: nothing to find, or no images.
    """
    if not (find or "").strip():
        raise UserError("type the text to find (the replacement may be empty, which deletes it)")
    if not _image_names(run_dir):
        raise UserError("the dataset is empty: add images first")
    captions = {name: text for name, text in captions_now(run_dir).items() if text is not None}
    pattern = _pattern(find.strip(), whole_words, match_case)
    new = {name: tidy(pattern.sub(lambda _: replace.strip(), text)) for name, text in captions.items()
           if pattern.search(text)}
    return _apply(run_dir, captions, new), len(captions)


def add_trigger(run_dir: Path, trigger: str) -> tuple[int, int]:
    """Start every caption that lacks ``trigger`` (as a whole word or phrase) with it; returns (changed, all).

    Raises:
        UserError: no trigger word, or no images.
    """
    trigger = check_trigger(trigger or "")
    if not trigger:
        raise UserError("type the trigger word first (e.g. zkstyle)")
    if not _image_names(run_dir):
        raise UserError("the dataset is empty: add images first")
    # a picture without a caption file is left as it is: training puts the trigger before its file name's words
    captions = {name: text for name, text in captions_now(run_dir).items() if text is not None}
    new = {name: tidy(f"{trigger}, {text}") for name, text in captions.items() if not has_trigger(text, trigger)}
    return _apply(run_dir, captions, new), len(captions)


def uncaptioned(run_dir: Path) -> list[str]:
    """The dataset's images without a caption file (training reads words from their file names)."""
    return [name for name, text in captions_now(run_dir).items() if text is None]


def undo(run_dir: Path) -> tuple[int, int]:
    """Put back the captions from before the last bulk edit; returns (captions put back, captions left alone
    because they were edited by hand since, or their image was removed). A hand edit is never lost.

    Raises:
        UserError: there is nothing to undo (or its record is unreadable).
    """
    path = store.dataset_dir(run_dir) / UNDO_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        before, after = dict(record["before"]), dict(record["after"])
    except FileNotFoundError:
        raise UserError("nothing to undo: no bulk caption change was made since the last undo") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"the undo record {UNDO_FILE} is unreadable; edit the captions by hand") from None
    current = captions_now(run_dir)
    restored = kept = 0
    for name, text in after.items():
        if name in current and current[name] == text and name in before:
            if before[name] is None:  # auto-captioned: it had no caption file
                (store.dataset_dir(run_dir) / name).with_suffix(".txt").unlink(missing_ok=True)
            else:
                store.write_caption(run_dir, name, str(before[name]))
            restored += 1
        else:
            kept += 1
    path.unlink()
    return restored, kept


# words too common in English to say anything about a dataset; every other word of three letters or more counts
FUNCTION_WORDS = frozenset(
    "the and with its are was were has have had for from this that these those there their them they into onto "
    "over under near next than then who whom which while what where when she her his him you your our out off "
    "not but all any some each both very also just can".split())


def word_counts(run_dir: Path, top: int = 15) -> list[tuple[str, int]]:
    """The ``top`` words found in the most captions (each counted once per caption), for sentence captions,
    where no tag repeats: a word in nearly every caption ("painting", "watercolor") shares the style with the
    trigger, and a prompt without it then shows less of the style."""
    counts: Counter[str] = Counter()
    for text in filter(None, captions_now(run_dir).values()):
        counts.update({word for word in re.findall(r"[^\W\d_][\w'-]*", text.lower())
                       if len(word) >= 3 and word not in FUNCTION_WORDS})
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def tag_counts(run_dir: Path, top: int = 30) -> tuple[list[tuple[str, int]], int]:
    """The ``top`` most common comma-separated tags (or whole sentences) in the captions, each counted once per
    caption (the same split as the exports' ``ss_tag_frequency``), and the number of captions."""
    counts: Counter[str] = Counter()
    captions = [text for text in captions_now(run_dir).values() if text]
    for text in captions:
        counts.update({tag.strip().lower() for tag in text.split(",") if tag.strip()})
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top], len(captions)
