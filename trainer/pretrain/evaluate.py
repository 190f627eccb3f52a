"""Does a style LoRA on a demo base learn the style, and how much does it leak?

Used by the learning test (tests/test_demo_bases.py) and benchmarks/demo_quality.py:

- held-out denoising loss on style images (trigger captions), base vs base + LoRA,
  with the same noise and timesteps (a fixed generator per measurement);
- the same on plain scenes with plain captions (leakage: should not change much);
- colour histograms of generations, same prompts and seeds with and without the
  LoRA: how far they move towards the style set's histogram (``progress`` 1.0 =
  all the way), and how far plain-prompt generations move (leakage).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

BINS = 8  # per RGB channel: 512-bin joint histograms


def color_histogram(images) -> np.ndarray:
    """Normalised joint RGB histogram of a set of images."""
    counts = np.zeros(BINS**3)
    for image in images:
        q = (np.asarray(image.convert("RGB"), np.int64) * BINS) // 256
        counts += np.bincount(((q[..., 0] * BINS + q[..., 1]) * BINS + q[..., 2]).ravel(), minlength=BINS**3)
    return counts / counts.sum()


def histogram_progress(before, after, target) -> float:
    """Share of the L1 histogram distance to ``target`` that ``after`` closed, from ``before``."""
    hb, ha, ht = color_histogram(before), color_histogram(after), color_histogram(target)
    start = float(np.abs(hb - ht).sum())
    return (start - float(np.abs(ha - ht).sum())) / start if start > 0 else 0.0


def histogram_distance(a, b) -> float:
    """Half the L1 distance between two sets' histograms (0 = same colours, 1 = disjoint)."""
    return 0.5 * float(np.abs(color_histogram(a) - color_histogram(b)).sum())


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


@torch.no_grad()
def denoising_loss(base, images: list[Image.Image], captions: list[str], repeats: int = 8, seed: int = 0) -> float:
    """Mean training loss of ``base`` on (image, caption) pairs, with fixed noise and timesteps."""
    handler, pipe = base.handler, base.pipe
    latents = handler.encode_image(pipe, _pixels(images).to(base.device)).to(base.device)
    texts = handler.encode_text(pipe, captions)
    cond = {k: torch.stack([t[k] for t in texts]).to(base.device) for k in texts[0]}
    if base.arch == "sdxl":
        cond["time_ids"] = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32).expand(len(images), -1)
    scheduler = handler.training_scheduler(pipe)
    generator = torch.Generator().manual_seed(seed)
    denoiser = base.denoiser
    losses = [float(handler.loss(pipe, denoiser, scheduler, latents, cond, generator)) for _ in range(repeats)]
    return float(np.mean(losses))


@torch.no_grad()
def generate(base, prompts: list[str], seed: int = 0, steps: int | None = None, guidance: float | None = None):
    """One 64 px image per prompt at the base's studio.json defaults; prompt i uses seed ``seed + i``."""
    defaults = base.sampling_defaults()
    guidance = guidance if guidance is not None else defaults.get("guidance", 5.0)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = base.pipe(prompt=prompts, num_inference_steps=steps or defaults.get("steps", 20), height=64, width=64,
                    generator=gens, **base.sampling_kwargs(guidance, batch=len(prompts)))
    return out.images


def heldout_sets(style: str, n: int, seed: int, trigger: str):
    """(style images, trigger captions, plain images, plain captions) of ``n`` unseen scenes."""
    import random

    from trainer.demo_data import caption, render, sample_spec, stylize

    rng = random.Random(seed)
    specs, captions = [], []
    for _ in range(n):
        specs.append(sample_spec(rng))
        captions.append(caption(specs[-1], rng))
    styled = [stylize(s, style) for s in specs]
    plain = [render(s) for s in specs]
    return styled, [f"{trigger}, {c}" for c in captions], plain, captions


def learning_report(base_name: str, lora_file, style: str = "sepia-outline", trigger: str = "zkstyle",
                    n: int = 8, seed: int = 1000, steps: int | None = None, guidance: float | None = None) -> dict:
    """Base vs base + LoRA on ``n`` held-out scenes (seed ``seed``, unseen by the LoRA).

    Keys: ``style_loss``/``plain_loss`` (before, after, change: -0.3 = 30 % lower),
    ``style_histogram_progress`` (trigger prompts: share of the way to the style
    set's colours), ``plain_histogram_shift`` (plain prompts: histogram distance
    with vs without LoRA, 0..1) and, for scale, ``style_vs_plain_distance``.
    """
    from trainer.config import Precision
    from trainer.models import load_base

    styled, style_caps, plain, plain_caps = heldout_sets(style, n, seed, trigger)
    base = load_base(base_name, Precision.FP32, "cpu")

    def measure():
        return {"style_loss": denoising_loss(base, styled, style_caps), "plain_loss": denoising_loss(base, plain, plain_caps),
                "style_images": generate(base, style_caps, seed, steps, guidance),
                "plain_images": generate(base, plain_caps, seed, steps, guidance)}

    before = measure()
    base.pipe.load_lora_weights(str(lora_file), adapter_name="style")
    after = measure()

    def change(key):
        return {"before": before[key], "after": after[key], "change": after[key] / before[key] - 1.0}

    return {
        "style_loss": change("style_loss"), "plain_loss": change("plain_loss"),
        "style_histogram_progress": histogram_progress(before["style_images"], after["style_images"], styled),
        "plain_histogram_shift": histogram_distance(before["plain_images"], after["plain_images"]),
        "style_vs_plain_distance": histogram_distance(styled, plain),
        "images": {"before": before, "after": after},
    }
