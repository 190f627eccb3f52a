"""The web app's state and actions, without gradio: one :class:`Studio` per server.

Tabs call these methods and only turn results into widgets. Everything that
can fail for a reason the user can fix raises :class:`UserError` (shown as one
line on the page). Heavy engine modules (``trainer.mixing``, ``trainer.export``,
``captioning`` backends) are imported inside the methods that need them, so the
page starts in a second and torch is only loaded when training or preview begins.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.bases import list_bases, parse_base
from trainer.config import Precision
from trainer.errors import ConfigError, UserError
from trainer.images import DEFAULT_LIMITS, ImageLimits
from trainer.job import JobManager, JobSnapshot, Runner
from trainer.presets import list_presets, load_preset, resolve_config
from ui import store

LORA_UPLOADS = "_loras"  # outputs/_loras: LoRA files uploaded on the Mix tab (never a run: no config.yaml)
EXPORT_FIELDS = ("title", "trigger_phrase", "license", "description")
ARCH_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL", "flux": "FLUX.1"}


def is_demo(base: str) -> bool:
    return str(base).strip().startswith(("demo:", "demo-random:"))


@dataclass
class TrainForm:
    """The Train tab's fields (None = keep the preset's value)."""

    base: str
    preset: str = "style"
    steps: Optional[int] = None
    lr: Optional[float] = None
    resolution: Optional[int] = None
    batch_size: Optional[int] = None
    precision: str = "auto"
    seed: Optional[int] = None
    sample_prompt: str = ""
    sample_every: Optional[int] = None
    sample_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    trigger: str = ""

    def overrides(self) -> dict[str, Any]:
        def num(value, kind):
            if value is None or value == "":
                return None
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                return value  # make_config names the field and the bad value
            if kind is int:
                return int(as_float) if as_float.is_integer() else value
            return as_float

        values = {
            "base": self.base.strip(), "steps": num(self.steps, int), "lr": num(self.lr, float),
            "resolution": num(self.resolution, int), "batch_size": num(self.batch_size, int),
            "precision": self.precision or "auto", "seed": num(self.seed, int),
            "sample_every": num(self.sample_every, int), "sample_steps": num(self.sample_steps, int),
            "checkpoint_every": num(self.checkpoint_every, int), "trigger": self.trigger.strip(),
        }
        if self.sample_prompt.strip():
            values["sample_prompts"] = [self.sample_prompt.strip()]
        return values


@dataclass
class MixSlot:
    path: str
    weight: float


@dataclass
class _Mixer:
    """One loaded base pipeline and the adapter files loaded into it (each file read once)."""

    base: str
    session: Any
    loaded: dict[tuple[str, float], str] = field(default_factory=dict)  # (path, mtime) -> adapter name
    adapter_reads: int = 0


class Studio:
    """Everything the page does, for one server process.

    Args:
        outputs_dir: run folders live here; the only folder the server may serve files from.
        default_base: base model preselected on the Train tab.
        models_dir: folder scanned for local diffusers folders / checkpoints.
        loras_dir: extra folder of ``.safetensors`` LoRAs offered on the Mix tab.
        limits: per-image upload limits.
        runner: training function for :class:`JobManager` (tests inject fakes).
        mix_factory: ``base -> MixSession`` (tests inject fakes; default ``trainer.mixing.MixSession``).
    """

    def __init__(self, outputs_dir: str | Path, default_base: str = "demo:sd15", models_dir: str | Path = "models",
                 loras_dir: str | Path = "loras", limits: ImageLimits = DEFAULT_LIMITS,
                 runner: Optional[Runner] = None, mix_factory: Optional[Callable[[str], Any]] = None):
        self.outputs_dir = Path(outputs_dir).resolve()
        self.default_base = default_base
        self.models_dir = Path(models_dir)
        self.loras_dir = Path(loras_dir)
        self.limits = limits
        self.jobs = JobManager(self.outputs_dir, runner=runner)
        self._mix_factory = mix_factory
        self._mixer: Optional[_Mixer] = None
        self._mix_lock = threading.Lock()
        self._names = itertools.count(1)
        self.base_loads = 0
        self._nf4: Optional[tuple[bool, str]] = None
        self._snapshots: dict[Path, tuple[tuple[int, int], Optional[JobSnapshot]]] = {}

    # ---- runs -------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        """``outputs/<name>`` for a user-given run name (sanitized; never outside outputs)."""
        safe = store.safe_run_name(name)
        path = (self.outputs_dir / safe).resolve()
        if path.parent != self.outputs_dir:
            raise UserError(f"run name {name!r} is not allowed")
        return path

    def run_names(self) -> list[str]:
        """Run folders (with a dataset or a training), newest first."""
        if not self.outputs_dir.is_dir():
            return []
        runs = [p for p in self.outputs_dir.iterdir()
                if p.is_dir() and not p.name.startswith(("_", "."))
                and ((p / "dataset").is_dir() or (p / "config.yaml").is_file())]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def active_run(self) -> Optional[str]:
        job = self.jobs.current()
        return job.run_dir.name if job is not None and job.is_active() else None

    def initial_run(self) -> str:
        """The run a freshly opened page shows: the one training, else the newest, else a new name."""
        return self.active_run() or next(iter(self.run_names()), None) or store.new_run_name(self.outputs_dir)

    def new_run(self) -> str:
        return store.new_run_name(self.outputs_dir)

    def run_list(self) -> list[tuple[str, str]]:
        """(label, run name) of every trained run, newest first: ``r1 — stopped at 3/10 · resumable``."""
        out = []
        for r in self.jobs.list_runs():
            where = f"{r.step}/{r.total_steps}" if r.total_steps else "before the first step"
            out.append((f"{r.name} — {r.state} at {where}" + (" · resumable" if r.resumable else ""), r.name))
        return out

    # ---- dataset ----------------------------------------------------------------------------
    def import_uploads(self, run: str, paths: list[str]) -> store.ImportReport:
        return store.import_uploads(paths, self.run_dir(run), self.limits)

    def items(self, run: str) -> list[store.Item]:
        return store.list_items(self.run_dir(run))

    def set_caption(self, run: str, name: str, text: str) -> None:
        store.write_caption(self.run_dir(run), name, text)

    def remove_image(self, run: str, name: str) -> None:
        store.remove_item(self.run_dir(run), name)

    def settings(self, run: str) -> dict:
        return store.load_settings(self.run_dir(run))

    def save_settings(self, run: str, **values) -> None:
        run_dir = self.run_dir(run)
        run_dir.mkdir(parents=True, exist_ok=True)
        store.save_settings(run_dir, **values)

    @staticmethod
    def captioners() -> list[str]:
        try:
            import captioning

            names = list(captioning.available_captioners())
        except (ImportError, AttributeError):
            names = []
        return names or ["filename"]

    def caption_all(self, run: str, captioner: str, trigger: str, overwrite: bool,
                    progress: Callable[[int, int], None] = lambda done, total: None,
                    cancel: Optional[threading.Event] = None) -> str:
        """Write captions for every image; returns a one-line report."""
        run_dir = self.run_dir(run)
        data = store.dataset_dir(run_dir)
        if not store.list_items(run_dir):
            raise UserError("the dataset is empty: add images first")
        self.save_settings(run, trigger=trigger.strip())
        try:
            import captioning

            caption_folder, options_cls = captioning.caption_folder, captioning.CaptionOptions
        except (ImportError, AttributeError):
            return self._caption_from_names(run_dir, trigger, overwrite, progress)
        report = caption_folder(str(data), captioner=captioner or "auto",
                                options=options_cls(trigger=trigger.strip(), overwrite=overwrite),
                                progress=progress, cancel=cancel or threading.Event())
        written, kept = len(report.written), len(report.kept)
        parts = [f"{written} caption(s) written" + (f" with {report.backend}" if report.backend else "")]
        if kept:
            parts.append(f"{kept} kept (tick 'overwrite' to replace them)")
        if report.skipped:
            parts.append("skipped: " + "; ".join(f"{f}: {why}" for f, why in report.skipped[:5]))
        if report.fallback_reason:
            parts.append(f"note: {report.fallback_reason}")
        if report.cancelled:
            parts.append("cancelled")
        return ", ".join(parts)

    @staticmethod
    def _caption_from_names(run_dir: Path, trigger: str, overwrite: bool, progress) -> str:
        items = store.list_items(run_dir)
        written = kept = 0
        for i, item in enumerate(items, 1):
            if item.caption and not overwrite:
                kept += 1
            else:
                text = store.caption_from_name(item.name)
                if trigger.strip() and trigger.strip() not in text.split():
                    text = f"{trigger.strip()}, {text}" if text else trigger.strip()
                store.write_caption(run_dir, item.name, text)
                written += 1
            progress(i, len(items))
        return f"{written} caption(s) written from file names, {kept} kept"

    # ---- training ---------------------------------------------------------------------------
    def bases(self) -> list[str]:
        found = list_bases(self.models_dir)
        return found if self.default_base in found else [self.default_base, *found]

    @staticmethod
    def describe_base(base: str) -> str:
        """One line: the detected architecture, or why the base cannot be used."""
        if not str(base).strip():
            return "Pick a base model."
        try:
            ref = parse_base(base)
        except UserError as err:
            return f"⚠ {err}"
        arch = ARCH_NAMES.get(ref.arch or "", "architecture detected when the model is loaded")
        kinds = {"demo": "tiny built-in demo model (64 px, works offline)",
                 "demo-random": "tiny demo model with random weights (64 px, fastest)",
                 "folder": "local diffusers folder", "file": "single-file checkpoint",
                 "hub": "hub id (downloaded on first use; needs network)"}
        return f"{arch} — {kinds.get(ref.kind, ref.kind)}"

    @staticmethod
    def presets() -> list[str]:
        return list_presets()

    @staticmethod
    def describe_preset(name: str) -> str:
        try:
            p = load_preset(name)
        except UserError as err:
            return f"⚠ {err}"
        return f"**rank {p.rank} · alpha {p.alpha:g} · targets {p.targets}** — {p.description}"

    @staticmethod
    def preset_values(name: str) -> dict[str, Any]:
        try:
            return dict(load_preset(name).values)
        except UserError:
            return {}

    def nf4_status(self, full: bool = False) -> tuple[bool, str]:
        """Whether NF4 can be offered, and why not. Cheap by default (is bitsandbytes installed?);
        ``full=True`` runs the engine's real check once (it imports torch)."""
        if self._nf4 is not None:
            return self._nf4
        if importlib.util.find_spec("bitsandbytes") is None:
            self._nf4 = (False, "NF4 (4-bit) needs the bitsandbytes package: pip install bitsandbytes")
            return self._nf4
        if not full:
            return True, ""
        try:
            from trainer.quant import nf4_supported

            self._nf4 = nf4_supported()
        except ImportError as err:
            self._nf4 = (False, f"NF4 is not available in this build ({err})")
        return self._nf4

    def precisions(self) -> list[str]:
        ok, _ = self.nf4_status()
        return [p.value for p in Precision if ok or p is not Precision.NF4]

    def start(self, run: str, form: TrainForm) -> tuple[str, str]:
        """Start training ``run`` on its dataset; returns (run actually used, message).

        A run that was already trained is not overwritten: its dataset is copied to a
        new run (``<run>-2``) which is trained instead.

        Raises:
            UserError: empty dataset, invalid settings (all listed), or another job running.
        """
        run_dir = self.run_dir(run)
        if not store.list_items(run_dir):
            raise UserError("the dataset is empty: add images on the Dataset tab first")
        parse_base(form.base)  # a missing folder or unknown demo name is refused now, not after loading torch
        active = self.active_run()
        if active is not None:
            raise UserError(f"'{active}' is still training; only one run can use the GPU at a time. "
                            "Stop it or wait for it to finish, then press Start again")
        note = ""
        if (run_dir / "config.yaml").is_file() or (run_dir / "events.jsonl").is_file():
            run_dir = self._copy_run(run_dir)
            note = f"'{run}' was already trained, so its dataset was copied to a new run '{run_dir.name}'. "
        if form.precision == Precision.NF4.value:
            ok, why = self.nf4_status(full=True)
            if not ok:
                raise UserError(f"{why}; pick bf16, fp16 or auto")
        overrides = form.overrides()
        overrides.update(data=str(store.dataset_dir(run_dir)), out=str(run_dir))
        try:
            config, warnings = resolve_config(form.preset or "style", overrides)
        except ConfigError as err:
            raise UserError("cannot start: " + "; ".join(err.problems)) from None
        self.save_settings(run_dir.name, trigger=form.trigger.strip(), preset=form.preset, base=form.base.strip())
        self.jobs.start(config)
        message = note + f"Training '{run_dir.name}': {config.steps} steps on {config.base}."
        if warnings:
            message += " Warning: " + "; ".join(warnings)
        return run_dir.name, message

    def _copy_run(self, run_dir: Path) -> Path:
        n = 2
        while (target := run_dir.with_name(f"{run_dir.name}-{n}")).exists():
            n += 1
        target.mkdir(parents=True)
        for sub in ("dataset", "thumbs"):
            if (run_dir / sub).is_dir():
                shutil.copytree(run_dir / sub, target / sub)
        if (run_dir / "studio.json").is_file():
            shutil.copy2(run_dir / "studio.json", target / "studio.json")
        return target

    def stop(self) -> str:
        job = self.jobs.current()
        if job is None or not job.is_active():
            return "Nothing is training."
        job.stop()
        return f"Stopping '{job.run_dir.name}' after the current step; a final checkpoint and the exports are saved."

    def resume(self, run: str) -> str:
        run_dir = self.run_dir(run)
        active = self.active_run()
        if active is not None:
            raise UserError(f"'{active}' is still training; stop it before resuming another run")
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"'{run}' has not been trained yet: press Start")
        info = next((r for r in self.jobs.list_runs() if r.name == run_dir.name), None)
        if info is not None and not info.resumable:
            why = "it already finished" if info.state == "done" else "it has no checkpoint yet"
            raise UserError(f"'{run}' cannot be resumed: {why}")
        self.jobs.resume(run_dir.name)
        return f"Resuming '{run_dir.name}' from its last checkpoint."

    def snapshot(self, run: str) -> Optional[JobSnapshot]:
        """The run's progress: live for the current job, else read from its events.jsonl (re-read only
        when the file changed, since every open page asks once a second)."""
        try:
            run_dir = self.run_dir(run)
        except UserError:
            return None
        job = self.jobs.current()
        if job is not None and job.run_dir.resolve() == run_dir:
            return job.snapshot()
        try:
            st = (run_dir / "events.jsonl").stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._snapshots.get(run_dir)
        if cached is None or cached[0] != key:
            cached = (key, self.jobs.snapshot(run_dir))
            self._snapshots[run_dir] = cached
        return cached[1]

    # ---- LoRA files -------------------------------------------------------------------------
    def lora_files(self) -> list[tuple[str, str]]:
        """(label, path) of every LoRA the Mix tab can load: trained runs, the loras folder, uploads."""
        found = []
        for name in self.run_names():
            path = self.outputs_dir / name / "lora.safetensors"
            if path.is_file():
                found.append((f"run: {name}", str(path)))
        for folder, tag in ((self.loras_dir, "loras"), (self.outputs_dir / LORA_UPLOADS, "uploaded")):
            if folder.is_dir():
                for path in sorted(folder.glob("*.safetensors")):
                    found.append((f"{tag}: {path.name}", str(path.resolve())))
        return found

    def add_lora_upload(self, path: str, shown_name: str = "") -> str:
        """Keep an uploaded LoRA under ``outputs/_loras/``; returns its stored path."""
        name = store.safe_upload_name(shown_name or Path(path).name)
        if not name.lower().endswith(".safetensors"):
            raise UserError(f"{shown_name or Path(path).name}: only .safetensors LoRA files are accepted "
                            "(pickled .pt/.ckpt/.bin files can run code)")
        folder = self.outputs_dir / LORA_UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        taken = {p.stem.lower() for p in folder.iterdir()}
        dst = folder / store._unique_name(name, taken)
        with open(path, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        return str(dst)

    def run_base(self, run: str) -> str:
        """The base a run was trained on (its config.yaml), else the page's default."""
        try:
            from trainer.config import load_config

            return load_config(self.run_dir(run) / "config.yaml").base
        except UserError:
            return self.default_base

    # ---- mixing -----------------------------------------------------------------------------
    def _session(self, base: str) -> _Mixer:
        if self._mixer is None or self._mixer.base != base:
            self._mixer = None  # drop the old pipeline before loading another
            if self._mix_factory is not None:
                session = self._mix_factory(base)
            else:
                from trainer.mixing import MixSession

                session = MixSession(base, device="auto" if not is_demo(base) else "cpu")
            self.base_loads += 1
            self._mixer = _Mixer(base=base, session=session)
        return self._mixer

    def _adapter(self, mixer: _Mixer, path: str) -> str:
        p = Path(path)
        if p.suffix.lower() != ".safetensors":
            raise UserError(f"{p.name}: only .safetensors LoRA files are accepted")
        try:
            key = (str(p.resolve()), p.stat().st_mtime)
        except OSError:
            raise UserError(f"LoRA file {p.name} no longer exists") from None
        if key not in mixer.loaded:
            stale = [k for k in mixer.loaded if k[0] == key[0]]
            for k in stale:  # the file was rewritten (a resumed run): drop the old adapter
                mixer.session.remove_lora(mixer.loaded.pop(k))
            name = f"lora{next(self._names)}"
            mixer.session.add_lora(str(p), name=name)
            mixer.loaded[key] = name
            mixer.adapter_reads += 1
        return mixer.loaded[key]

    def render_mix(self, base: str, slots: list[MixSlot], prompt: str, seed: int, steps: int,
                   guidance: float) -> tuple[Any, str]:
        """Render ``prompt`` with the weighted LoRAs; returns (PIL image, one-line info)."""
        base = (base or self.default_base).strip()
        chosen = [s for s in slots if s.path]
        with self._mix_lock:
            t0 = time.perf_counter()
            mixer = self._session(base)
            weights = {}
            for slot in chosen:
                name = self._adapter(mixer, slot.path)
                weights[name] = weights.get(name, 0.0) + float(slot.weight)
            for name in mixer.loaded.values():
                weights.setdefault(name, 0.0)
            mixer.session.set_weights(weights)
            t1 = time.perf_counter()
            image = mixer.session.render(prompt or "", seed=int(seed), steps=int(steps), guidance=float(guidance))
            t2 = time.perf_counter()
        mix = ", ".join(f"{Path(s.path).parent.name if Path(s.path).name == 'lora.safetensors' else Path(s.path).stem}"
                        f" × {float(s.weight):g}" for s in chosen) or "no LoRA (base model only)"
        info = (f"{mix} — rendered in {t2 - t1:.1f} s; re-weighting took {(t1 - t0) * 1000:.0f} ms. "
                f"Base loaded {self.base_loads}×, LoRA files read {mixer.adapter_reads}×.")
        return image, info

    # ---- export -----------------------------------------------------------------------------
    def exports(self, run: str) -> dict[str, Optional[str]]:
        run_dir = self.run_dir(run)
        found = {}
        for key, name in (("kohya", "lora.safetensors"), ("diffusers", "lora_diffusers.safetensors")):
            path = run_dir / name
            found[key] = str(path) if path.is_file() else None
        return found

    def export_metadata(self, run: str) -> dict[str, str]:
        path = self.exports(run)["kohya"]
        if path is None:
            return {}
        from trainer.export import read_metadata

        meta = read_metadata(path)
        return {f: meta.get(f"modelspec.{f}", "") for f in EXPORT_FIELDS}

    def prepare_export(self, run: str, meta: dict[str, str]) -> dict[str, str]:
        """Copies of both files with the edited metadata under ``outputs/<run>/export/``."""
        files = self.exports(run)
        if not any(files.values()):
            raise UserError(f"'{run}' has no exported LoRA yet: train it (or stop it) first")
        from trainer.export import rewrite_metadata

        updates = {f"modelspec.{f}": " ".join(str(meta.get(f, "")).split()) if f != "description"
                   else str(meta.get(f, "")).strip() for f in EXPORT_FIELDS}
        stem = store.safe_stem(meta.get("title") or run)
        out = self.run_dir(run) / "export"
        prepared = {}
        for key, src in files.items():
            if src:
                dst = out / (f"{stem}.safetensors" if key == "kohya" else f"{stem}_diffusers.safetensors")
                prepared[key] = str(rewrite_metadata(src, dst, updates))
        return prepared

    def samples(self, run: str) -> list[str]:
        folder = self.run_dir(run) / "samples"
        return [str(p) for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []

    def samples_zip(self, run: str) -> Optional[str]:
        samples = self.samples(run)
        if not samples:
            return None
        out = self.run_dir(run) / "export" / f"{self.run_dir(run).name}_samples.zip"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for s in samples:
                zf.write(s, arcname=Path(s).name)
        tmp.replace(out)
        return str(out)
