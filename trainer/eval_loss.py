"""A fixed-noise loss: the same images, noise and timesteps at every evaluation, so its curve shows progress.

The training loss jumps with each step's random timestep (a high-noise step is easy, a low-noise one hard),
which hides whether the LoRA is still learning. Evaluated on fixed draws, the loss changes only because the
weights did. It uses the training images (an artist's 10-30 images are too few to hold some out), so it
measures fit, not generalization, and always uses the plain objective (no offset noise, Min-SNR weights or
logit-normal timesteps), so runs with different options stay comparable.
"""

from __future__ import annotations

from typing import Optional

import torch

from trainer.models.knobs import compute_context

EVAL_IMAGES = 8  # the first images, by dataset order
EVAL_DRAWS = 4  # noise/timestep draws per image: 32 samples, a few steps' worth of compute

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]


def eval_batches(latents: list[torch.Tensor], conditioning: list[dict[str, torch.Tensor]],
                 buckets: list[tuple[int, int]], batch_size: int, limit: int = EVAL_IMAGES) -> list[Batch]:
    """The first ``limit`` images in batches of at most ``batch_size``, one bucket size each: (latents,
    conditioning) on the CPU."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(min(limit, len(latents))):
        groups.setdefault(buckets[i], []).append(i)
    chunks = [ids[start:start + batch_size] for ids in groups.values() for start in range(0, len(ids), batch_size)]
    return [(torch.stack([latents[i] for i in ids]),
             {key: torch.stack([conditioning[i][key] for i in ids]) for key in conditioning[ids[0]]})
            for ids in chunks]


@torch.no_grad()
def fixed_noise_loss(handler, pipe, denoiser: torch.nn.Module, noise_scheduler, batches: list[Batch], seed: int,
                     device: torch.device, attention: str = "sdpa", compute_dtype: Optional[torch.dtype] = None,
                     draws: int = EVAL_DRAWS) -> float:
    """Mean loss over ``batches`` × ``draws``, from a generator of its own (the run's stream is untouched).

    ``denoiser`` is called directly (not a DDP wrapper); under FSDP every process must call this together.
    """
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    was_training = denoiser.training
    denoiser.eval()
    try:
        for latents, cond in batches:
            latents = latents.to(device)
            cond = {key: value.to(device) for key, value in cond.items()}
            for _ in range(draws):
                with compute_context(device.type, attention, compute_dtype):
                    loss = handler.loss(pipe, denoiser, noise_scheduler, latents, cond, generator)
                total += float(loss) * latents.shape[0]
                count += latents.shape[0]
    finally:
        denoiser.train(was_training)
    return total / count
