"""The Studio's LoRA files and mixing side: the files the Mix tab offers (runs, their steps, the loras folder,
uploads), where a preview loads its base, and rendering, baking and grids (``ui.mixdesk`` does the work).

A mixin of :class:`ui.studio.Studio`: it uses ``outputs_dir``, ``loras_dir``, ``default_base``, ``mix``,
``gpu_free``, ``run_dir``, ``run_names``, ``active_job``, ``training_label``, ``run_config``, ``settings``,
``final_step`` and ``exports``.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Optional

from trainer.atomic import copy_new
from trainer.bases import weight_bytes
from trainer.errors import UserError
from trainer.lora_file import check_lora_file
from trainer.mix_weights import WEIGHT_RANGE, outside_range, parse_weights
from trainer.steps import FILE_NAMES, exported_step_files, exported_steps, parse_step_file, step_file
from ui import store
from ui.mixdesk import (MAX_GRID_CELLS, FileColumn, MixResult, MixSlot, default_guidance, default_steps, is_demo,
                        lora_weight, prompt_with_trigger, spread)

# A preview beside a training run needs its base's weights (× a margin for the pipeline's buffers) plus room to
# render one image; measured figures are owed by the GPU benchmarks (docs/benchmarks.md), these are cautious.
PREVIEW_MARGIN = 1.2
PREVIEW_ACTIVATIONS = 2 * 2**30
LORA_UPLOADS = "_loras"  # outputs/_loras: LoRA files uploaded on the Mix tab (never a run: no config.yaml)


def cuda_free_bytes() -> Optional[int]:
    """Bytes free on the current CUDA device; None without CUDA (torch is imported only when asked)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def _safetensors_in(folder: Path, pattern: str = "*.safetensors") -> list[Path]:
    """The ``.safetensors`` files in ``folder`` (resolved, sorted by name); none when it does not exist."""
    return [p.resolve() for p in sorted(folder.glob(pattern))] if folder.is_dir() else []


