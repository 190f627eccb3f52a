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
from trainer.export import (ExportInfo, adapter_metadata, build_metadata, from_peft_state_dict, read_metadata,
                            save_safetensors, to_diffusers, to_flux_fused, to_kohya, training_record)
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


def _previous_metadata(path: Path) -> dict[str, str]:
    """The metadata of the run's earlier export; {} when there is none or it is unreadable (it gets rewritten)."""
    if not path.is_file():
        return {}
    try:
        return read_metadata(path)
    except UserError:
        return {}


def reexport(run: str | Path, fmt: str) -> list[Path]:
    run = Path(run)
    config = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    checkpoints = checkpoint_dirs(run)
    if config is None or not checkpoints:
        raise UserError(f"{run} is not a run folder with a checkpoint (expected config.yaml and checkpoints/step-*)")
    arch = parse_base(config.base).arch or _previous_metadata(run / "lora.safetensors").get("studio.arch", "")
    if arch not in ARCH_HANDLERS:
        raise UserError(f"cannot tell the architecture of {run}'s base {config.base!r}")
    latest = checkpoints[-1]
    try:
        state = load_file(str(latest / "adapter.safetensors"))
    except Exception as err:  # safetensors raises its own error type for a truncated or corrupt file
        earlier = f"; delete that folder to export the one before it ({checkpoints[-2].name})" if len(checkpoints) > 1 \
            else "; this run has no earlier checkpoint: resume or train it again"
        raise UserError(f"{latest.name}/adapter.safetensors is damaged ({str(err).splitlines()[0]}){earlier}") from None
    weights = from_peft_state_dict(state, config.rank, config.alpha)
    handler = ARCH_HANDLERS[arch]
    steps = int(latest.name.split("-")[-1])
    metadata = _previous_metadata(run / "lora.safetensors")
    if not metadata:  # no (readable) export yet, e.g. after an interrupted run: what the run's config tells
        metadata = build_metadata(ExportInfo(
            arch=arch, modelspec_architecture=handler.modelspec_architecture,
            base_model_version=handler.base_model_version, base=config.base, steps=steps,
            resolution=config.resolution, output_name=run.name, title=config.title or run.name, trigger=config.trigger,
            license=config.license, description=config.description, targets=config.targets,
            training=training_record(config)), weights)
    metadata.pop("format", None)
    metadata["ss_steps"] = str(steps)
    if fmt == "diffusers":
        tensors = to_diffusers(weights, handler.peft_prefix)
        metadata["lora_adapter_metadata"] = adapter_metadata(weights, handler.peft_prefix)
    elif arch == "flux":
        tensors = to_flux_fused(weights, *_flux_dims(config.base))
    else:
        tensors = to_kohya(weights)
    return [save_safetensors(run / FILE_NAMES[fmt], tensors, metadata)]
