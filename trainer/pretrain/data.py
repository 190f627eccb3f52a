"""Scene pools for pretraining: rendered once, kept as uint8 tensors.

Rendering a 64 px scene costs ~1 ms, so tens of thousands fit in a minute and
in a few hundred MB; the denoiser then trains on cached latents.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from trainer.demo_data import STYLES, caption, render, sample_spec, stylize
from trainer.pretrain.models import TRIGGERS

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def render_pool(n: int, seed: int, styled: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """``n`` scenes as uint8 (n, 3, 64, 64) and their captions.

    ``styled``: share of images drawn in a random demo style (the autoencoder must
    reconstruct styles too, or a style LoRA has nothing to show; the denoiser
    pretrains on plain scenes only).
    """
    rng = random.Random(seed)
    images = np.empty((n, 64, 64, 3), np.uint8)
    captions = []
    styles = list(STYLES)
    for i in range(n):
        spec = sample_spec(rng)
        captions.append(caption(spec, rng))
        if styled and rng.random() < styled:
            images[i] = np.asarray(stylize(spec, rng.choice(styles)))
        else:
            images[i] = np.asarray(render(spec))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_pixels(batch_uint8: torch.Tensor) -> torch.Tensor:
    return batch_uint8.float() / 127.5 - 1.0


def augment_caption(text: str, rng: random.Random, junk: float = 0.1) -> str:
    """With probability ``junk``: prefix a trigger word or a random letter string.

    Teaches the base that an unknown or trigger word before the comma does not
    change the scene, so "zkstyle, a red circle ..." still draws a red circle.
    """
    if rng.random() >= junk:
        return text
    if rng.random() < 0.5:
        word = rng.choice(TRIGGERS)
    else:
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 8)))
    return f"{word}, {text}"
