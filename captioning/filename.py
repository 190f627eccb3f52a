"""The always-available captioner: a caption from the image's file name.

Artists often name files meaningfully ("misty_harbor_at_dawn_03.png"); with a
trigger word that is a usable caption, needs no weights, and works offline.
The words are the ones training would use for a picture without a caption
(``trainer.scan.caption_from_filename``).
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from captioning.base import SOURCE_PATH_KEY
from trainer.scan import caption_from_filename


@dataclass
class FilenameCaptioner:
    """Captions from file names. ``fallback_reason`` is set when ``auto`` chose it for lack of weights."""

    fallback_reason: str = ""
    name: str = "filename"

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [caption_from_filename(self._source(img)) for img in images]

    def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def _source(img: Image.Image) -> str:
        return img.info.get(SOURCE_PATH_KEY) or getattr(img, "filename", "") or ""
