"""The trigger word in captions (no torch needed: the web app uses it too)."""

from __future__ import annotations

import re

from trainer.errors import UserError


TRIGGER_RULE = "one word or phrase, without commas or line breaks (it becomes the first tag of every caption)"


def valid_trigger(trigger: str) -> bool:
    """Whether ``trigger`` can be one tag: a comma would make it two, in the captions, the tag counts and the A1111
    card's activation text."""
    return isinstance(trigger, str) and not any(c in trigger for c in ",\n\r")


def check_trigger(trigger: str) -> str:
    """``trigger`` with its spaces tidied.

    Raises:
        UserError: it holds a comma or a line break (:data:`TRIGGER_RULE`).
    """
    if not valid_trigger(trigger):
        raise UserError(f"trigger word {trigger!r}: give {TRIGGER_RULE}")
    return " ".join(trigger.split())


def _pattern(trigger: str, flags: int = 0) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)", flags)


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` appears in ``caption`` as a whole word or phrase, in any case: an artist who wrote
    "ZKstyle" in a caption meant the trigger (the Dataset tab's "add the trigger where it is missing" and
    training agree on where it is)."""
    return bool(_pattern(trigger, re.IGNORECASE).search(caption))


def without_trigger(caption: str, trigger: str) -> str:
    """``caption`` with the trigger (a whole word or phrase, in any case) taken out: what else it says."""
    return _pattern(trigger, re.IGNORECASE).sub(" ", caption) if trigger else caption


def with_trigger(caption: str, trigger: str) -> str:
    """``caption`` as training sees it: ``trigger`` put first unless it is already there; where it is there in
    another case, that spelling becomes the trigger's own (FLUX's T5 reads "ZKstyle" and "zkstyle" as
    different words, and prompts use the trigger as typed)."""
    if not trigger or _pattern(trigger).search(caption):
        return caption
    if has_trigger(caption, trigger):
        return _pattern(trigger, re.IGNORECASE).sub(lambda _: trigger, caption)
    return f"{trigger}, {caption}" if caption else trigger


def shared_first_tag(captions: list[str]) -> str | None:
    """The one word every caption starts with (``zkstyle, a red circle`` …): a trigger the captions carry
    though none was given; None when they do not agree, or there are fewer than two."""
    firsts = {caption.split(",", 1)[0].strip() for caption in captions}
    if len(captions) < 2 or len(firsts) != 1:
        return None
    word = firsts.pop()
    return word if re.fullmatch(r"[\w-]+", word) else None
