"""``python -m trainer export``: write a run's latest checkpoint in a chosen layout.

Useful after a stopped or interrupted run, or to get one more layout later.
``comfy`` is the layout ComfyUI's LoraLoader takes for every architecture: the
kohya keys for SD1.5/SDXL and the fused BFL keys for FLUX (see DESIGN.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from trainer.bases import parse_base
from trainer.checkpoint import checkpoint_dirs
from trainer.config import load_config
from trainer.errors import UserError
from trainer.export import (adapter_metadata, from_peft_state_dict, read_metadata, save_safetensors, to_diffusers,
                            to_flux_fused, to_kohya)
from trainer.models import ARCH_HANDLERS, demo_folder

FILE_NAMES = {"kohya": "lora.safetensors", "diffusers": "lora_diffusers.safetensors", "comfy": "lora_comfy.safetensors"}


def _flux_dims(base: str) -> tuple[int, int]:
    ref = parse_base(base)
    folder = demo_folder(ref) if ref.kind in ("demo", "demo-random") else Path(ref.value)
    config_path = folder / "transformer" / "config.json"
    if not config_path.is_file():
        inner = 3072  # FLUX.1 dev/schnell
    else:
        cfg = json.loads(config_path.read_text())
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return inner, 4 * inner


def reexport(run: str | Path, fmt: str) -> list[Path]:
    run = Path(run)
    config = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    checkpoints = checkpoint_dirs(run)
    if config is None or not checkpoints:
        raise UserError(f"{run} is not a run folder with a checkpoint (expected config.yaml and checkpoints/step-*)")
    arch = parse_base(config.base).arch or read_metadata(run / "lora.safetensors").get("studio.arch", "")
    if arch not in ARCH_HANDLERS:
        raise UserError(f"cannot tell the architecture of {run}'s base {config.base!r}")
    weights = from_peft_state_dict(load_file(str(checkpoints[-1] / "adapter.safetensors")), config.rank, config.alpha)
    previous = run / "lora.safetensors"
    metadata = read_metadata(previous) if previous.is_file() else {}
    metadata.pop("format", None)
    metadata["ss_steps"] = checkpoints[-1].name.split("-")[-1].lstrip("0") or "0"
    handler = ARCH_HANDLERS[arch]
    if fmt == "diffusers":
        tensors = to_diffusers(weights, handler.peft_prefix)
        metadata["lora_adapter_metadata"] = adapter_metadata(weights, handler.peft_prefix)
    elif arch == "flux":
        tensors = to_flux_fused(weights, *_flux_dims(config.base))
    else:
        tensors = to_kohya(weights)
    return [save_safetensors(run / FILE_NAMES[fmt], tensors, metadata)]
