"""Florence-2 detailed captions through transformers' native Florence-2 classes.

transformers 5 ships ``Florence2ForConditionalGeneration``; it loads the
converted checkpoints ``florence-community/Florence-2-base`` (~0.5 GB) and
``-large``. The original ``microsoft/Florence-2-*`` repos hold remote code
that no longer loads under transformers 5, and we never run remote code, so
such a folder is refused with a pointer to the converted one.
"""

from __future__ import annotations

from captioning.base import BackendOptions
from captioning.errors import CaptionerUnavailable
from captioning.hf import Recipe, TransformersCaptioner
from captioning.weights import ModelSpec, find_weights, how_to_get, read_config

FLORENCE2 = ModelSpec("florence2", "florence-community/Florence-2-base", ("config.json",), "about 0.5 GB")


def create_florence2(options: BackendOptions) -> TransformersCaptioner:
    """Florence-2 captioner using ``options.task`` (finds weights now, loads them on first use)."""
    folder = find_weights(FLORENCE2, options.model_path)
    config = read_config(folder)
    if "auto_map" in config:
        raise CaptionerUnavailable(
            f"captioner 'florence2': {folder} is the original remote-code Florence-2 layout "
            "(microsoft/Florence-2-*), which transformers 5 cannot load and we do not run; "
            "use the converted florence-community/Florence-2-base (or -large) instead. " + how_to_get(FLORENCE2),
            summary=f"{folder} is the remote-code Florence-2 layout",
        )
    if config.get("model_type") != "florence2":
        raise CaptionerUnavailable(
            f"captioner 'florence2': {folder} holds a {config.get('model_type') or 'unknown'!r} model, "
            "not Florence-2 (config.json model_type should be 'florence2'). " + how_to_get(FLORENCE2),
            summary=f"{folder} is not a Florence-2 model",
        )
    recipe = Recipe("Florence2ForConditionalGeneration", prompt=options.task)
    return TransformersCaptioner("florence2", folder, FLORENCE2, recipe, options)
