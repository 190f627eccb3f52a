"""Built models of one benchmark row and the synthetic data that feeds them.

Precisions follow ``trainer/models``: fp32 / fp16 / bf16 weights, or NF4 double-quant linears
with the rest in the compute dtype (bf16 on CUDA, fp32 on CPU, as ``trainer/quant.py`` does).
Synthetic data stands in for a dataset: pixels in [-1, 1] and token ids for the reference step
(which encodes every step, as the diffusers examples do), cached latents and text embeddings of
the right shapes for ours (as ``trainer/loop.py``'s cache holds them: on the CPU, fp32 latents).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from benchmarks.archs import ArchSpec, materialize, materialize_nf4

PRECISIONS = ("fp32", "bf16", "fp16", "nf4")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    """dtype of the non-quantized weights (and the NF4 compute dtype)."""
    if precision == "nf4":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


@dataclass
class Parts:
    """The models of one row; encoders only where the step needs them (or they are kept resident)."""

    spec: ArchSpec
    precision: str
    device: torch.device
    denoiser: torch.nn.Module
    vae: torch.nn.Module | None = None
    text_encoders: list[torch.nn.Module] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return weight_dtype(self.precision, self.device)

    def pipe(self):
        """The few pipeline attributes trainer/models' handlers read (``pipe.scheduler``, ``vae_scale_factor``)."""
        from trainer.models import ARCH_HANDLERS

        attr = ARCH_HANDLERS[self.spec.arch].denoiser_attr
        return SimpleNamespace(**{attr: self.denoiser}, scheduler=sampling_scheduler(self.spec),
                               vae_scale_factor=self.spec.vae_scale_factor)

    def release(self) -> None:
        self.denoiser = self.vae = None
        self.text_encoders = []
        free_memory(self.device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sampling_scheduler(spec: ArchSpec):
    import diffusers

    cls = "FlowMatchEulerDiscreteScheduler" if spec.arch == "flux" else "EulerDiscreteScheduler"
    return getattr(diffusers, cls).from_config(spec.sampler)


def build_parts(spec: ArchSpec, precision: str, device: torch.device, vae: bool = False, text_encoders: bool = False,
                vae_dtype: torch.dtype | None = None, seed: int = 0) -> Parts:
    """Random-weight models for a row (see :mod:`benchmarks.archs`): the denoiser, plus the VAE / text encoders if asked."""
    dtype = weight_dtype(precision, device)
    if precision == "nf4":
        denoiser = materialize_nf4(spec.denoiser.instantiate(), device, dtype, seed)
    else:
        denoiser = materialize(spec.denoiser.instantiate(), device, dtype, seed)
    parts = Parts(spec, precision, device, denoiser.eval())
    if vae:
        parts.vae = materialize(spec.vae.instantiate(), device, vae_dtype or dtype, seed + 1).eval()
    if text_encoders:
        parts.text_encoders = [materialize(c.instantiate(), device, dtype, seed + 2 + i).eval()
                               for i, c in enumerate(spec.text_encoders)]
    return parts


def synthetic_images(spec: ArchSpec, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3, spec.resolution, spec.resolution), generator=g) * 2 - 1


def synthetic_token_ids(spec: ArchSpec, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """One id tensor per text encoder (77 for CLIP, ``spec.text_len`` for T5)."""
    g = torch.Generator().manual_seed(seed)
    ids = []
    for comp in spec.text_encoders:
        length = spec.text_len if comp.cls == "T5EncoderModel" else comp.config.get("max_position_embeddings", 77)
        ids.append(torch.randint(3, comp.config["vocab_size"], (batch, length), generator=g))
    return ids


def bucket_shapes(spec: ArchSpec, buckets: int) -> list[tuple[int, int]]:
    """``buckets`` latent (height, width) pairs of about the spec's area: square first, then wider and taller
    ones in turn, each side a multiple of what the denoiser downsamples by (FLUX packs 2×2 patches)."""
    side = spec.latent_shape[1]
    unit = 2 if spec.arch == "flux" else 2 ** (len(spec.denoiser.config["block_out_channels"]) - 1)
    shapes = []
    for i in range(buckets):
        k = (i + 1) // 2 * unit
        shapes.append((side - k, side + k) if i % 2 else (side + k, side - k))
    if min(min(shape) for shape in shapes) < unit:
        raise ValueError(f"{spec.key}: {buckets} buckets do not fit a {side}-latent side (step {unit})")
    return shapes


def synthetic_cache(spec: ArchSpec, batch: int, dtype: torch.dtype, seed: int = 0,
                    shape: tuple[int, int] | None = None):
    """Cached latents (fp32, CPU) and conditioning (CPU, text in the encoders' dtype), as loop.Cache holds them.

    ``shape``: latent (height, width) of an aspect bucket; square at the spec's resolution by default.
    """
    g = torch.Generator().manual_seed(seed)
    channels, height, width = spec.latent_shape
    height, width = shape or (height, width)
    latents = torch.randn((batch, channels, height, width), generator=g)
    cond = {}
    for key, cond_shape in spec.cond_shapes().items():
        if key == "time_ids":
            h, w = float(height * spec.vae_scale_factor), float(width * spec.vae_scale_factor)
            cond[key] = torch.tensor([[h, w, 0.0, 0.0, h, w]] * batch)
        else:
            cond[key] = torch.randn((batch, *cond_shape), generator=g).to(dtype)
    return latents, cond
