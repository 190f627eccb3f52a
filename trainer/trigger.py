"""The trigger word in captions (no torch needed: the web app uses it too)."""

from __future__ import annotations

import re


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` appears in ``caption`` as a whole word or phrase, in any case: CLIP reads captions
    lower-cased, and an artist who wrote "ZKstyle" in a caption meant the trigger (the Dataset tab's "add the
    trigger where it is missing" and training must agree on where it is)."""
    return bool(re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE))


def with_trigger(caption: str, trigger: str) -> str:
    """``caption`` as training sees it: ``trigger`` put first unless it is already there."""
    if not trigger or has_trigger(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger
