"""The web app's state and actions, without gradio: one :class:`Studio` per server.

Tabs call these methods and only turn results into widgets. Everything that
can fail for a reason the user can fix raises :class:`UserError` (shown as one
line on the page). Heavy engine modules (``trainer.mixing``, ``trainer.export``,
``captioning`` backends) are imported inside the methods that need them, so the
page starts in a second and torch is only loaded when training or preview begins.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.bases import base_sampling_defaults, default_resolution, list_bases, parse_base
from trainer.config import Precision
from trainer.demo_data import DEMO_TRIGGER, STYLES as DEMO_STYLES  # noqa: F401 (the Dataset tab)
from trainer.errors import ConfigError, UserError, WriteError
from trainer.dataset_check import CaptionReader, ImageFacts
from trainer import housekeeping
from trainer.images import DEFAULT_LIMITS, ImageLimits
from trainer import events as ev
from trainer.objective import Objective, check_objective
from trainer.paths import is_inside, newest_first
from trainer.job import LIVE, TRAINING, JobSnapshot, RunInfo, disk_state, list_runs, summarize
from trainer.queue import ACTIVE, JobQueue, QueuedJob, Runner, default_runner, run_worker
from trainer.checkpoint import checkpoint_dirs, checkpoint_step
from trainer.steps import FILE_NAMES, exported_step_files, learning_rate_history
from trainer.presets import list_presets, resolve_config
from trainer.scan import scan_dataset
from ui import choices, store
from ui.run_exports import EXPORT_FIELDS, RunExports  # noqa: F401 (EXPORT_FIELDS: the Export tab)
from ui.run_dataset import CaptionJob, RunDataset
from ui.run_space import RunSpace
from ui.run_mix import RunMix, cuda_free_bytes
from ui.mixdesk import MixDesk, MixSlot  # noqa: F401 (MixSlot: the Mix tab)

log = logging.getLogger(__name__)
MAX_SAMPLE_PROMPTS = 8
MAX_TRAIN_ON = 10_000  # "Train on to step" accepts up to this or 10 × the steps trained, whichever is more
WORKER_RESTART_S = 5.0  # after the queue database failed the in-app worker (locked, full disk), it tries again
WORKER_RESTART_MAX_S = 60.0  # ... waiting twice as long after each failure in a row, up to this


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
    sample_prompt: str = ""  # one prompt per line
    sample_every: Optional[int] = None
    sample_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None
    trigger: str = ""
    rank: Optional[int] = None
    alpha: Optional[float] = None  # None with a rank: 2 × rank
    noise_offset: Optional[float] = None
    snr_gamma: Optional[float] = None
    flip: Optional[bool] = None
    timestep_sampling: Optional[str] = None
    eval_every: Optional[int] = None
    keep_checkpoints: Optional[int] = None

    def overrides(self) -> dict[str, Any]:
        """The non-empty fields as config overrides.

        Fields inside the collapsed "Advanced settings" accordion arrive as None (the browser never
        rendered them): every field, text ones included, then means "keep the preset's value".
        """
        def text(value) -> str:
            return "" if value is None else str(value).strip()

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
            "base": text(self.base), "steps": num(self.steps, int), "lr": num(self.lr, float),
            "resolution": num(self.resolution, int), "batch_size": num(self.batch_size, int),
            "precision": self.precision or "auto", "seed": num(self.seed, int),
            "sample_every": num(self.sample_every, int), "sample_steps": num(self.sample_steps, int),
            "checkpoint_every": num(self.checkpoint_every, int), "trigger": text(self.trigger),
            "rank": num(self.rank, int), "alpha": num(self.alpha, float),
            "noise_offset": num(self.noise_offset, float), "snr_gamma": num(self.snr_gamma, float),
            "flip": self.flip, "timestep_sampling": text(self.timestep_sampling) or None,
            "eval_every": num(self.eval_every, int), "keep_checkpoints": num(self.keep_checkpoints, int),
        }
        prompts = [line.strip() for line in text(self.sample_prompt).splitlines() if line.strip()]
        if len(prompts) > MAX_SAMPLE_PROMPTS:
            raise UserError(f"{len(prompts)} sample prompts: at most {MAX_SAMPLE_PROMPTS} (each renders an image "
                            "every time samples are due); keep the ones that show the style best")
        if prompts:
            values["sample_prompts"] = prompts
        return values


def _same_settings(job: QueuedJob, config) -> bool:
    """Whether ``config`` is what ``job`` trains already (its run folder and data aside)."""
    try:
        queued = job.config
    except (UserError, ValueError):
        return False
    return replace(config, out=queued.out, data=queued.data) == queued


class Studio(RunDataset, RunExports, RunSpace, RunMix):
    """Everything the page does, for one server process.

    Args:
        outputs_dir: run folders live here; the only folder the server may serve files from.
        default_base: base model preselected on the Train tab.
        models_dir: folder scanned for local diffusers folders / checkpoints.
        loras_dir: extra folder of ``.safetensors`` LoRAs offered on the Mix tab.
        limits: per-image upload limits.
        runner: training function the queue worker calls (tests inject fakes; default the real loop).
        mix_engine: ``trainer.mixing`` or a stand-in with ``MixSession``/``bake``/``comparison_grid`` (tests).
        worker_poll: seconds between the worker's looks at an empty queue (and heartbeats).
        gpu_free: bytes free on the GPU, None without one (default: ``torch.cuda.mem_get_info``).

    Training goes through the durable queue in ``outputs/queue.sqlite3`` (:mod:`trainer.queue`), the same one
    ``python -m trainer queue`` uses; :meth:`start_worker` runs its one worker on a daemon thread. The dataset
    (:class:`ui.run_dataset.RunDataset`), exports (:class:`ui.run_exports.RunExports`), disk space
    (:class:`ui.run_space.RunSpace`) and LoRA files and mixing (:class:`ui.run_mix.RunMix`) sides live in mixins
    of their own.

    Raises:
        QueueError: the queue database cannot be used (the message says how to fix it).
    """

    def __init__(self, outputs_dir: str | Path, default_base: str = "demo:sd15", models_dir: str | Path = "models",
                 loras_dir: str | Path = "loras", limits: ImageLimits = DEFAULT_LIMITS,
                 runner: Optional[Runner] = None, mix_engine: Any = None, worker_poll: float = 1.0,
                 gpu_free: Optional[Callable[[], Optional[int]]] = None):
        self.outputs_dir = Path(outputs_dir).resolve()
        self.default_base = default_base
        self.models_dir = Path(models_dir)
        self.loras_dir = Path(loras_dir)
        self.limits = limits
        self.runner = runner  # read at each job start, so tests can swap it between jobs
        self.queue = JobQueue(self.outputs_dir)
        housekeeping.sweep_deleted(self.outputs_dir)  # deletions a crash or a held file left halfway
        self.worker_poll = worker_poll
        self.worker_stop = threading.Event()
        self._worker: Optional[threading.Thread] = None
        self.gpu_free = gpu_free or cuda_free_bytes  # tests stand in for a GPU
        self.mix = MixDesk(default_base, engine=mix_engine, device_for=self._preview_device)
        self._nf4: Optional[tuple[bool, str]] = None
        self._snapshots: dict[Path, tuple[tuple, Optional[JobSnapshot]]] = {}
        self._facts: dict[str, tuple[tuple, ImageFacts]] = {}  # dataset check: picture path -> (its stat, facts)
        self._readers: dict[str, Optional[CaptionReader]] = {}  # dataset check: base -> its caption tokenizer
        self._readers_lock = threading.Lock()
        self._captioning: dict[str, CaptionJob] = {}  # run -> its Caption all under way

    # ---- the queue worker -------------------------------------------------------------------
    def start_worker(self, stop: Optional[threading.Event] = None) -> threading.Thread:
        """Start the one worker thread (daemon) that trains queued jobs; ``stop`` shuts it down.

        At start the worker puts jobs interrupted by a server stop back in the queue (they continue from
        their last checkpoint). Closing a browser never stops a job: only Stop/Cancel or the stop event do.
        """
        if self._worker is not None and self._worker.is_alive():
            return self._worker
        if stop is not None:
            self.worker_stop = stop
        self._worker = threading.Thread(target=self._work, name="queue-worker", daemon=True)
        self._worker.start()
        return self._worker

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the worker: the running job stops after its step with a checkpoint and is resumed by the next
        worker (``interrupted``)."""
        self.worker_stop.set()
        if self._worker is not None:
            self._worker.join(timeout)

    def _work(self) -> None:
        """Run the worker; when the queue database fails it (locked, full disk, corrupt), log it and try again,
        waiting longer after each failure in a row: a damaged database must not flood the terminal."""
        wait, said = WORKER_RESTART_S, ""
        while not self.worker_stop.is_set():
            started, bug = time.monotonic(), None
            try:
                run_worker(self.queue, stop=self.worker_stop, poll=self.worker_poll, runner=self._run)
                continue  # it returns when the stop event is set
            except UserError as err:  # says what to do: one line, and only when it says something new
                message = str(err)
            except Exception as err:  # a bug: its traceback
                message, bug = "", err
            if time.monotonic() - started > WORKER_RESTART_MAX_S:
                wait, said = WORKER_RESTART_S, ""  # it worked for a while: this failure is a new one
            if bug is not None:
                log.error("the training queue worker stopped; it starts again in %g s", wait, exc_info=bug)
            if message and message != said:
                log.error("the training queue worker stopped: %s (it tries again, at most every %g s)", message,
                          WORKER_RESTART_MAX_S)
            said = message or said
            self.worker_stop.wait(wait)
            wait = min(2 * wait, WORKER_RESTART_MAX_S)

    def _run(self, config, emit, stop, resume):
        return (self.runner or default_runner)(config, emit, stop, resume)

    def jobs(self) -> list[QueuedJob]:
        """Every job in the queue, oldest first."""
        return self.queue.list()

    def _job_for(self, run_dir: Path, jobs: Optional[list[QueuedJob]] = None) -> Optional[QueuedJob]:
        """The newest queue job of a run folder (None if it never went through the queue)."""
        target = str(run_dir.resolve())
        mine = [j for j in (self.jobs() if jobs is None else jobs) if j.run_dir == target]
        return mine[-1] if mine else None

    # ---- runs -------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        """``outputs/<name>`` for a user-given run name (sanitized; never outside outputs). An existing run folder
        is taken by its own name, as the Run list shows it: one that ``train --out`` named with spaces or accents."""
        text = str(name or "").strip()
        if text and not text.startswith(("_", ".")) and Path(text).name == text and "\\" not in text:
            existing = self.outputs_dir / text
            try:
                if existing.is_dir() and existing.resolve().parent == self.outputs_dir:
                    return existing.resolve()
            except OSError:  # a name too long for a file name (a caption pasted into the box): made safe below
                pass
        safe = store.safe_run_name(name)
        path = (self.outputs_dir / safe).resolve()
        if path.parent != self.outputs_dir:
            raise UserError(f"run name {name!r} is not allowed")
        if safe.lower().startswith(self.queue.path.name) or (path.exists() and not path.is_dir()):
            raise UserError(f"run name {safe!r} is taken by a file in {self.outputs_dir}: pick another name")
        return path

    def run_names(self) -> list[str]:
        """Run folders (with a dataset or a training), newest first."""
        if not self.outputs_dir.is_dir():
            return []
        runs = [p for p in self.outputs_dir.iterdir()
                if p.is_dir() and not p.name.startswith(("_", "."))
                and ((p / "dataset").is_dir() or (p / "config.yaml").is_file())]
        return [p.name for p in newest_first(runs)]

    def active_job(self) -> Optional[QueuedJob]:
        """The job the worker is training now (None while the queue is idle)."""
        return next((j for j in self.jobs() if j.state in TRAINING), None)

    def active_run(self) -> Optional[str]:
        """The run of this app's outputs the worker is training now; None while the queue is idle or trains a run
        folder elsewhere (``queue add --out`` anywhere: its folder name may be a run's name here too)."""
        job = self.active_job()
        return self.shown_run(job) if job is not None and self._is_local(job) else None

    def training_label(self) -> Optional[str]:
        """What the page calls the run that trains now: its name, or its folder when it is not in outputs."""
        job = self.active_job()
        return None if job is None else self.shown_run(job)

    def _is_local(self, job: QueuedJob) -> bool:
        return Path(job.run_dir).resolve().parent == self.outputs_dir

    def shown_run(self, job: QueuedJob) -> str:
        """A job's run name, or its full folder for a run outside outputs (never mistaken for a run here)."""
        return Path(job.run_dir).name if self._is_local(job) else str(job.run_dir)

    def dataset_note(self, run: str) -> str:
        """A sentence for a dataset change made while ``run`` trains ("" otherwise): the running job works
        from the latents and captions it cached at its start, so the change waits for its next training."""
        if not run or self.active_run() != run:
            return ""
        return (f" Note: '{run}' is training on its dataset as it was at the start (images and captions are cached "
                "then); this change applies when the run is trained again.")

    def initial_run(self) -> str:
        """The run a freshly opened page shows: the one training, else the newest, else a new name."""
        return self.active_run() or next(iter(self.run_names()), None) or store.new_run_name(self.outputs_dir)

    def new_run(self, avoid: str = "") -> str:
        return store.new_run_name(self.outputs_dir, avoid=avoid)

    def runs(self) -> list[RunInfo]:
        """Trained runs on disk, with the queue's word on their state where it has one, after the runs that wait
        in the queue for their first start (newest first; their folder has no config.yaml before it)."""
        jobs = self.jobs()
        states = {}
        for job in jobs:  # oldest first: the newest job of a folder wins
            if job.state != "cancelled":
                states[job.run_dir] = job.state
        trained = list_runs(self.outputs_dir, states)
        listed = {r.name for r in trained}
        waiting = [RunInfo(name=Path(j.run_dir).name, path=j.run_dir, state="queued", step=0,
                           total_steps=j.planned_steps, resumable=False)
                   for j in reversed(jobs) if j.state == "queued" and Path(j.run_dir).name not in listed
                   and Path(j.run_dir).parent == self.outputs_dir.resolve()]
        return waiting + trained

    def run_list(self) -> list[tuple[str, str]]:
        """(label, run name) of every trained run, newest first: ``r1 — stopped at 3/10 · resumable``."""
        out = []
        for r in self.runs():
            if r.state in ("running", "queued"):  # a live step count would go stale here; the progress bar has it
                out.append((f"{r.name} — {r.state}" + (f" ({r.total_steps} steps)" if r.total_steps else ""), r.name))
                continue
            where = f"{r.step}/{r.total_steps}" if r.total_steps else "before the first step"
            state = "finished" if r.state == "done" else r.state  # the queue's word for it
            out.append((f"{r.name} — {state} at {where}" + (" · resumable" if r.resumable else ""), r.name))
        return out

    # ---- training ---------------------------------------------------------------------------
    def bases(self) -> list[str]:
        found = list_bases(self.models_dir)
        return found if self.default_base in found else [self.default_base, *found]

    describe_base = staticmethod(choices.describe_base)
    presets = staticmethod(list_presets)
    describe_preset = staticmethod(choices.describe_preset)
    preset_values = staticmethod(choices.preset_values)

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
        """Queue ``run`` for training on its dataset; returns (run actually used, message).

        The queue trains one run at a time: while another one trains this one waits, and the message
        says at which position. A run that was already trained (or is waiting in the queue) is not
        overwritten: its dataset is copied to a new run (``<run>-2``) which is queued instead.

        Raises:
            UserError: empty dataset, invalid settings (all listed), or the queue refused it.
        """
        run_dir = self.run_dir(run)
        if not store.list_items(run_dir):
            elsewhere = self.outside_data(run)
            raise UserError(f"'{run_dir.name}' trained on {elsewhere}, which stays outside the app: add images on "
                            "the Dataset tab to train it here, or Resume it from the Runs list" if elsewhere else
                            "the dataset is empty: add images on the Dataset tab first")
        self.refuse_while_captioning_on_gpu()
        overrides = form.overrides()
        parse_base(overrides["base"])  # a missing folder or unknown demo name is refused now, not after loading torch
        if form.precision == Precision.NF4.value:
            ok, why = self.nf4_status(full=True)
            if not ok:
                raise UserError(f"{why}; pick bf16, fp16 or auto")
        for key, value in base_sampling_defaults(overrides["base"]).items():  # the base's tuned sampling (studio.json)
            if overrides.get(f"sample_{key}") is None:
                overrides[f"sample_{key}"] = value
        if overrides.get("resolution") is None:  # an emptied box: the base's own size, as `train` takes it
            try:
                overrides["resolution"] = default_resolution(overrides["base"])
            except UserError:
                pass  # a base that is not there: _resolve says so
        config, warnings = self._resolve(form.preset, overrides, run_dir)  # refused settings leave no folder behind
        note = ""
        job = self._job_for(run_dir)
        live = job is not None and job.state in LIVE
        if live and _same_settings(job, config):  # a second press, not a variant: it would train the same twice
            doing = "waiting in the queue" if job.state == "queued" else "training"
            raise UserError(f"'{run}' is {doing} with these settings already (job {job.id}); to train a variant "
                            "beside it, change a setting and press Start again")
        # a run stopped or failed before it saved anything trained nothing: it starts again in its own folder
        trained = bool(checkpoint_dirs(run_dir)) or (run_dir / FILE_NAMES["kohya"]).is_file()
        if trained or (job is not None and job.state in ACTIVE):
            run_dir = self._copy_run(run_dir)
            was = {"queued": "is waiting in the queue", "running": "is training", "stopping": "is stopping"}.get(
                job.state if job is not None else "", "was already trained")
            note = f"'{run}' {was}, so its dataset was copied to a new run '{run_dir.name}' for these settings. "
            config, warnings = self._resolve(form.preset, overrides, run_dir)
        self.save_settings(run_dir.name, trigger=overrides["trigger"], preset=form.preset, base=overrides["base"])
        active = self.training_label()
        queued = self.queue.add(config)
        message = note + self._queued_message(queued, active, f"Training '{run_dir.name}': {config.steps} steps "
                                                              f"on {config.base}.")
        if warnings:
            message += " Warning: " + "; ".join(warnings)
        return run_dir.name, message

    @staticmethod
    def _resolve(preset: str, overrides: dict[str, Any], run_dir: Path):
        try:
            config, warnings = resolve_config(preset or "style", {**overrides, "data": str(store.dataset_dir(run_dir)),
                                                                  "out": str(run_dir)})
            check_objective(parse_base(config.base).arch, Objective.of(config))
            return config, warnings
        except ConfigError as err:
            raise UserError("cannot start: " + "; ".join(err.problems)) from None

    def _queued_message(self, job: QueuedJob, active: Optional[str], starting: str) -> str:
        """What the page says about a job just queued. Queuing also unloads a base the previews hold on the GPU:
        training needs that memory (see ``_preview_device``)."""
        freed = " The previews' base was unloaded from the GPU to leave its memory to training." \
            if self.mix.release_gpu() else ""
        if job.position is None or (active is None and job.position == 1):  # None: the worker took it already
            return starting + freed
        ahead = f"'{active}' is training" if active else "other runs are waiting"
        return (f"'{self.shown_run(job)}' is queued at position {job.position} (job {job.id}): {ahead}, and one "
                "run trains at a time; it starts by itself when its turn comes." + freed)

    def _copy_run(self, run_dir: Path) -> Path:
        """A new run with ``run_dir``'s dataset: ``<run>-2``, ``-3`` …; a copy of ``ink-2`` is ``ink-3``, not
        ``ink-2-2``."""
        stem, numbered = run_dir.name, re.fullmatch(r"(.+)-(\d+)", run_dir.name)
        if numbered and (run_dir.parent / numbered.group(1)).is_dir():
            stem = numbered.group(1)
        n = 2
        while (target := run_dir.with_name(f"{stem}-{n}")).exists():
            n += 1
        try:
            target.mkdir(parents=True)
            for sub in ("dataset", "thumbs"):
                if (run_dir / sub).is_dir():
                    shutil.copytree(run_dir / sub, target / sub)
            if (run_dir / "studio.json").is_file():
                shutil.copy2(run_dir / "studio.json", target / "studio.json")
        except OSError as err:  # a half copy would list as a run with half the dataset
            shutil.rmtree(target, ignore_errors=True)
            # copytree goes on past a failed file and then lists them all (shutil.Error): the first reason is enough
            first = err.args[0][0][2] if isinstance(err, shutil.Error) and err.args and err.args[0] else None
            reason = first or err.strerror or err
            raise WriteError(f"copying {run_dir.name}'s dataset to {target.name} failed ({reason}); the disk may be "
                             "full: free space and press Start again") from None
        return target

    def stop(self, run: Optional[str] = None) -> str:
        """Stop ``run`` (the one shown on the page): after its current step, with a final checkpoint and exports;
        a queued run leaves the queue. Another run that is training is never stopped from here: the message
        says which one trains and how to stop it. ``run=None``: whatever is training now.
        """
        jobs = self.jobs()
        training = next((j for j in jobs if j.state in TRAINING), None)
        job = training if run is None else self._job_for(self.run_dir(run), jobs)
        if job is not None and job.state in TRAINING:
            self.queue.cancel(job.id)
            return (f"Stopping '{self.shown_run(job)}' after the current step; a final checkpoint and the exports "
                    "are saved.")
        if job is not None and job.state == "queued":
            self.queue.cancel(job.id)
            return f"Took '{run}' out of the queue (job {job.id}); it will not run."
        if training is not None and not self._is_local(training):
            return (f"'{run}' is not training; {training.run_dir} (a run outside this app's outputs) is: cancel it in "
                    f"the Queue below (job {training.id}).")
        if training is not None:
            return (f"'{run}' is not training; '{Path(training.run_dir).name}' is. Select it in the Run box to stop it, "
                    "or cancel it in the Queue below.")
        return "Nothing is training."

    def job_run(self, job_id: int) -> str:
        """The run (folder name) of a queue job, "" for one outside outputs (no run of this page); raises UserError
        for an unknown job."""
        job = self.queue.get(int(job_id))
        return self.shown_run(job) if self._is_local(job) else ""

    def is_active(self, run: str) -> bool:
        """Whether a job of ``run`` is queued, training or stopping."""
        job = self._job_for(self.run_dir(run))
        return job is not None and job.state in LIVE

    def ended_line(self, run: str) -> Optional[str]:
        """How the run's last job ended, in one line; None while it waits or trains, or when it never ran."""
        job = self._job_for(self.run_dir(run))
        if job is not None and job.state == "cancelled":
            return f"'{self.run_dir(run).name}' was taken out of the queue (job {job.id}); it did not train."
        snap = self.snapshot(run)
        if snap is None or snap.state in LIVE:
            return None
        name = Path(snap.run_dir).name
        if snap.state == "stopped" and snap.step == 0:
            return f"'{name}' stopped before its first step: nothing was saved; Start trains it from the beginning."
        if snap.state == "stopped":
            return (f"'{name}' stopped at step {snap.step} of {snap.total_steps}: its checkpoint and LoRA files are "
                    "saved; Resume continues it.")
        if snap.state == "done":
            return f"'{name}' finished all {snap.total_steps} steps: its LoRA files are on the Export tab."
        if snap.state == "interrupted":
            return f"'{name}' was interrupted (the server stopped): Resume continues it from its last checkpoint."
        return f"'{name}' ended ({snap.state})" + (f": {snap.error}" if snap.error else ".")

    def cancel_job(self, job_id: int) -> str:
        """Cancel a queued job (it never runs) or stop the running one.

        Raises:
            UserError: no such job, or it already ended.
        """
        before = self.queue.get(int(job_id))
        after = self.queue.cancel(int(job_id))
        name = self.shown_run(after)
        if before.state in TRAINING:
            return f"Stopping job {after.id} ('{name}') after the current step; a final checkpoint is saved."
        return f"Cancelled job {after.id} ('{name}'); it will not run."

    def resume_job(self, job_id: int) -> str:
        """Queue a stopped, failed or interrupted job again, continuing from its last checkpoint.

        Raises:
            UserError: the job is not resumable (the queue says why).
        """
        self.refuse_while_captioning_on_gpu()
        active = self.training_label()
        if self.queue.get(int(job_id)).state == "done":  # the queue's own refusal names the CLI's --steps
            raise UserError(f"job {job_id} is done: to train it on, select its run, set “Train on to step” above "
                            "its steps and press Resume selected run")
        job = self.queue.resume(int(job_id))
        where = f"checkpoint {job.last_checkpoint}" if job.last_checkpoint else "step 0 (it had no checkpoint yet)"
        return self._queued_message(job, active, f"Resuming '{self.shown_run(job)}' from {where}.")

    def resume(self, run: str, steps: Any = None, lr: Any = None) -> str:
        """Resume ``run`` from its last checkpoint through the queue (its queue job if it has one).

        ``steps`` (a new total, more than the run has trained) also continues a finished run: the style
        was too faint, so train on from where it ended instead of starting again. ``lr`` (0 or empty: the
        run's own) sets a new peak learning rate from here, the advice after a diverged run.

        Raises:
            UserError: never trained, already finished (without more steps), no checkpoint, or already
                queued/training.
        """
        run_dir = self.run_dir(run)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"'{run}' has not been trained yet: press Start")
        self.refuse_while_captioning_on_gpu()
        job = self._job_for(run_dir)
        if job is not None and job.state in LIVE:
            raise UserError(f"'{run_dir.name}' is already {job.state} (job {job.id})")
        info = next((r for r in self.runs() if r.name == run_dir.name), None)
        total = self._continue_to(steps, info)
        new_lr = self._new_lr(lr)
        finished = info is not None and info.state == "done"
        if info is not None and not info.resumable and not (finished and total is not None):
            why = (f"it already finished: set “Train on to step” above its {info.step} steps to train it further"
                   if finished else "it has no checkpoint yet")
            raise UserError(f"'{run}' cannot be resumed: {why}")
        saved = self.run_config(run)
        message = self._resuming(run_dir.name, total, new_lr, saved.lr if saved else None)
        note = self._rotation_note(run, total) if total is not None else ""
        if job is not None and (job.resumable or job.state == "done"):  # a done job trains on with more steps
            if total is None and new_lr is None:
                return self.resume_job(job.id)
            active = self.training_label()  # before queuing: the worker may claim the job at once
            return self._queued_message(self.queue.resume(job.id, steps=total, lr=new_lr), active, message + note)
        from trainer.config import load_config  # a run trained before the queue existed (or outside it)

        active = self.training_label()
        config = replace(load_config(run_dir / "config.yaml"), out=str(run_dir))
        if total is not None:
            config = replace(config, steps=total)
        if new_lr is not None:
            config = replace(config, lr=new_lr)
        return self._queued_message(self.queue.add(config, resume=True), active, message + note)

    def _rotation_note(self, run: str, total: int) -> str:
        """Which kept checkpoints training on to ``total`` will delete (Keep checkpoints), so the artist can
        export them first; "" when none."""
        config = self.run_config(run)
        run_dir = self.run_dir(run)
        kept = [checkpoint_step(p) for p in checkpoint_dirs(run_dir)]
        if config is None or not kept:
            return ""
        every = config.checkpoint_every
        coming = [s for s in range(kept[-1] + 1, total + 1) if every and s % every == 0] + [total]
        survivors = sorted(set(kept) | set(coming))[-config.keep_checkpoints:]
        exported = exported_step_files(run_dir)
        lost = [s for s in kept if s not in survivors and s not in exported]
        if not lost:
            return ""
        return (f" On the way it deletes the checkpoints of step {', '.join(map(str, lost))} (it keeps "
                f"{config.keep_checkpoints}): pick them on the Export tab first to keep their LoRA files.")

    @staticmethod
    def _continue_to(steps: Any, info: Optional[RunInfo]) -> Optional[int]:
        """The form's "Train on to step" as a total step count beyond what the run trained (None: keep its own;
        so does 0, what the page's empty number box sends)."""
        if steps is None or str(steps).strip() == "":
            return None
        try:
            total = float(steps)
        except (TypeError, ValueError):
            total = float("nan")
        if total == 0:
            return None
        done = info.step if info is not None else 0
        if not (math.isfinite(total) and total.is_integer()):
            raise UserError(f"train on to step {steps!r}: give a whole number of steps")
        if total <= done:
            raise UserError(f"train on to step {int(total)}: give more than the {done} steps the run has trained")
        most = max(10 * done, MAX_TRAIN_ON)  # a typo with three zeros too many would train for months
        if total > most:
            raise UserError(f"train on to step {int(total)}: at most {most} here (10 × the {done} trained, or "
                            f"{MAX_TRAIN_ON}); train on in smaller stretches")
        return int(total)

    @staticmethod
    def _new_lr(lr: Any) -> Optional[float]:
        """The form's "Learning rate from here" (None: keep the run's own; so do 0 and an empty box)."""
        if lr is None or str(lr).strip() in ("", "0", "0.0"):
            return None
        try:
            value = float(lr)
        except (TypeError, ValueError):
            value = float("nan")
        if not (math.isfinite(value) and 0 < value <= 1):
            raise UserError(f"learning rate from here {lr!r}: give a number above 0 and at most 1, such as 5e-5 (0 "
                            "keeps the run's own)")
        return value

    @staticmethod
    def _resuming(name: str, total: Optional[int], lr: Optional[float], old_lr: Optional[float]) -> str:
        parts = [f"Resuming '{name}' from its last checkpoint"]
        if total:
            parts.append(f"on to step {total}")
        if lr is not None:
            parts.append(f"at learning rate {lr:g}" + (f" (was {old_lr:g})" if old_lr is not None else ""))
        return ", ".join(parts) + "."

    def snapshot(self, run: str) -> Optional[JobSnapshot]:
        """The run's progress from its events.jsonl (the worker's runs append to it live) and its state from
        the queue; re-read only when the file or the state changed, since every open page asks once a second."""
        try:
            run_dir = self.run_dir(run)
        except UserError:
            return None
        job = self._job_for(run_dir)
        state = job.state if job is not None and job.state != "cancelled" else None
        error = job.error if job is not None and job.state == "failed" else ""
        try:
            st = (run_dir / "events.jsonl").stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        key = (stamp, state, error, job.position if job is not None else None)
        cached = self._snapshots.get(run_dir)
        if cached is not None and cached[0] == key:
            return cached[1]
        history = ev.read_jsonl(run_dir / "events.jsonl") if stamp is not None else []
        if not history and state is None:
            snap = None
        else:
            snap = summarize(str(run_dir), state or disk_state(history), history)
            if error and not snap.error:
                snap = replace(snap, error=" ".join(error.split()))
        self._snapshots[run_dir] = (key, snap)
        return snap

    def queue_note(self, run: str) -> str:
        """One line for a run waiting in the queue: its position and what is training."""
        try:
            job = self._job_for(self.run_dir(run))
        except UserError:
            return ""
        if job is None or job.state != "queued":
            return ""
        return f"Queued at position {job.position} (job {job.id})."

    def run_config(self, run: str):
        """The run's TrainConfig, None when it has none (never trained) or it is unreadable."""
        from trainer.config import load_config

        try:
            return load_config(self.run_dir(run) / "config.yaml")
        except UserError:
            return None

    def outside_data(self, run: str) -> str:
        """The data folder a run trained on when it is not the run's own dataset (``train --data`` or ``queue add``
        from the command line), "" otherwise: its pictures stay there, and the app neither shows nor deletes them."""
        config = self.run_config(run)
        if config is None or not config.data:
            return ""
        run_dir = self.run_dir(run)
        data = Path(config.data).expanduser().resolve()  # relative: to where the run was started (before paths
        return "" if is_inside(data, run_dir) else str(data)  # were stored absolute); inside the run: its own

    def lr_history(self, run: str) -> str:
        """The peak learning rates of a run resumed at another rate; "" otherwise."""
        try:
            return learning_rate_history(self.run_dir(run))
        except UserError:
            return ""

    def recipe(self, run: str):
        """What ``run`` trains with: its queue job's config while the job waits or trains (a Start, or a Resume
        with new steps or learning rate, reaches config.yaml only when training begins), else its config.yaml."""
        import yaml

        from trainer.config import make_config

        try:
            job = self._job_for(self.run_dir(run))
        except UserError:
            return None
        if job is not None and job.state in LIVE:
            try:
                return make_config(yaml.safe_load(job.config_yaml))
            except (UserError, yaml.YAMLError, TypeError):
                pass
        return self.run_config(run)

    def compare_prompts(self, run: str) -> str:
        """Prompts to start the step comparison with: the run's sample prompts, else its first two captions (of
        its data folder when it was trained from the command line)."""
        config = self.run_config(run)
        prompts = list(config.sample_prompts) if config else []
        if not prompts:
            try:
                prompts = [item.caption for item in self.items(run) if item.caption.strip()][:2]
                if not prompts and config is not None:
                    prompts = [item.caption for item in scan_dataset(config.data).items if item.caption.strip()][:2]
            except UserError:
                prompts = []
        return "\n".join(" ".join(p.split()) for p in prompts)
