"""WD14 booru-style tags through onnxruntime (SmilingWolf's WD taggers).

A tagger folder holds ``model.onnx`` and ``selected_tags.csv`` (tag_id, name,
category, count). The model takes NHWC float32 **BGR** pixels in 0..255,
padded to a white square, and returns one sigmoid confidence per tag. We keep
general tags at ``threshold`` and character tags at the stricter
``character_threshold``, never write rating tags, drop ``exclude_tags``, and
join the rest by confidence: ``"1girl, long hair, watercolor"``. Tags suit
SD1.5/anime bases; sentence captioners suit SDXL/FLUX.
"""

from __future__ import annotations

import csv
import gc
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from captioning.base import BackendOptions, one_line
from captioning.errors import CaptionerUnavailable
from captioning.weights import ModelSpec, find_weights, how_to_get

WD14 = ModelSpec("wd14", "SmilingWolf/wd-v1-4-vit-tagger-v2", ("model.onnx", "selected_tags.csv"), "about 0.4 GB",
                 only_required=True)
ONNXRUNTIME_PIN = "onnxruntime==1.32.0"

GENERAL, CHARACTER, RATING = 0, 4, 9  # categories in selected_tags.csv


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _load_errors(ort) -> tuple[type[Exception], ...]:
    """onnxruntime's load errors derive from Exception only, so name them."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidProtobuf", "NoSuchFile", "InvalidArgument", "InvalidGraph", "RuntimeException")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def normalize_tag(tag: str) -> str:
    """Comparison key: case and ``_`` vs space do not matter."""
    return " ".join(tag.replace("_", " ").lower().split())


def display_tag(name: str) -> str:
    """``long_hair`` -> ``long hair``; kaomoji such as ``^_^`` or ``o_o`` keep their underscore."""
    return name.replace("_", " ") if re.search(r"[A-Za-z0-9]{2}", name) else name


def read_tags(path: Path) -> list[Tag]:
    """Tags in model-output order from ``selected_tags.csv``.

    Raises:
        CaptionerUnavailable: the file lacks the ``name``/``category`` columns or is not UTF-8.
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [Tag(row["name"], int(row["category"])) for row in csv.DictReader(f)]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
        raise CaptionerUnavailable(
            f"captioner 'wd14': {path} is not a WD14 tag list (needs name and category columns): {one_line(err)}. "
            + how_to_get(WD14)
        ) from None


def prepare(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Pad to a white square, resize, RGB -> BGR float32 0..255, as the taggers were trained."""
    image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    square = square.resize((width, height), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


class Wd14Captioner:
    """Tags images with a WD14 ONNX model; loads the session on first use."""

    name = "wd14"

    def __init__(self, folder: Path, options: BackendOptions):
        self.folder = folder
        self._options = options
        self._exclude = {normalize_tag(t) for t in options.exclude_tags}
        self._session = None
        self._tags: list[Tag] = []

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def _providers(self, ort) -> list:
        device = self._options.device
        if not device.startswith("cuda"):
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CaptionerUnavailable(
                f"captioner 'wd14' on {device} needs onnxruntime-gpu, but this onnxruntime has no CUDA provider; "
                "pip install onnxruntime-gpu (instead of onnxruntime), or use --device cpu (tagging is fast on CPU)"
            )
        device_id = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]

    def load(self) -> None:
        """Open the ONNX session and tag list (idempotent).

        Raises:
            CaptionerUnavailable: onnxruntime is missing, the model does not load, or it
                and ``selected_tags.csv`` disagree on the number of tags.
        """
        if self._session is not None:
            return
        try:
            import onnxruntime as ort
        except ImportError:
            raise CaptionerUnavailable(
                f"captioner 'wd14' needs the onnxruntime package: pip install {ONNXRUNTIME_PIN}"
            ) from None
        tags = read_tags(self.folder / "selected_tags.csv")
        try:
            session = ort.InferenceSession(str(self.folder / "model.onnx"), providers=self._providers(ort))
        except _load_errors(ort) as err:
            raise CaptionerUnavailable(
                f"captioner 'wd14' could not load {self.folder / 'model.onnx'}: {one_line(err)}. " + how_to_get(WD14)
            ) from None
        outputs = session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(tags):
            raise CaptionerUnavailable(
                f"captioner 'wd14': model.onnx gives {outputs} scores but selected_tags.csv lists {len(tags)} tags; "
                "the two files must come from the same tagger repo"
            )
        self._session, self._tags = session, tags

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        self.load()
        model_input = self._session.get_inputs()[0]
        batch_dim, height, width, _ = model_input.shape
        pixels = np.stack([prepare(img, height, width) for img in images])
        if batch_dim == 1:  # some exports fix the batch size at 1
            scores = np.concatenate([self._session.run(None, {model_input.name: p[None]})[0] for p in pixels])
        else:
            scores = self._session.run(None, {model_input.name: pixels})[0]
        return [self._tags_for(row) for row in scores]

    def _tags_for(self, scores: np.ndarray) -> str:
        picked = []
        for tag, score in zip(self._tags, scores):
            if tag.category == RATING or normalize_tag(tag.name) in self._exclude:
                continue
            floor = self._options.character_threshold if tag.category == CHARACTER else self._options.threshold
            if score >= floor:
                picked.append((float(score), display_tag(tag.name)))
        picked.sort(key=lambda item: -item[0])
        return ", ".join(name for _, name in picked)

    def close(self) -> None:
        """Drop the ONNX session (its arena holds the model's memory)."""
        self._session = None
        self._tags = []
        gc.collect()


def create_wd14(options: BackendOptions) -> Wd14Captioner:
    """WD14 tagger (finds weights and checks for onnxruntime now, loads on first use).

    Raises:
        CaptionerUnavailable: weights missing, or onnxruntime not installed.
    """
    folder = find_weights(WD14, options.model_path)
    if not onnxruntime_installed():
        raise CaptionerUnavailable(
            f"captioner 'wd14' found its model at {folder} but needs the onnxruntime package: "
            f"pip install {ONNXRUNTIME_PIN} (onnxruntime-gpu for CUDA); `--captioner filename` works without it",
            summary="onnxruntime not installed",
        )
    return Wd14Captioner(folder, options)
