"""Resumable checkpoints: adapter weights + optimizer, LR schedule and RNG state.

Layout: ``<run>/checkpoints/step-000100/{adapter.safetensors, state.pt}``. A
checkpoint folder is written under a temp name and renamed when complete, so
a killed process never leaves a half checkpoint that resume would pick up.
``state.pt`` holds only tensors and plain containers (``weights_only`` loading).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from trainer.errors import WriteError

if TYPE_CHECKING:  # torch is imported where it is used, so listing checkpoints stays cheap (queue, UI)
    import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class TrainState:
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    lr_scheduler: dict
    generator: torch.Tensor
    scaler: dict | None = None  # fp16 loss scaling (trainer.step.grad_scaler); None for other precisions


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint at ``step`` (it may not exist)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def checkpoint_step(path: Path) -> int:
    """The step of a :func:`checkpoint_path` folder."""
    return int(_STEP_DIR.match(Path(path).name).group(1))


def fewer_steps(what: str, checkpoint: Path | str, steps: int) -> str:
    """Why a resume to ``steps`` in all is refused, "" when it is not: a total below the checkpoint's step would
    record a run that trained past its own length (its exports would say "6 of 3 steps"). The CLI, the queue and
    the loop refuse by this one rule (the web app's "Train on to step" asks for more than the steps trained)."""
    trained = checkpoint_step(Path(checkpoint))
    if steps >= trained:
        return ""
    return f"{what} has trained {trained} steps: --steps {steps} is fewer; give at least {trained} (more trains it on)"


def fewer_steps_in(run_dir: Path, steps: int) -> str:
    """:func:`fewer_steps` for a run folder's newest checkpoint ("" when it has none)."""
    checkpoints = checkpoint_dirs(run_dir)
    return fewer_steps(Path(run_dir).name, checkpoints[-1], steps) if checkpoints else ""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / "state.pt").is_file() and (p / "adapter.safetensors").is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, state: TrainState, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    final = checkpoint_path(run_dir, state.step)
    root = final.parent
    tmp = root / f".tmp-step-{state.step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.adapter.items()}, str(tmp / "adapter.safetensors"))
        torch.save({"step": state.step, "optimizer": state.optimizer, "lr_scheduler": state.lr_scheduler,
                    "generator": state.generator, "scaler": state.scaler}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError ("unexpected pos")
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise WriteError(f"saving checkpoint step {state.step} failed ({reason}); the disk may be full. "
                         f"Earlier checkpoints are intact; free space and resume with --resume") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict:
    """A checkpoint's ``state.pt`` alone (step, optimizer, schedule, RNG, scaler): no adapter weights read."""
    import torch

    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)


def load_checkpoint(path: Path) -> TrainState:
    from safetensors.torch import load_file

    raw = load_state(path)
    return TrainState(step=int(raw["step"]), adapter=load_file(str(Path(path) / "adapter.safetensors")),
                      optimizer=raw["optimizer"], lr_scheduler=raw["lr_scheduler"], generator=raw["generator"],
                      scaler=raw.get("scaler"))
