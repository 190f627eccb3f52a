"""One optimizer step of LoRA training: what ``loop.run_training`` repeats and ``benchmarks/ours.py`` times.

Kept apart from the loop (events, checkpoints, samples) so the benchmark measures the
trainer's real step, not a copy of it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from trainer.distributed import Dist
from trainer.models.knobs import compute_context
from trainer.objective import Objective

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class StepParts:
    """What a step needs and keeps between steps (the optimizer and generator carry state)."""

    handler: object           # the architecture handler (its ``loss``)
    pipe: object              # the pipeline (schedulers, VAE scale factor)
    denoiser: torch.nn.Module  # the bare model, for its attributes
    forward: torch.nn.Module  # what to call: the denoiser, or its DDP wrapper
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    params: list[torch.nn.Parameter]
    generator: torch.Generator  # noise, timesteps (and the caller's caption dropout): one checkpointed stream
    dist: Dist
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    attention: str = "sdpa"
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 bases: see :func:`grad_scaler`
    compute_dtype: Optional[torch.dtype] = None  # adapter_dtype bf16: the step runs under autocast to it
    objective: Objective = Objective()  # noise offset / Min-SNR-γ (SD1.5/SDXL)


def grad_scaler(precision: str, device: torch.device, sharded: bool = False) -> Optional[torch.amp.GradScaler]:
    """Loss scaling for an fp16 base (None otherwise), as mixed-precision training always pairs with fp16.

    The base's activations are fp16 while the LoRA weights and their gradients are fp32. Without scaling,
    the backward pass carries per-element gradients of about 1/latent-size through fp16, where the small ones
    round to zero: the LoRA gradients came out 7 % (SD1.5 at 512 px) to 20 % (SDXL at 1024 px) wrong while
    the loss looked fine. bf16 has fp32's exponent range and needs none.
    """
    if precision != "fp16":
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def train_step(parts: StepParts, fetch: Callable[[int], Batch], step: int, check: Callable[[float, float], None],
               on_oom: Optional[Callable[[], None]] = None) -> tuple[float, float]:
    """Run optimizer step ``step`` (0-based): micro-batches ``fetch(step·grad_accum + k)``, returns (loss, grad norm).

    ``check(loss, grad_norm)`` runs after clipping and before the optimizer touches the weights, so
    it can refuse a NaN step by raising. ``on_oom``: called once if the step raises CUDA
    out-of-memory (to turn gradient checkpointing on); the step is then redone from the same
    generator state, so the run continues exactly as if it had been on from the start.
    """
    state = parts.generator.get_state() if on_oom is not None else None
    try:
        return _step(parts, fetch, step, check)
    except torch.OutOfMemoryError:
        if on_oom is None:
            raise
    # outside the except block, so the failed step's activations (held by the traceback) are gone
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.scaler is not None:  # an OOM after unscale_ (clipping, the first AdamW step) left it "unscaled"
        parts.scaler._per_optimizer_states.clear()  # a defaultdict: the redone step starts from a fresh stage
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    parts.generator.set_state(state)
    on_oom()
    return _step(parts, fetch, step, check)


def _step(parts: StepParts, fetch: Callable[[int], Batch], step: int,
          check: Callable[[float, float], None]) -> tuple[float, float]:
    parts.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(parts.grad_accum):
        latents, cond = fetch(step * parts.grad_accum + micro)
        with parts.dist.no_sync(parts.forward, skip=micro < parts.grad_accum - 1), \
                compute_context(latents.device.type, parts.attention, parts.compute_dtype):
            loss = parts.handler.loss(parts.pipe, parts.denoiser, parts.noise_scheduler, latents, cond, parts.generator,
                                      shard=parts.dist.shard, forward=parts.forward,
                                      objective=parts.objective) / parts.grad_accum
            (loss if parts.scaler is None else parts.scaler.scale(loss)).backward()
        total += float(loss.detach())
    total = parts.dist.mean(total)  # the global-batch loss, as one process would see it
    if parts.scaler is not None:
        parts.scaler.unscale_(parts.optimizer)  # clip and check the true gradients
    limit = parts.max_grad_norm if parts.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parts.params, limit))
    if parts.scaler is None:
        check(total, grad_norm)
        parts.optimizer.step()
    else:
        # An inf/NaN gradient with a finite loss is the scale overflowing fp16: the scaler skips this update and
        # halves its scale. Only a non-finite loss is divergence.
        check(total, grad_norm if math.isfinite(grad_norm) else 0.0)
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    if parts.scaler is None or math.isfinite(grad_norm):
        # a step the scaler skipped (fp16 overflow) leaves the schedule where it is, as accelerate's scheduler
        # wrapper does: else the scaler's first calibration steps would use up warmup without an update
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            parts.lr_scheduler.step()
    return total, grad_norm
