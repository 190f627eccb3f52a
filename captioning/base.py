"""The one interface every captioner implements, and the options backends share.

A captioner turns a batch of PIL images into one caption string per image. It
loads its model lazily (on the first :meth:`Captioner.caption`, or an explicit
``load()``), so constructing one is cheap and a missing model is reported
before any work starts; :meth:`Captioner.close` gives the memory back before
training needs the GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from trainer.errors import ConfigError

# Key in ``Image.info`` where the folder runner records the file an image came
# from; the ``filename`` captioner reads it (pixels alone carry no name).
SOURCE_PATH_KEY = "source_path"

FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@runtime_checkable
class Captioner(Protocol):
    """Caption a batch of images; ``close`` releases the model (and CUDA cache)."""

    name: str

    def caption(self, images: list[Image.Image]) -> list[str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BackendOptions:
    """Where and how a backend runs; each backend reads only the fields it documents.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. On a GPU, models run in
            bf16 where supported, else fp16; on CPU in fp32.
        model_path: a local model folder, or a hub id to look up in the local
            Hugging Face cache instead of the backend's default id. Never downloaded.
        threshold: wd14 — minimum confidence for a general tag.
        character_threshold: wd14 — minimum confidence for a character tag
            (higher, because a wrong character name teaches the LoRA a person).
        exclude_tags: wd14 — tags never written (compared case-insensitively,
            ``_`` and space treated alike).
        task: florence2 — one of ``FLORENCE_TASKS``.
        max_new_tokens: florence2/blip — generation length limit.
        num_beams: florence2/blip — beam search width (1 = greedy).
    """

    device: str = "cpu"
    model_path: str | None = None
    threshold: float = 0.35
    character_threshold: float = 0.85
    exclude_tags: tuple[str, ...] = ()
    task: str = "<DETAILED_CAPTION>"
    max_new_tokens: int = 128
    num_beams: int = 3

    def __post_init__(self):
        problems = []
        if not _DEVICE.match(self.device):
            problems.append(f"device {self.device!r} is not one of cpu, cuda, cuda:N, mps")
        for field in ("threshold", "character_threshold"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{field} {value} must be between 0 and 1")
        if self.task not in FLORENCE_TASKS:
            problems.append(f"task {self.task!r} must be one of {', '.join(FLORENCE_TASKS)}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens {self.max_new_tokens} must be at least 1")
        if self.num_beams < 1:
            problems.append(f"num_beams {self.num_beams} must be at least 1")
        if problems:
            raise ConfigError(problems)


def one_line(err: BaseException, limit: int = 300) -> str:
    """Squash a library error to one short line for a user-facing message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