class RunMix:
    """LoRA files and mixing (see the module docstring)."""

    def _preview_device(self, base: str) -> str:
        """Where the Mix and Export tabs load ``base`` for previews: demo bases on the CPU; others on the GPU,
        except where that would take memory a training run needs.

        The run trains in this process, on the same GPU: a second copy of a large base beside it can run
        either out of memory. While a run trains on the GPU, a base is loaded there only when its weights
        (plus a margin for activations) fit in what is free.

        Raises:
            UserError: a run trains on the GPU and the base does not fit beside it (the message says what to do).
        """
        if is_demo(base):
            return "cpu"
        job = self.active_job()
        active = self.training_label()
        try:
            config = job.config if job is not None else None
        except (UserError, ValueError):  # a stored config that no longer reads: the worker says why
            config = None
        if config is None or config.device == "cpu":
            return "auto"
        free = self.gpu_free()
        if free is None:  # no GPU: the run trains on the CPU too
            return "auto"
        need = weight_bytes(base)
        if need is not None and need * PREVIEW_MARGIN + PREVIEW_ACTIVATIONS <= free:
            return "auto"
        size = f"about {need * PREVIEW_MARGIN / 2**30:.1f} GB" if need is not None else "an unknown amount"
        raise UserError(f"'{active}' is training on the GPU, which has {free / 2**30:.1f} GB free; previewing "
                        f"{base} would load it there too ({size}) and could run the training out of memory. "
                        "Preview once the run is done, or stop it (it keeps a checkpoint and resumes)")

    # ---- LoRA files -------------------------------------------------------------------------
    def lora_files(self) -> list[tuple[str, str]]:
        """(label, path) of every LoRA the Mix tab can load: trained runs, the loras folder, uploads."""
        found = []
        for name in self.run_names():
            path = self.outputs_dir / name / FILE_NAMES["kohya"]
            if path.is_file():
                found.append((f"run: {name}", str(path)))
            exported = exported_step_files(self.outputs_dir / name)
            final = self.final_step(name)
            for step in exported_steps(self.outputs_dir / name):
                if step in exported:
                    found.append((f"run: {name} @ step {step}", str(exported[step])))
                elif step != final:  # a kept checkpoint: its LoRA file is written when a slot first uses it
                    found.append((f"run: {name} @ step {step} (checkpoint)", str(step_file(self.outputs_dir / name,
                                                                                         step))))
            for baked in _safetensors_in(self.outputs_dir / name / "export", f"{glob.escape(name)}_mix*.safetensors"):
                found.append((f"run: {name} baked mix {baked.name}", str(baked)))  # previewed beside others
        for folder, tag in ((self.loras_dir, "loras"), (self.outputs_dir / LORA_UPLOADS, "uploaded")):
            found += [(f"{tag}: {path.name}", str(path)) for path in _safetensors_in(folder)]
        return found

    def add_lora_upload(self, path: str, shown_name: str = "", base: str = "") -> str:
        """Keep an uploaded LoRA under ``outputs/_loras/``; returns its stored path. With the Mix tab's ``base``
        loaded it is read into the mix at once, and one that does not fit it is refused now, not at the first
        preview (and not kept)."""
        name = store.safe_upload_name(shown_name or Path(path).name)
        if not name.lower().endswith(".safetensors"):
            raise UserError(f"{shown_name or Path(path).name}: only .safetensors LoRA files are accepted "
                            "(pickled .pt/.ckpt/.bin files can run code)")
        check_lora_file(path, shown_name or Path(path).name)  # refused now, in plain words, not at the first preview
        folder = self.outputs_dir / LORA_UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        taken = {p.stem.lower() for p in folder.iterdir()}
        dst = folder / store._unique_name(name, taken)
        try:
            copy_new(path, dst)
        except FileExistsError:
            raise UserError(f"{dst.name} appeared in {folder} meanwhile; upload it again") from None
        if base:
            try:
                self.mix.load_if_ready(base, str(dst))
            except UserError as err:
                dst.unlink(missing_ok=True)
                raise UserError(f"{err} (not added)") from None
        return str(dst)

    def lora_uploads(self) -> list[tuple[str, str]]:
        """(file name, path) of the LoRA files uploaded on the Mix tab."""
        return [(p.name, str(p)) for p in _safetensors_in(self.outputs_dir / LORA_UPLOADS)]

    def delete_lora_upload(self, path: str) -> str:
        """Delete an uploaded LoRA file (only those: never a run's own or one in the loras folder).

        Raises:
            UserError: not an uploaded file, or already gone.
        """
        file = Path(path or "")
        if file.suffix != ".safetensors" or file.parent != (self.outputs_dir / LORA_UPLOADS).resolve():
            raise UserError("pick an uploaded LoRA file first (a run's own files and the loras folder stay)")
        if not file.is_file():
            raise UserError(f"{file.name} was already deleted")
        self.mix.forget_file(str(file))  # first: a file a preview still maps cannot be deleted on Windows
        try:
            file.unlink()
        except OSError as err:
            raise UserError(f"could not delete {file.name} ({err.strerror or err})") from None
        return f"Deleted the upload {file.name}."

    def run_base(self, run: str) -> str:
        """The base a run was trained on (its config.yaml), else the page's default."""
        try:
            from trainer.config import load_config

            return load_config(self.run_dir(run) / "config.yaml").base
        except UserError:
            return self.default_base

    # ---- mixing (ui.mixdesk does the work) --------------------------------------------------
    @property
    def base_loads(self) -> int:
        return self.mix.base_loads

    def render_mix(self, base: str, slots: list[MixSlot], prompt: str, seed: int, steps: int,
                   guidance: float, fuse: bool = False) -> MixResult:
        """Render ``prompt`` with the weighted LoRAs (see :meth:`MixDesk.render`)."""
        return self.mix.render(base, self._written(slots), prompt, seed, steps, guidance, fuse=fuse)

    def _written(self, slots: list[MixSlot]) -> list[MixSlot]:
        """``slots`` with the LoRA file of each kept checkpoint a slot picked written first (see lora_files)."""
        for slot in slots:
            parsed = parse_step_file(slot.path) if slot.path and not Path(slot.path).exists() else None
            if parsed is not None and parsed[0].parent == self.outputs_dir:
                from trainer.reexport import step_exports

                step_exports(parsed[0], parsed[1], ("kohya",))
        return slots

    def _export_dir(self, run: str) -> Path:
        if not str(run or "").strip():
            raise UserError("pick a run first: baked mixes and grids are saved in its export folder")
        return self.run_dir(run) / "export"

    def bake_mix(self, run: str, base: str, slots: list[MixSlot], rank: Optional[float]) -> tuple[str, str]:
        """Bake the mix into ``outputs/<run>/export/<run>_mix[_r<k>].safetensors``; returns (path, report)."""
        folder = self._export_dir(run)
        name = f"{folder.parent.name}_mix" + (f"_r{int(rank)}" if rank is not None and float(rank).is_integer() else "")
        return self.mix.bake(base, self._written(slots), folder / f"{name}.safetensors", rank)

    def make_grid(self, run: str, base: str, slots: list[MixSlot], axis: int, weights: str,
                  second: Optional[int], second_weights: str, prompt: str, seed: int, steps: int,
                  guidance: float) -> tuple[str, str]:
        """A comparison grid saved as ``outputs/<run>/export/<run>_grid.png``; returns (path, info)."""
        folder = self._export_dir(run)
        first = grid_weights(weights, f"weights of LoRA {axis + 1}")
        other = None
        if second is not None and second >= 0:
            other = (second, grid_weights(second_weights, f"weights of LoRA {second + 1}"))
        return self.mix.grid(base, self._written(slots), axis, first, other, prompt, seed, steps, guidance,
                             folder / f"{folder.parent.name}_grid.png")

    def compare_steps(self, run: str, prompts: str, seed: Any, weight: Any = 1.0) -> tuple[str, str]:
        """The base, then the LoRA of each step ``run`` can be exported at, alone, over ``prompts`` (one per line,
        each starting with the run's trigger), at the run's sample settings; saved as
        ``outputs/<run>/export/<run>_steps.png``. Returns (path, one line on what was rendered).

        With more steps than fit one grid, evenly spread ones are shown, the last always among them; a step
        whose file cannot be had (rotated away while training, damaged) is left out and named.

        Raises:
            UserError: no checkpoint yet, no prompt, a weight outside -1…2.
        """
        run_dir = self._export_dir(run).parent
        w = lora_weight(weight)
        final = self.final_step(run)
        steps = sorted(set(exported_steps(run_dir)) | ({final} if final is not None else set()))
        if not steps:
            raise UserError(f"'{run}' has no checkpoint yet: train it (a checkpoint is written every "
                            "'Checkpoint every N steps' and at the end) and come back")
        config = self.run_config(run)
        # the trigger the LoRA was trained with; the Dataset tab's box may hold a newer word since
        trigger = config.trigger if config else self.settings(run).get("trigger", "")
        lines = [prompt_with_trigger(line.strip(), trigger) for line in str(prompts or "").splitlines() if line.strip()]
        if not lines:
            raise UserError("write at least one prompt (one per line)")
        shown = spread(steps, MAX_GRID_CELLS - 1)  # the steps are the point: prompts give way first
        fit = max(1, MAX_GRID_CELLS // (len(shown) + 1))
        dropped = lines[fit:]
        lines = lines[:fit]
        columns = [FileColumn("base", None, 0.0)]
        missing = []
        for step in shown:
            try:
                path = self.exports(run, None if step == final else step, formats=("kohya",))["kohya"]
            except UserError:
                path = None
            if path is None:
                missing.append(str(step))
            else:
                columns.append(FileColumn(f"step {step} x{w:g}", path, w))
        base = self.run_base(run)
        sample_steps = config.sample_steps if config else default_steps(base)
        guidance = config.sample_guidance if config else default_guidance(base)
        path, info = self.mix.side_by_side(base, columns, lines, seed, sample_steps, guidance,
                                           run_dir / "export" / f"{run_dir.name}_steps.png")
        if len(shown) < len(steps):
            info += f" {len(shown)} of the {len(steps)} kept steps are shown (one grid holds {MAX_GRID_CELLS} images)."
        if dropped:
            info += (f" Only the first {len(lines)} prompt(s) fit beside {len(shown)} steps in one grid of "
                     f"{MAX_GRID_CELLS} images; {len(dropped)} left out.")
        if missing:
            info += f" Left out: step {', '.join(missing)} (its checkpoint is gone or damaged)."
        return path, info


def grid_weights(text: str, what: str) -> list[float]:
    """A grid's weights as typed, in the sliders' range (a 12 meant to be 1.2 would render a column of noise)."""
    weights = parse_weights(text, what)
    if outside := outside_range(weights):
        low, high = WEIGHT_RANGE
        raise UserError(f"{what}: {outside[0]:g} is outside {low:g} to {high:g}, the sliders' range")
    return weights
