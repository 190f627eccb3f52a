"""A run's steps on disk: its kept checkpoints, the steps exported from them, and its samples (no torch needed).

``<run>/checkpoints/step-000100/`` is a resumable checkpoint; ``python -m trainer
export --step 100`` (or picking the step on the Export tab) writes its LoRA to
``<run>/export/<run>-step000100.safetensors``, kohya's ``<name>-<step>`` naming.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.checkpoint import checkpoint_dirs, checkpoint_path, checkpoint_step

EXPORT_INFO = "export_info.json"  # a run's ExportInfo, written at its start: a step exported mid-run records it too
LR_HISTORY = "studio.learning_rates"  # its metadata key for the peak rates of a run resumed at another rate
# a run's final LoRA files, by layout (``comfy`` is written only when asked for: trainer.reexport)
FILE_NAMES = {"kohya": "lora.safetensors", "diffusers": "lora_diffusers.safetensors", "comfy": "lora_comfy.safetensors"}
STEP_SUFFIXES = {"kohya": "", "diffusers": "_diffusers", "comfy": "_comfy"}
_SAMPLE = re.compile(r"^step-(\d+)-(\d+)\.png$")


def lora_label(path: str | Path) -> str:
    """What a LoRA file is called in Mix slots, grids and mixes: a run's own files (every run's is named
    ``lora.safetensors``) by their run folder, any other file (an upload, a download) by its stem."""
    path = Path(path)
    if path.name in FILE_NAMES.values() and path.parent.name and not path.parent.name.startswith(("_", ".")):
        return path.parent.name
    return path.stem


def step_file(run: str | Path, step: int, fmt: str = "kohya") -> Path:
    """Where the LoRA of ``step`` goes in layout ``fmt``."""
    run = Path(run)
    return run / "export" / f"{run.name}-step{step:06d}{STEP_SUFFIXES[fmt]}.safetensors"


def parse_step_file(path: str | Path) -> tuple[Path, int] | None:
    """(run folder, step) of a kohya-layout :func:`step_file` path, written or not; None for any other path."""
    path = Path(path)
    run = path.parent.parent
    match = re.fullmatch(rf"{re.escape(run.name)}-step(\d{{6,}})\.safetensors", path.name)
    return (run, int(match.group(1))) if match and path.parent.name == "export" else None


def exported_step_files(run: str | Path) -> dict[int, Path]:
    """step → its kohya-layout file, for the steps exported so far (their checkpoints may be gone)."""
    folder = Path(run) / "export"
    if not folder.is_dir():
        return {}
    return dict(sorted((parsed[1], p) for p in folder.iterdir() if (parsed := parse_step_file(p)) and p.is_file()))


def exported_steps(run: str | Path) -> list[int]:
    """The steps a run can be exported at: its kept checkpoints, and steps exported before their checkpoint
    was rotated away."""
    return sorted({checkpoint_step(p) for p in checkpoint_dirs(run)} | set(exported_step_files(run)))


def checkpoint_mtime(run: str | Path, step: int) -> float | None:
    """When the checkpoint of ``step`` was written; None without one (or when rotation deletes it right now)."""
    try:
        return (checkpoint_path(run, step) / "adapter.safetensors").stat().st_mtime
    except OSError:
        return None


def sample_file(run: str | Path, step: int, index: int) -> Path:
    """Where the loop saves sample image ``index`` (its ``index``-th prompt) rendered at ``step``."""
    return Path(run) / "samples" / f"step-{step:06d}-{index}.png"


def parse_sample_name(name: str) -> tuple[int, int] | None:
    """(step, prompt index) of a :func:`sample_file` name; None for any other file."""
    match = _SAMPLE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def sampled_steps(run: str | Path) -> list[int]:
    """The steps at which samples were rendered, in order."""
    folder = Path(run) / "samples"
    if not folder.is_dir():
        return []
    return sorted({parsed[0] for p in folder.iterdir() if (parsed := parse_sample_name(p.name))})


def samples_near(run: str | Path, step: int) -> int | None:
    """The step whose samples show ``step``: itself if it has some, else the latest before it (a stop skips the
    samples due at its step); None when none was rendered by then."""
    return next((s for s in reversed(sampled_steps(run)) if s <= int(step)), None)


def preview_image(run: str | Path, step: int) -> Path | None:
    """The picture that shows the LoRA of ``step`` on a card: the first prompt's sample at :func:`samples_near`."""
    near = samples_near(run, step)
    if near is None:
        return None
    path = sample_file(run, near, 0)
    return path if path.is_file() else None


def learning_rate_history(run: str | Path) -> str:
    """The peak learning rates of a run resumed at another rate ("0.003 for steps 1-20, 0.0015 from step 21", as
    its exports record under :data:`LR_HISTORY`); "" when it trained at one rate."""
    try:
        training = json.loads((Path(run) / EXPORT_INFO).read_text(encoding="utf-8")).get("training") or {}
        return str(training.get(LR_HISTORY, ""))
    except (OSError, ValueError, AttributeError):
        return ""
