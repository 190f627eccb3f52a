"""Our training step: what ``trainer/loop.py`` runs per step, plus the optimization knobs under test.

The adapter, optimizer and loss are the trainer's own (``loop.inject_lora``, ``loop.make_optimizer``,
the arch handler's ``loss``), on cached latents and text embeddings; the step body mirrors
``loop._train``'s (zero_grad, loss, backward, ``float(loss)``, grad clipping with a finiteness
check, optimizer and LR-scheduler step). The knobs are not in the engine yet; each is applied
here the way the engine would apply it (see docs/benchmarks.md, "Proposed engine changes"):

- ``compile``: regional ``torch.compile`` of the repeated blocks (diffusers' ``compile_repeated_blocks``:
  FLUX double/single blocks, UNet ``BasicTransformerBlock``), static shapes;
- ``channels_last``: UNet weights (and so conv activations) in NHWC;
- ``grad_ckpt``: ``on``/``off``, or ``auto`` = on for NF4 (the reason to pick NF4 is a small GPU),
  else off unless the step runs out of memory or over ``--vram-budget-gb`` (the harness retries);
- ``attn``: ``sdpa`` (diffusers' default), ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient`` (one
  PyTorch SDPA kernel forced), ``xformers`` (when installed) or ``flash`` (flash-attn package, FLUX);
- ``offload_encoders``: VAE and text encoders are not resident during training (the cache replaces them);
- ``optimizer``: the trainer's choices (AdamW fused on CUDA, or bitsandbytes 8-bit / paged 8-bit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from benchmarks.parts import Parts, synthetic_cache

ATTENTION = ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "xformers", "flash")


@dataclass(frozen=True)
class Options:
    compile: bool = False
    channels_last: bool = False
    grad_ckpt: str = "auto"  # auto | on | off
    attn: str = "sdpa"
    offload_encoders: bool = True
    optimizer: str = "adamw"  # adamw (fused on CUDA) | adamw8bit | paged_adamw8bit (bitsandbytes, CUDA)

    def resolved_ckpt(self, precision: str) -> bool:
        return self.grad_ckpt == "on" or (self.grad_ckpt == "auto" and precision == "nf4")

    def variant(self, arch: str) -> str:
        """Short label of the knobs set beyond the harness defaults ("default"); variants' rows coexist."""
        knobs = [name for name, on in (("compile", self.compile), ("channels_last", self.channels_last and arch != "flux"),
                                       ("keep_encoders", not self.offload_encoders)) if on]
        knobs += [f"ckpt-{self.grad_ckpt}"] if self.grad_ckpt != "auto" else []
        knobs += [self.attn] if self.attn != "sdpa" else []
        knobs += [self.optimizer] if self.optimizer != "adamw" else []
        return "+".join(knobs) or "default"

    def describe(self, ckpt: bool) -> dict:
        return {**dataclasses.asdict(self), "grad_ckpt": f"{'on' if ckpt else 'off'} ({self.grad_ckpt})",
                "cache": True, "fused_adamw": None, "autocast": False}


def attention_context(attn: str):
    """A context manager that forces one PyTorch SDPA kernel, or a null context."""
    if not attn.startswith("sdpa-"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[attn]
    return sdpa_kernel([backend])


def apply_attention(denoiser: torch.nn.Module, attn: str) -> None:
    if attn not in ATTENTION:
        raise ValueError(f"attn={attn!r}: use one of {', '.join(ATTENTION)}")
    if attn == "xformers":
        denoiser.enable_xformers_memory_efficient_attention()
    elif attn == "flash":
        if not any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in denoiser.modules()):
            raise ValueError("attn=flash applies to FLUX only: UNet attention processors call SDPA directly "
                             "(use sdpa-flash there)")
        denoiser.set_attention_backend("flash")


class OursStep:
    """One training step of ours on ``parts`` (LoRA rank ``rank``, alpha 2r, the ``style`` targets)."""

    name = "ours"

    def __init__(self, parts: Parts, rank: int, options: Options, batch: int = 1, seed: int = 0,
                 grad_ckpt: bool | None = None):
        from diffusers.optimization import get_scheduler

        from trainer.bases import BaseRef
        from trainer.config import Precision, TrainConfig
        from trainer.loop import inject_lora, make_optimizer
        from trainer.models import ARCH_HANDLERS, LoadedBase

        spec, device = parts.spec, parts.device
        self.parts, self.options = parts, options
        self.ckpt = options.resolved_ckpt(parts.precision) if grad_ckpt is None else grad_ckpt
        self.handler = ARCH_HANDLERS[spec.arch]
        self.pipe = parts.pipe()
        base = LoadedBase(ref=BaseRef(kind="demo-random", value=spec.key, arch=spec.arch), arch=spec.arch,
                          pipe=self.pipe, precision=Precision(parts.precision), device=device)
        self.config = TrainConfig(rank=rank, alpha=2.0 * rank, targets="style", precision=Precision(parts.precision),
                                  gradient_checkpointing=self.ckpt, seed=seed, batch_size=batch, device=str(device),
                                  optimizer=options.optimizer)
        denoiser = parts.denoiser
        if options.channels_last and spec.arch != "flux":
            denoiser.to(memory_format=torch.channels_last)
        apply_attention(denoiser, options.attn)
        self.modules = inject_lora(base, self.config)
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.config, self.params, device)
        self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=0,
                                          num_training_steps=10**9)
        self.noise_scheduler = self.handler.training_scheduler(self.pipe)
        self.generator = torch.Generator().manual_seed(seed)
        self.latents, self.cond = synthetic_cache(spec, batch, parts.dtype, seed)
        if options.compile:
            denoiser.compile_repeated_blocks(dynamic=False)
        denoiser.train()
        self.attn_context = lambda: attention_context(options.attn)
        self.fused = any(g.get("fused") for g in self.optimizer.param_groups)

    def describe(self) -> dict:
        return {**self.options.describe(self.ckpt), "fused_adamw": bool(self.fused),
                "channels_last": self.options.channels_last and self.parts.spec.arch != "flux"}

    def __call__(self) -> float:
        device, denoiser = self.parts.device, self.parts.denoiser
        self.optimizer.zero_grad(set_to_none=True)
        latents = self.latents.to(device)  # loop._batch: the cache lives on the CPU
        cond = {k: v.to(device) for k, v in self.cond.items()}
        with self.attn_context():
            loss = self.handler.loss(self.pipe, denoiser, self.noise_scheduler, latents, cond, self.generator)
            loss.backward()
        total = float(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        finite = math.isfinite(total) and math.isfinite(float(grad_norm))
        self.optimizer.step()
        self.lr_scheduler.step()
        return total if finite else float("nan")
