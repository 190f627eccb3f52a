"""The Studio's export side: a run's final and per-step LoRA files, their metadata, the copies the Export
tab's downloads serve, the A1111 / Forge bundle and the samples.

A mixin of :class:`ui.studio.Studio` (it reaches runs through ``run_dir``, ``settings`` and
``save_settings``), so the Export tab and the tests call ``studio.exports(…)`` as before while this file
holds one concern. The run's own ``lora.safetensors`` / ``lora_diffusers.safetensors`` are never modified:
an earlier step's files and edited copies go to ``outputs/<run>/export/``.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Optional

from trainer.atomic import atomic_path, same_file_as
from trainer.errors import UserError
from trainer.paths import is_inside
from trainer.steps import FILE_NAMES, checkpoint_mtime, exported_steps, samples_near
from ui import store

log = logging.getLogger(__name__)
EXPORT_FIELDS = ("title", "trigger_phrase", "license", "description")


class RunExports:
    """Exports of runs in ``outputs/`` (see the module docstring)."""

    def final_step(self, run: str) -> Optional[int]:
        """The step of the run's own files (their ``ss_steps``) while they hold that step's checkpoint; None
        without them, or while a resumed run trains past a step it retrains (its checkpoint is newer)."""
        path = self.run_dir(run) / FILE_NAMES["kohya"]
        if not path.is_file():
            return None
        from trainer.export import read_metadata

        try:
            step = int(read_metadata(path).get("ss_steps", ""))
            written = path.stat().st_mtime
        except (UserError, ValueError, OSError):
            return None
        checkpoint = checkpoint_mtime(self.run_dir(run), step)
        return step if checkpoint is None or written >= checkpoint else None

    def export_steps(self, run: str) -> list[int]:
        """Steps ``run`` can be exported at besides its final files (kept checkpoints and steps exported before),
        less the step the final files hold."""
        final = self.final_step(run)
        return [step for step in exported_steps(self.run_dir(run)) if step != final]

    def exports(self, run: str, step: Optional[int] = None,
                formats: tuple[str, ...] = ("kohya", "diffusers")) -> dict[str, Optional[str]]:
        """The run's kohya and diffusers files; with ``step``, those of that checkpoint (written on first ask;
        a format never exported before its checkpoint was rotated away is None)."""
        run_dir = self.run_dir(run)
        if step is not None:
            from trainer.reexport import step_exports

            return {key: str(path) if path else None for key, path in step_exports(run_dir, int(step), formats).items()}
        found = {}
        for key in ("kohya", "diffusers"):
            path = run_dir / FILE_NAMES[key]
            found[key] = str(path) if path.is_file() else None
        return found

    def download_file(self, run: str, path: Optional[str]) -> Optional[str]:
        """The file the browser saves for ``path``: the run's final ``lora.safetensors`` and
        ``lora_diffusers.safetensors`` as ``export/final/<run>.safetensors`` and ``<run>_diffusers.safetensors``
        (hard links, made again when training on replaces them), so downloads of several runs do not all
        arrive as lora.safetensors; a step's file or an edited copy is already named after its run or title."""
        if not path:
            return None
        run_dir = self.run_dir(run)
        names = {FILE_NAMES["kohya"]: f"{run_dir.name}.safetensors",
                 FILE_NAMES["diffusers"]: f"{run_dir.name}_diffusers.safetensors"}
        source = Path(path)
        if source.parent != run_dir or source.name not in names or not source.is_file():
            return str(path)
        try:
            return str(same_file_as(source, run_dir / "export" / "final" / names[source.name]))
        except UserError as err:  # e.g. a full disk refusing the copy: served as lora.safetensors then
            log.warning("serving %s under its own name: %s", source, err)
            return str(path)

    def export_metadata(self, run: str, step: Optional[int] = None) -> dict[str, str]:
        files = self.exports(run, step)
        path = files["kohya"] or files["diffusers"]
        if path is None:
            return {}
        from trainer.export import read_metadata

        meta = read_metadata(path)
        return {f: meta.get(f"modelspec.{f}", "") for f in EXPORT_FIELDS}

    def prepare_export(self, run: str, meta: dict[str, str], step: Optional[int] = None) -> dict[str, str]:
        """Copies of both files (of ``step``'s checkpoint if given) with the edited metadata under
        ``outputs/<run>/export/``, named after the title (a step's copies end with the step)."""
        files = self.exports(run, step)
        if not any(files.values()):
            raise UserError(f"'{run}' has no exported LoRA yet: train it (or stop it) first")
        from trainer.export import rewrite_metadata

        updates = {f"modelspec.{f}": " ".join(str(meta.get(f, "")).split()) if f != "description"
                   else str(meta.get(f, "")).strip() for f in EXPORT_FIELDS}
        stem = store.safe_stem(meta.get("title") or run)
        if step is not None and not re.search(rf"step_?0*{int(step)}$", stem):  # "Ink (step 300)" keeps its name
            stem = store.safe_stem(f"{stem}_step{step}")
        out = self.run_dir(run) / "export"
        prepared = {}
        for key, src in files.items():
            if src:
                dst = out / (f"{stem}.safetensors" if key == "kohya" else f"{stem}_diffusers.safetensors")
                prepared[key] = str(rewrite_metadata(src, dst, updates))
        applied = dict(self.settings(run).get("applied_exports") or {})
        applied[self._applied_key(step)] = {"meta": {f: str(meta.get(f, "")) for f in EXPORT_FIELDS},
                                            "files": prepared, "sources": files}
        self.save_settings(run, applied_exports=applied)
        return prepared

    def webui_bundle(self, run: str, kohya: Optional[str], write: bool = True) -> Optional[str]:
        """The A1111 / Forge .zip of the kohya file the Export tab shows (final, a step's, or an edited copy),
        packed unless one made from exactly these files exists; with ``write`` False, only that one (or None)."""
        if not kohya:
            return None
        path = Path(kohya)
        if not is_inside(path, self.run_dir(run)):
            raise UserError(f"{path.name} is not a file of run '{run}'")
        from trainer.reexport import a1111_bundle

        bundle = a1111_bundle(path, self.run_dir(run), write=write)
        return str(bundle) if bundle is not None else None

    @staticmethod
    def _applied_key(step: Optional[int]) -> str:
        return "final" if step is None else str(int(step))

    def applied_export(self, run: str, step: Optional[int] = None) -> Optional[dict]:
        """The metadata last applied to the final files (or a step's) and the copies it wrote, while those
        copies exist and are newer than the files they were made from (training on rewrites the final ones);
        None otherwise. The Export tab shows these instead of the untouched files."""
        entry = (self.settings(run).get("applied_exports") or {}).get(self._applied_key(step))
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
            return None
        try:
            for key, copy in entry["files"].items():
                source = (entry.get("sources") or {}).get(key)
                if not copy or not Path(copy).is_file() or not is_inside(Path(copy), self.run_dir(run)):
                    return None
                if source and Path(source).stat().st_mtime > Path(copy).stat().st_mtime:
                    return None
        except (OSError, TypeError):
            return None
        return entry

    def earlier_metadata(self, run: str, step: Optional[int] = None) -> Optional[dict[str, str]]:
        """The metadata applied last to files that were written again since (training on, a re-export): the
        Export tab fills it in again, so a title, license and description typed once are not lost; None when
        nothing was applied."""
        entry = (self.settings(run).get("applied_exports") or {}).get(self._applied_key(step))
        meta = entry.get("meta") if isinstance(entry, dict) else None
        return {f: str(meta.get(f, "")) for f in EXPORT_FIELDS} if isinstance(meta, dict) else None

    def samples(self, run: str, step: Optional[int] = None) -> list[str]:
        """The run's sample images, oldest first; with ``step``, only those rendered at that step."""
        folder = self.run_dir(run) / "samples"
        pattern = "*.png" if step is None else f"step-{int(step):06d}-*.png"
        return [str(p) for p in sorted(folder.glob(pattern))] if folder.is_dir() else []

    def step_samples(self, run: str, step: int) -> tuple[Optional[int], list[str]]:
        """The samples rendered at ``step``, else at the latest step before it that has some (a stop skips the
        samples due at its step): (that step or None, their paths)."""
        nearest = samples_near(self.run_dir(run), step)
        return nearest, self.samples(run, nearest) if nearest is not None else []

    def samples_zip(self, run: str) -> Optional[str]:
        """All of the run's samples in ``export/<run>_samples.zip``; rebuilt only when a sample is newer.

        Two page events may ask at once (a run picked, then a step): each builds under a temp name of its
        own and the rename is atomic, so neither sees the other's half-written file.
        """
        samples = self.samples(run)
        if not samples:
            return None
        out = self.run_dir(run) / "export" / f"{self.run_dir(run).name}_samples.zip"
        try:
            newest = max(Path(s).stat().st_mtime for s in samples)
            if out.stat().st_mtime >= newest and self._zip_count(out) == len(samples):
                return str(out)
        except OSError:
            pass  # no zip yet, or a sample was rotated away meanwhile: build it
        with atomic_path(out) as tmp:  # a temp name of its own, renamed when complete
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for sample in samples:
                    zf.write(sample, arcname=Path(sample).name)
        return str(out)

    @staticmethod
    def _zip_count(path: Path) -> int:
        try:
            with zipfile.ZipFile(path) as zf:
                return len(zf.namelist())
        except (OSError, zipfile.BadZipFile):
            return -1
