"""One optimizer step of LoRA training: what ``loop.run_training`` repeats and ``benchmarks/ours.py`` times.

Kept apart from the loop (events, checkpoints, samples) so the benchmark measures the
trainer's real step, not a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from trainer.distributed import Dist
from trainer.models.knobs import attention_context

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
        with parts.dist.no_sync(parts.forward, skip=micro < parts.grad_accum - 1), attention_context(parts.attention):
            loss = parts.handler.loss(parts.pipe, parts.denoiser, parts.noise_scheduler, latents, cond, parts.generator,
                                      shard=parts.dist.shard, forward=parts.forward) / parts.grad_accum
            loss.backward()
        total += float(loss.detach())
    total = parts.dist.mean(total)  # the global-batch loss, as one process would see it
    limit = parts.max_grad_norm if parts.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parts.params, limit))
    check(total, grad_norm)
    parts.optimizer.step()
    parts.lr_scheduler.step()
    return total, grad_norm
