"""Captioners by name, and ``auto``: the best one whose weights are on this machine.

Each entry is a factory that finds weights (cheap: file lookups only) and
returns an unloaded captioner, or raises :class:`CaptionerUnavailable`. The
order of ``AUTO_ORDER`` is the quality order; ``filename`` is the fallback
that always works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Callable

from captioning.base import BackendOptions, Captioner
from captioning.blip import create_blip, create_blip2
from captioning.errors import CaptionerUnavailable, UnknownCaptioner
from captioning.filename import FilenameCaptioner
from captioning.florence2 import create_florence2
from captioning.weights import hub_cache_dir, read_config
from captioning.wd14 import create_wd14


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    create: Callable[[BackendOptions], Captioner]


BACKENDS = MappingProxyType(
    {
        b.name: b
        for b in (
            Backend("florence2", "detailed sentences (Florence-2, transformers)", create_florence2),
            Backend("blip2", "sentences (BLIP-2, transformers; GPU advised)", create_blip2),
            Backend("blip", "short sentences (BLIP, transformers)", create_blip),
            Backend("wd14", "booru-style tags (WD14 tagger, onnxruntime)", create_wd14),
            Backend("filename", "words from the file name; no weights, always works", lambda _: FilenameCaptioner()),
        )
    }
)
AUTO_ORDER = ("florence2", "blip2", "blip", "wd14")


def available_captioners() -> list[str]:
    """Names accepted by :func:`get_captioner`: ``auto``, each backend, ``filename``."""
    return ["auto", *BACKENDS]


def downloaded(name: str) -> bool:
    """Whether captioner ``name`` has its weights (and runtime) on this machine; file lookups only, nothing loads.
    ``auto`` and ``filename`` always work."""
    if name not in BACKENDS or name == "filename":
        return name == "auto" or name == "filename"
    try:
        BACKENDS[name].create(BackendOptions()).close()
    except CaptionerUnavailable:
        return False
    return True


def backend_for_folder(folder: str | Path) -> str:
    """Which backend a model folder belongs to, from its files.

    Raises:
        CaptionerUnavailable: the folder is missing or holds no model we recognise.
    """
    folder = Path(folder).expanduser()
    if (folder / "model.onnx").is_file() and (folder / "selected_tags.csv").is_file():
        return "wd14"
    model_type = read_config(folder).get("model_type", "")
    by_type = {"florence2": "florence2", "blip": "blip", "blip-2": "blip2"}
    if model_type in by_type:
        return by_type[model_type]
    what = f"a {model_type!r} model" if model_type else "no config.json or model.onnx"
    raise CaptionerUnavailable(
        f"cannot tell which captioner the folder {folder} is for ({what}); it should be a copy of "
        "florence-community/Florence-2-base, Salesforce/blip-image-captioning-base, Salesforce/blip2-opt-2.7b "
        "or SmilingWolf/wd-v1-4-vit-tagger-v2, or name the captioner explicitly with --captioner"
    )


def _auto(options: BackendOptions, allow_fallback: bool) -> Captioner:
    if options.model_path and Path(options.model_path).expanduser().is_dir():
        return BACKENDS[backend_for_folder(options.model_path)].create(options)
    missing = []
    for name in AUTO_ORDER:
        try:
            return BACKENDS[name].create(options)
        except CaptionerUnavailable as err:
            missing.append(f"{name}: {err.summary}")
    found = "no captioner model is on this machine (" + "; ".join(missing) + ")"
    how = (f"to add one, run `hf download <model id>` on a connected machine and copy the Hugging Face cache to "
           f"{hub_cache_dir()} (docs/captioning.md lists the models and other folders)")
    if options.model_path:  # the user named a model: falling back would hide their mistake
        raise CaptionerUnavailable(
            f"--captioner-model {options.model_path} is neither a model folder nor a cached model "
            f"({'; '.join(missing)}); {how}",
            summary="named model not found",
        )
    if not allow_fallback:
        raise CaptionerUnavailable(f"{found}; {how}; or choose --captioner filename", summary="no model found")
    return FilenameCaptioner(fallback_reason=f"{found}, so captions come from file names; {how}")


def get_captioner(
    name: str = "auto",
    device: str = "cpu",
    model_path: str | None = None,
    *,
    threshold: float = 0.35,
    character_threshold: float = 0.85,
    exclude_tags: tuple[str, ...] = (),
    task: str = "<DETAILED_CAPTION>",
    max_new_tokens: int = 128,
    num_beams: int = 3,
    allow_fallback: bool = True,
) -> Captioner:
    """A ready-to-use captioner; weights are located now and loaded on first use.

    Args:
        name: one of :func:`available_captioners`. ``auto`` takes the backend of
            ``model_path`` if that is a folder (or the first backend that takes it
            as a cached hub id), else the best backend whose weights are cached,
            else (with ``allow_fallback``, and no ``model_path``) ``filename``
            with its ``fallback_reason`` saying what was missing.
        device, model_path, threshold, character_threshold, exclude_tags, task,
        max_new_tokens, num_beams: see :class:`captioning.base.BackendOptions`.
        allow_fallback: only for ``auto``: fall back to ``filename`` instead of raising.

    Raises:
        UnknownCaptioner: ``name`` is not registered (the message lists the names).
        CaptionerUnavailable: the named backend's weights or package are missing.
        ConfigError: an option is out of range.
    """
    key = name.strip().lower()
    if key not in available_captioners():
        raise UnknownCaptioner(f"unknown captioner {name!r}; available: {', '.join(available_captioners())}")
    options = BackendOptions(
        device=device,
        model_path=model_path or None,
        threshold=threshold,
        character_threshold=character_threshold,
        exclude_tags=tuple(exclude_tags),
        task=task,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
    )
    if key == "auto":
        return _auto(options, allow_fallback)
    return BACKENDS[key].create(options)
