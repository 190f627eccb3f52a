"""Turn a raw model caption into a training caption.

A style LoRA learns whatever the captions do *not* explain. So we drop filler
("a picture of"), optionally remove words that name the style (so the style
goes into the LoRA weights, not into the words), cap the length, and put the
trigger word where the user wants it. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from trainer.errors import ConfigError
from trainer.trigger import TRIGGER_RULE, has_trigger, valid_trigger, with_trigger

# Leading filler, matched case-insensitively and stripped repeatedly
# ("The image shows a picture of a cat" -> "a cat").
BOILERPLATE = (
    "this is an image of", "this is a picture of", "this is a photo of",
    "an image of", "a picture of", "a photo of", "a photograph of", "an image showing",
    "the image shows", "this image shows", "the image depicts", "this image depicts",
    "the picture shows", "the image is", "this image is", "this is",
    "in this image,", "in the image,", "there is", "there are",
)
# Words BLIP invents from a training-set artifact; never meaningful.
ARTIFACT_WORDS = ("arafed", "araffe", "arafe", "araffed", "arafeed")

_LEADING = re.compile(
    r"^\s*(?:" + "|".join(re.escape(p) for p in sorted(BOILERPLATE, key=len, reverse=True)) + r")(?!\w)[\s,:]*",
    re.IGNORECASE,
)
_ARTIFACTS = re.compile(r"\b(?:" + "|".join(ARTIFACT_WORDS) + r")\b\s*", re.IGNORECASE)


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are cleaned and written.

    Args:
        trigger: word(s) that will call up the style; added once, never cut.
        trigger_position: ``prepend`` (``"sks, a cat"``) or ``append`` (``"a cat, sks"``).
        strip_boilerplate: drop leading filler such as "a picture of", "the image shows".
        remove_phrases: phrases removed anywhere (case-insensitive, whole words),
            e.g. ``("watercolor", "in the style of")``.
        max_length: maximum caption length in **words**, not counting the trigger;
            0 = unlimited. Cut at a comma boundary when the caption has commas
            (tag lists stay whole tags), otherwise at a word boundary.
        overwrite: replace existing ``.txt`` captions (default: keep them).
    """

    trigger: str = ""
    trigger_position: Literal["prepend", "append"] = "prepend"
    strip_boilerplate: bool = True
    remove_phrases: tuple[str, ...] = ()
    max_length: int = 0
    overwrite: bool = False

    def __post_init__(self):
        problems = []
        if self.trigger_position not in ("prepend", "append"):
            problems.append(f"trigger_position {self.trigger_position!r} must be 'prepend' or 'append'")
        if self.max_length < 0:
            problems.append(f"max_length {self.max_length} must be 0 (unlimited) or a positive number of words")
        if not valid_trigger(self.trigger):
            problems.append(f"trigger {self.trigger!r}: give {TRIGGER_RULE}")
        if problems:
            raise ConfigError(problems)


def tidy(text: str) -> str:
    """One line, single spaces, no stray or doubled commas."""
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    text = re.sub(r"^[\s,.;:]+|[\s,;:]+$", "", text)
    return text


def strip_boilerplate(text: str) -> str:
    text = _ARTIFACTS.sub("", text)
    while True:
        shorter = _LEADING.sub("", text, count=1)
        if shorter == text:
            return tidy(text)
        text = shorter


def remove_phrases(text: str, phrases: tuple[str, ...]) -> str:
    for phrase in phrases:
        phrase = " ".join(phrase.split())
        if phrase:
            text = re.sub(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", " ", text, flags=re.IGNORECASE)
    return tidy(text)


def truncate_words(text: str, max_words: int) -> str:
    """Keep at most ``max_words`` words, preferring whole comma-separated pieces."""
    if max_words <= 0 or len(text.split()) <= max_words:
        return text
    kept, count = [], 0
    for piece in text.split(","):
        words = len(piece.split())
        if count + words > max_words:
            break
        kept.append(piece)
        count += words
    if kept:
        return tidy(",".join(kept))
    return tidy(" ".join(text.split()[:max_words]))


def add_trigger(text: str, trigger: str, position: str) -> str:
    """``trigger`` first or last, unless the caption already holds it anywhere as a whole word in any case
    (then written as typed): the rule training and the caption tools apply (``trainer.trigger``)."""
    trigger = " ".join(trigger.split())
    if not trigger or not text:
        return text or trigger
    if has_trigger(text, trigger):
        return with_trigger(text, trigger)
    return f"{trigger}, {text}" if position == "prepend" else f"{text}, {trigger}"


def postprocess(text: str, options: CaptionOptions) -> str:
    """Clean one raw caption: filler, style phrases, length, then the trigger."""
    text = tidy(text)
    if options.strip_boilerplate:
        text = strip_boilerplate(text)
    text = remove_phrases(text, options.remove_phrases)
    text = truncate_words(text, options.max_length)
    return add_trigger(text, options.trigger, options.trigger_position)
