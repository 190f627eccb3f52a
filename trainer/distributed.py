"""One run on several processes through accelerate (DDP); a no-op for a single process.

Launch with ``accelerate launch -m trainer train …`` or ``torchrun -m trainer train …``
(or ``python -m trainer train --num-processes N``). Each process holds the frozen
base and computes its share of every global batch; accelerate's DDP wrapper
averages the LoRA gradients. Only the main process writes events, samples,
checkpoints and exports; the others wait at barriers.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from trainer.errors import UnsupportedError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    accelerator: Optional[object] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to call for forward/backward: DDP-wrapped when distributed."""
        if self.accelerator is None:
            return model
        return self.accelerator.prepare_model(model, device_placement=False)

    def mean(self, value: float) -> float:
        if self.accelerator is None:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device, dtype=torch.float64)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (a stop request must end all ranks at the same step)."""
        if self.accelerator is None:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(tensor, reduction="sum") > 0)

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
        if self.accelerator is None or not skip:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def device(self, requested: str) -> str:
        return str(self.accelerator.device) if self.accelerator is not None else requested


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(requested_device: str) -> Dist:
    """A :class:`Dist` for this process; creates an ``Accelerator`` only when launched on several processes."""
    if world_size_from_env() <= 1:
        return Dist()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    accelerator = Accelerator(cpu=requested_device == "cpu" or not torch.cuda.is_available())
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UnsupportedError(
            f"{accelerator.distributed_type.value} is not supported yet: use plain multi-GPU (DDP) in your accelerate "
            f"config; every process then holds the frozen base (NF4 keeps that small)"
        )
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator)
