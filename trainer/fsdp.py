"""FSDP2 (``fully_shard``) for a frozen base: each process keeps 1/N of the denoiser, LoRA trains as usual.

Chosen through accelerate's own FSDP config: ``accelerate launch --config_file fsdp.yaml`` sets the
environment read here (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``,
``FSDP_AUTO_WRAP_POLICY``, ``FSDP_TRANSFORMER_CLS_TO_WRAP``, ``FSDP_OFFLOAD_PARAMS``,
``FSDP_ACTIVATION_CHECKPOINTING``, ``ACCELERATE_MIXED_PRECISION``); under torchrun set them by hand.
The sharding itself is torch's ``fully_shard`` called here rather than ``accelerator.prepare``:
accelerate only turns FSDP on for GPUs, and one code path is what the CPU tests check.

Checkpoints and exports hold the *full* LoRA and optimizer state (gathered with ``full_tensor``), in
exactly the layout a single process writes, so a run resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from trainer.errors import UnsupportedError

_TRUE, _FALSE = ("true", "1", "full_shard"), ("false", "0", "shard_grad_op")


@dataclass(frozen=True)
class FsdpPlan:
    """The FSDP settings this trainer honours (docs/multi-gpu.md lists the ones it refuses)."""

    reshard_after_forward: bool = True  # FULL_SHARD; False keeps gathered blocks until backward (SHARD_GRAD_OP)
    wrap_classes: Optional[tuple[str, ...]] = None  # blocks sharded as units; None: the model's _no_split_modules


def plan_from_env(env: Mapping[str, str]) -> Optional[FsdpPlan]:
    """The FSDP plan accelerate's environment asks for; None when FSDP is off.

    Raises:
        UnsupportedError: settings not supported here, all listed at once with the value to use instead.
    """
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    problems = []
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        problems.append(f"fsdp_version: {version} → set fsdp_version: 2 (FSDP1 flattens frozen and trainable "
                        f"weights together; FSDP2 shards each weight, so the frozen base and the LoRA mix freely)")
    if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in _TRUE:
        problems.append("fsdp_offload_params: true is not supported yet → set it to false (shard over more GPUs)")
    if env.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() in _TRUE:
        problems.append("fsdp_activation_checkpointing: true → set it to false and pass --gradient-checkpointing on")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", ""):
        problems.append(f"mixed_precision: {precision} → set it to no and pass --precision {precision} "
                        f"(the base is loaded in that dtype, the LoRA stays fp32)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").upper()
    if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
        problems.append(f"fsdp_auto_wrap_policy: {policy} → use TRANSFORMER_BASED_WRAP (or NO_WRAP)")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in _TRUE + _FALSE:
        problems.append(f"fsdp_reshard_after_forward: {reshard} → use true or false")
    if problems:
        raise UnsupportedError("this accelerate FSDP config cannot be used: " + "; ".join(problems)
                               + " (docs/multi-gpu.md has a tested config)")
    classes = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
    wrap = () if policy == "NO_WRAP" else (tuple(classes) if classes else None)
    return FsdpPlan(reshard_after_forward=reshard in _TRUE, wrap_classes=wrap)


def refuse_quantized(model: torch.nn.Module) -> None:
    """NF4 weights are bitsandbytes ``Params4bit`` whose quant state does not survive sharding."""
    if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise UnsupportedError(
            "NF4 with FSDP is not supported: the 4-bit weights cannot be sharded. Use plain multi-GPU (DDP) in your "
            "accelerate config, where every GPU holds its own NF4 base, or FSDP with --precision bf16"
        )


def shard(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], plan: FsdpPlan, world: int,
          device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place across ``world`` processes; ``optimizer`` is moved onto the sharded parameters.

    Each block named by the plan becomes one unit (gathered for its forward, freed after), then the rest
    of the model forms the root unit. An optimizer built before sharding keeps working: its parameters
    and any loaded state (a resumed run) are swapped for the shards.

    Raises:
        UnsupportedError: NF4 weights, or wrap classes the model does not have.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    refuse_quantized(model)
    names = set(plan.wrap_classes if plan.wrap_classes is not None else getattr(model, "_no_split_modules", None) or ())
    units = [m for m in reversed(list(model.modules())) if m is not model and type(m).__name__ in names]
    if names and not units:
        blocks = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Block")})
        raise UnsupportedError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(sorted(names))}, which "
                               f"{type(model).__name__} does not have; its blocks are: {', '.join(blocks)}")
    mesh = init_device_mesh(device.type, (world,))
    before = dict(model.named_parameters())
    for unit in units:  # children before their parents, as fully_shard requires
        fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    fully_shard(model, mesh=mesh)
    if optimizer is not None:
        _move_optimizer(optimizer, before, dict(model.named_parameters()))
    return model


def _move_optimizer(optimizer: torch.optim.Optimizer, before: dict, after: dict) -> None:
    """Point the optimizer at the sharded parameters and shard its state (fully_shard made new ones)."""
    from torch.distributed.tensor import distribute_tensor

    new = {id(before[name]): after[name] for name in before}
    for group in optimizer.param_groups:
        group["params"] = [new[id(p)] for p in group["params"]]
    state = {}
    for old, values in optimizer.state.items():
        param = new[id(old)]
        state[param] = {
            key: distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if torch.is_tensor(value) and value.shape == param.shape and value.dim() > 0 else value
            for key, value in values.items()
        }
    optimizer.state.clear()
    optimizer.state.update(state)


def full_tensors(state: Mapping[str, object]) -> dict:
    """``state`` with every shard gathered into the full tensor; every process must call it (a collective)."""
    from torch.distributed.tensor import DTensor

    return {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in state.items()}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as a single process would write it; collective like :func:`full_tensors`."""
    raw = optimizer.state_dict()
    return {**raw, "state": {index: full_tensors(values) for index, values in raw["state"].items()}}


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module):
    """Accumulate unsharded gradients locally; the last micro-batch reduce-scatters their sum."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
