"""BLIP and BLIP-2 captions through transformers.

BLIP (Salesforce/blip-image-captioning-base, ~1 GB) writes one short sentence
per image and runs fine on a CPU. BLIP-2 (Salesforce/blip2-opt-2.7b, ~15 GB)
writes better sentences but wants a GPU. Both read the folder's
``config.json`` to pick the model class, so either name accepts either kind
of folder through ``--captioner-model``.
"""

from __future__ import annotations

from types import MappingProxyType

from captioning.base import BackendOptions
from captioning.errors import CaptionerUnavailable
from captioning.hf import Recipe, TransformersCaptioner
from captioning.weights import ModelSpec, find_weights, how_to_get, read_config

BLIP = ModelSpec("blip", "Salesforce/blip-image-captioning-base", ("config.json",), "about 1 GB")
BLIP2 = ModelSpec("blip2", "Salesforce/blip2-opt-2.7b", ("config.json",), "about 15 GB; a GPU is advised")

RECIPES = MappingProxyType({
    "blip": Recipe("BlipForConditionalGeneration", prompt=None),
    # BLIP-2's processor puts the query-token placeholders in front of the (empty) prompt.
    "blip-2": Recipe("Blip2ForConditionalGeneration", prompt="", decoder_only=True),
})


def _create(spec: ModelSpec, options: BackendOptions) -> TransformersCaptioner:
    folder = find_weights(spec, options.model_path)
    model_type = read_config(folder).get("model_type", "")
    recipe = RECIPES.get(model_type)
    if recipe is None:
        raise CaptionerUnavailable(
            f"captioner '{spec.backend}': {folder} holds a {model_type or 'unknown'!r} model, not BLIP or BLIP-2 "
            f"(config.json model_type should be 'blip' or 'blip-2'). " + how_to_get(spec),
            summary=f"{folder} is not a BLIP model",
        )
    return TransformersCaptioner(spec.backend, folder, spec, recipe, options)


def create_blip(options: BackendOptions) -> TransformersCaptioner:
    """BLIP captioner (finds weights now, loads them on first use)."""
    return _create(BLIP, options)


def create_blip2(options: BackendOptions) -> TransformersCaptioner:
    """BLIP-2 captioner (finds weights now, loads them on first use)."""
    return _create(BLIP2, options)
