"""Our training step: the trainer's own ``trainer.step.train_step``, set up as ``trainer/loop.py`` sets it up.

The adapter (``loop.inject_lora``), optimizer (``loop.make_optimizer``), knobs
(``models.knobs.prepare_denoiser``) and the step itself are the engine's; only the data is
synthetic: cached latents and text embeddings of the right shapes, kept on the CPU and copied
per step as ``loop._batch`` does. The options are the engine's ``TrainConfig`` knobs:

- ``compile``: ``compile: regional`` (diffusers' ``compile_repeated_blocks``);
- ``channels_last``: ``channels_last: true`` (UNet convolutions in NHWC; nothing to do for FLUX);
- ``grad_ckpt``: ``gradient_checkpointing`` auto | on | off (auto: off on CPU; on a GPU off until a
  step runs out of memory, then on; the harness can also turn it on over ``--vram-budget-gb``);
- ``attn``: ``attention`` sdpa | flash (PyTorch's FlashAttention kernel) | xformers;
- ``offload_frozen``: ``offload_frozen`` (VAE and text encoders not resident during training);
- ``optimizer``: the trainer's choices (AdamW fused on CUDA, or bitsandbytes 8-bit / paged 8-bit);
- ``buckets``: steps cycle through that many aspect-ratio buckets of about the same area, as a dataset
  of mixed shapes does (each new shape costs a recompile with ``compile``; eager should not care).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from benchmarks.parts import Parts, bucket_shapes, synthetic_cache

ATTENTION = ("sdpa", "flash", "xformers")  # = trainer.config.ATTENTION_KERNELS


@dataclass(frozen=True)
class Options:
    compile: bool = False
    channels_last: bool = False
    grad_ckpt: str = "auto"  # auto | on | off
    attn: str = "sdpa"
    offload_frozen: bool = True
    optimizer: str = "adamw"  # adamw (fused on CUDA) | adamw8bit | paged_adamw8bit (bitsandbytes, CUDA)
    buckets: int = 1  # aspect-ratio buckets the steps cycle through (1: one square shape)
    compile_backend: str = "inductor"  # tests: aot_eager

    def resolved_ckpt(self, device: torch.device) -> bool:
        """Checkpointing at the start, by the engine's rule (``models.knobs.checkpointing_plan``)."""
        from trainer.models.knobs import checkpointing_plan

        return checkpointing_plan(self.grad_ckpt, device)[0]

    def variant(self, arch: str) -> str:
        """Short label of the knobs set beyond the engine defaults ("default"); variants' rows coexist."""
        knobs = [name for name, on in (("compile", self.compile), ("channels_last", self.channels_last and arch != "flux"),
                                       ("keep_encoders", not self.offload_frozen)) if on]
        knobs += [f"ckpt-{self.grad_ckpt}"] if self.grad_ckpt != "auto" else []
        knobs += [self.attn] if self.attn != "sdpa" else []
        knobs += [self.optimizer] if self.optimizer != "adamw" else []
        knobs += [f"buckets{self.buckets}"] if self.buckets > 1 else []
        return "+".join(knobs) or "default"

    def config_values(self) -> dict:
        """The TrainConfig fields these options stand for."""
        return {"compile": "regional" if self.compile else "off", "channels_last": self.channels_last,
                "attention": self.attn, "offload_frozen": self.offload_frozen, "optimizer": self.optimizer}


class OursStep:
    """One training step of ours on ``parts`` (LoRA rank ``rank``, alpha 2r, the ``style`` targets)."""

    name = "ours"

    def __init__(self, parts: Parts, rank: int, options: Options, batch: int = 1, seed: int = 0,
                 grad_ckpt: bool | None = None):
        from diffusers.optimization import get_scheduler

        from trainer.bases import BaseRef
        from trainer.config import Precision, make_config
        from trainer.distributed import Dist
        from trainer.loop import inject_lora, make_optimizer
        from trainer.models import ARCH_HANDLERS, LoadedBase
        from trainer.models.knobs import checkpointing_plan, prepare_denoiser
        from trainer.step import StepParts, grad_scaler

        spec, device = parts.spec, parts.device
        self.parts, self.options = parts, options
        self.ckpt = options.resolved_ckpt(device) if grad_ckpt is None else grad_ckpt
        self.ckpt_reason = options.grad_ckpt
        self.retry_oom = not self.ckpt and checkpointing_plan(options.grad_ckpt, device)[1]
        self.handler = ARCH_HANDLERS[spec.arch]
        self.pipe = parts.pipe()
        base = LoadedBase(ref=BaseRef(kind="demo-random", value=spec.key, arch=spec.arch), arch=spec.arch,
                          pipe=self.pipe, precision=Precision(parts.precision), device=device)
        self.config = make_config({"rank": rank, "alpha": 2.0 * rank, "targets": "style", "precision": parts.precision,
                                   "gradient_checkpointing": "on" if self.ckpt else "off", "seed": seed,
                                   "batch_size": batch, "device": device.type, **options.config_values()})
        denoiser = parts.denoiser
        self.modules = inject_lora(base, self.config)
        prepare_denoiser(base, self.config, compile_backend=options.compile_backend)
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.config, self.params, device)
        self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=0,
                                          num_training_steps=10**9)
        self.noise_scheduler = self.handler.training_scheduler(self.pipe)
        self.generator = torch.Generator().manual_seed(seed)
        self.caches = [synthetic_cache(spec, batch, parts.dtype, seed, shape)
                       for shape in bucket_shapes(spec, options.buckets)]
        self.step_parts = StepParts(handler=self.handler, pipe=self.pipe, denoiser=denoiser, forward=denoiser,
                                    noise_scheduler=self.noise_scheduler, optimizer=self.optimizer,
                                    lr_scheduler=self.lr_scheduler, params=self.params, generator=self.generator,
                                    dist=Dist(), max_grad_norm=self.config.max_grad_norm,
                                    attention=self.config.attention,
                                    scaler=grad_scaler(parts.precision, device))  # fp16: loss scaling, as the loop
        self.index = 0
        denoiser.train()
        self.fused = any(g.get("fused") for g in self.optimizer.param_groups)

    def describe(self) -> dict:
        return {**dataclasses.asdict(self.options), "grad_ckpt": f"{'on' if self.ckpt else 'off'} ({self.ckpt_reason})",
                "cache": True, "autocast": False, "fused_adamw": bool(self.fused),
                "loss_scaling": self.step_parts.scaler is not None,
                "channels_last": self.options.channels_last and self.parts.spec.arch != "flux"}

    def _fetch(self, index: int):
        device = self.parts.device  # loop._batch: the cache lives on the CPU and is copied per step
        latents, cond = self.caches[index % len(self.caches)]
        return latents.to(device), {k: v.to(device) for k, v in cond.items()}

    def _enable_checkpointing(self) -> None:
        """The engine's auto rule hit an out-of-memory step (``loop.py`` does the same)."""
        self.parts.denoiser.enable_gradient_checkpointing()
        self.ckpt, self.ckpt_reason, self.retry_oom = True, "auto: out of memory without", False

    def __call__(self) -> float:
        from trainer.step import train_step

        finite = []
        total, _ = train_step(self.step_parts, self._fetch, self.index,
                              check=lambda loss, norm: finite.append(math.isfinite(loss) and math.isfinite(norm)),
                              on_oom=self._enable_checkpointing if self.retry_oom else None)
        self.index += 1
        return total if finite[-1] else float("nan")
