"""The always-available captioner: a caption from the image's file name.

Artists often name files meaningfully ("misty_harbor_at_dawn_03.png"); with a
trigger word that is a usable caption, needs no weights, and works offline.
Camera names (IMG_1234), counters, sizes and hashes say nothing about the
picture, so they are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from captioning.base import SOURCE_PATH_KEY

# Whole tokens that carry no meaning for a caption (compared lower-case).
NOISE_WORDS = frozenset(
    {"img", "dsc", "dscf", "dscn", "pxl", "mvimg", "screenshot", "scan", "copy", "final", "edit", "untitled"}
)
_NOISE_PATTERNS = (
    re.compile(r"^\d+$"),  # counters, dates
    re.compile(r"^(?:img|dsc[fn]?|pxl|mvimg|p)\d+$"),  # camera names: DSC00042, PXL20240101
    re.compile(r"^\d+x\d+$"),  # sizes: 1024x768
    re.compile(r"^v\d+$"),  # versions: v2
    re.compile(r"^(?=.*\d)[0-9a-f]{8,}$"),  # hashes
)


def caption_from_name(path: str | Path) -> str:
    """Readable words from a file name: ``Misty_Harbor-03 (2).png`` -> ``misty harbor``."""
    stem = Path(path).stem
    stem = re.sub(r"\(\d+\)", " ", stem)  # "(2)" duplicate markers
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)  # camelCase
    words = re.split(r"[\s_\-.+,;()\[\]{}]+", stem)
    kept = [
        w.lower()
        for w in words
        if w and w.lower() not in NOISE_WORDS and not any(p.match(w.lower()) for p in _NOISE_PATTERNS)
    ]
    return " ".join(kept)


@dataclass
class FilenameCaptioner:
    """Captions from file names. ``fallback_reason`` is set when ``auto`` chose it for lack of weights."""

    fallback_reason: str = ""
    name: str = "filename"

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [caption_from_name(self._source(img)) for img in images]

    def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def _source(img: Image.Image) -> str:
        return img.info.get(SOURCE_PATH_KEY) or getattr(img, "filename", "") or ""
