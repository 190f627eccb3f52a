"""``python -m trainer export``: write a run's checkpoint in a chosen layout.

Useful after a stopped or interrupted run, to get one more layout later, or to
share an earlier step whose samples looked best (a style often overfits late).
Without ``--step`` the latest checkpoint rewrites the run's own files; a chosen
``--step`` goes to ``<run>/export/<run>-step<N>.safetensors`` and never touches
them (a run still training may have no files of its own yet).
``comfy`` is the layout ComfyUI's LoraLoader takes for every architecture: the
kohya keys for SD1.5/SDXL and the fused BFL keys for FLUX (see DESIGN.md).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from trainer.bases import parse_base
from trainer.checkpoint import checkpoint_dirs, checkpoint_step, load_state
from trainer.config import load_config
from trainer.errors import UserError, WriteError
from trainer.export import (LR_HISTORY, ExportInfo, build_metadata, diffusers_metadata, from_peft_state_dict,
                            load_export_info, rates_until, read_metadata, save_safetensors, to_diffusers,
                            to_flux_fused, to_kohya, training_record)
from trainer.models import ARCH_HANDLERS, demo_folder
from trainer.steps import FILE_NAMES, checkpoint_mtime, preview_image, step_file
from trainer.webui_bundle import bundle_path, current_bundle, write_bundle

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


def _peak_lr(checkpoint: Path) -> float | None:
    """The peak learning rate the schedule held when ``checkpoint`` was written (None if unreadable)."""
    try:
        return float(load_state(checkpoint)["lr_scheduler"]["base_lrs"][0])  # the adapter is read already
    except (OSError, KeyError, IndexError, TypeError, ValueError, RuntimeError):
        return None


def _pick(run: Path, checkpoints: list[Path], step: int | None) -> Path:
    if step is None:
        return checkpoints[-1]
    for path in checkpoints:
        if checkpoint_step(path) == step:
            return path
    kept = ", ".join(str(checkpoint_step(p)) for p in checkpoints)
    raise UserError(f"{run.name} has no checkpoint at step {step}; it kept steps {kept} (a run writes one every "
                    "--checkpoint-every steps and keeps the last --keep-checkpoints)")


def reexport(run: str | Path, fmt: str, step: int | None = None) -> list[Path]:
    """Write the checkpoint at ``step`` (default: the latest) as a ``fmt`` LoRA file; returns its path.

    The latest goes to the run's own file name; a chosen step to :func:`step_file`, titled "<title> (step N)"
    so that ComfyUI's and A1111's lists tell the files apart. ``a1111`` writes the kohya file, then packs it
    with its card (preview image, trigger word) into a .zip (trainer.webui_bundle.bundle_path says where).
    """
    if fmt == "a1111":
        return [a1111_bundle(reexport(run, "kohya", step)[0], run)]
    run = Path(run)
    config = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    checkpoints = checkpoint_dirs(run)
    if config is None or not checkpoints:
        raise UserError(f"{run} is not a run folder with a checkpoint (expected config.yaml and checkpoints/step-*)")
    arch = parse_base(config.base).arch or _previous_metadata(run / FILE_NAMES["kohya"]).get("studio.arch", "")
    if arch not in ARCH_HANDLERS:
        raise UserError(f"cannot tell the architecture of {run}'s base {config.base!r}")
    chosen = _pick(run, checkpoints, step)
    try:
        state = load_file(str(chosen / "adapter.safetensors"))
    except FileNotFoundError:  # the run is still training and its rotation deleted that checkpoint just now
        raise UserError(f"{run.name}'s checkpoint {chosen.name} was deleted while being read (the run keeps "
                        f"{config.keep_checkpoints}); pick a newer step") from None
    except (SafetensorError, OSError) as err:  # a truncated or corrupt file
        others = [str(checkpoint_step(p)) for p in checkpoints if p != chosen]
        if step is not None:
            advice = f"; pick another step (kept: {', '.join(others)})" if others else "; the run kept no other step"
        elif others:
            advice = f"; delete that folder to export the one before it ({checkpoints[-2].name})"
        else:
            advice = "; this run has no earlier checkpoint: resume or train it again"
        raise UserError(f"{chosen.name}/adapter.safetensors is damaged ({str(err).splitlines()[0]}){advice}") from None
    weights = from_peft_state_dict(state, config.rank, config.alpha)
    handler = ARCH_HANDLERS[arch]
    steps = checkpoint_step(chosen)
    metadata = _previous_metadata(run / FILE_NAMES["kohya"])
    if not metadata:  # no (readable) export yet: a run still training or interrupted
        info = load_export_info(run) or ExportInfo(  # what the run recorded at its start, else its config
            arch=arch, modelspec_architecture=handler.modelspec_architecture,
            base_model_version=handler.base_model_version, base=config.base,
            resolution=config.resolution, output_name=run.name, title=config.title or run.name, trigger=config.trigger,
            license=config.license, description=config.description, targets=config.targets,
            training=training_record(config))
        metadata = build_metadata(replace(info, steps=steps), weights)
    metadata.pop("format", None)
    metadata["ss_steps"] = str(steps)
    peak = _peak_lr(chosen)
    if peak is not None:  # a run resumed at another rate: this step trained at the rate its checkpoint held
        metadata["ss_learning_rate"] = metadata["ss_unet_lr"] = f"{peak:g}"
    history = rates_until(metadata.pop(LR_HISTORY, ""), steps)
    if history:
        metadata[LR_HISTORY] = history
    if step is not None:
        metadata["modelspec.title"] = f"{metadata.get('modelspec.title') or run.name} (step {steps})"
    if fmt == "diffusers":
        tensors = to_diffusers(weights, handler.peft_prefix)
        metadata = diffusers_metadata(metadata, weights, handler.peft_prefix)
    elif arch == "flux":
        tensors = to_flux_fused(weights, *_flux_dims(config.base))
    else:
        tensors = to_kohya(weights)
    target = run / FILE_NAMES[fmt] if step is None else step_file(run, steps, fmt)
    return [save_safetensors(target, tensors, metadata)]


def a1111_bundle(lora: str | Path, run: str | Path, write: bool = True) -> Path | None:
    """The A1111 / Forge zip of ``run``'s kohya-layout file ``lora`` (its own, a step's, or an edited copy) with
    the sample of its step as preview (see trainer.webui_bundle). Written when missing or made from other files;
    with ``write`` False only an up-to-date one is returned (None otherwise)."""
    lora, run = Path(lora), Path(run)
    metadata = read_metadata(lora)
    try:
        preview = preview_image(run, int(metadata.get("ss_steps", "")))
    except ValueError:
        preview = None
    out = bundle_path(lora, run)
    current = current_bundle(out, lora, preview)
    if current is not None or not write:
        return current
    try:
        return write_bundle(lora, metadata, preview, out)
    except WriteError:
        if not lora.is_file() or (preview is not None and not preview.is_file()):  # rotated away meanwhile
            raise UserError(f"{lora.name} or its sample changed while it was being packed; pack it again") from None
        raise


def step_exports(run: str | Path, step: int, formats: tuple[str, ...] = ("kohya", "diffusers")) -> dict[str, Path | None]:
    """The files of ``step`` in ``formats``, written from its checkpoint unless they are already newer than it.

    Once the checkpoint is gone (rotated away), the files exported before are what there is: a format never
    exported is None. Raises UserError when there is neither a checkpoint nor a file of the step.
    """
    run = Path(run)
    checkpoint = checkpoint_mtime(run, step)
    found: dict[str, Path | None] = {}
    for fmt in formats:
        target = step_file(run, step, fmt)
        try:
            written = target.stat().st_mtime
        except OSError:
            written = None
        if written is not None and (checkpoint is None or written >= checkpoint):
            found[fmt] = target
        elif checkpoint is not None:
            found[fmt] = reexport(run, fmt, step)[0]
        else:
            found[fmt] = None
    if not any(found.values()):
        reexport(run, formats[0], step)  # raises: no checkpoint at that step, naming the kept ones
    return found
