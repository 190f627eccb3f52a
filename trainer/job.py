"""A training run in the background: start, stop (a flag), and a queue of events.

The web app and the CLI both drive training through :class:`Job`; the UI never
touches the loop. The loop checks the stop flag between steps, then writes a
final checkpoint and the exports (OneTrainer's ``get_stop_command`` pattern).
:class:`JobManager` makes sure only one job owns the accelerator at a time and
lists the runs on disk so a reopened page can show or resume them.
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from trainer import events as ev
from trainer.config import TrainConfig, load_config
from trainer.errors import JobBusyError, UserError
from trainer.paths import newest_first

Runner = Callable[[TrainConfig, ev.Emit, threading.Event, bool], object]

TRAINING = ("running", "stopping")  # a job that holds the accelerator now
LIVE = ("queued", *TRAINING)  # a job that will still train or write files: its run is not to be touched


def _default_runner(config: TrainConfig, emit: ev.Emit, stop: threading.Event, resume: bool):
    from trainer.loop import run_training  # imported lazily: torch is heavy and the UI starts fast

    return run_training(config, emit=emit, stop=stop, resume=resume)


@dataclass(frozen=True)
class JobSnapshot:
    """What a page needs to draw a run; built from its events, safe to share across threads."""

    run_dir: str
    state: str  # queued | running | stopping | done | stopped | failed
    step: int = 0
    total_steps: int = 0
    losses: tuple[tuple[int, float], ...] = ()
    eval_losses: tuple[tuple[int, float], ...] = ()  # the fixed-noise loss (eval_every)
    it_per_s: float = 0.0
    eta_s: float = 0.0
    samples: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    error: str = ""
    exports: tuple[str, ...] = ()
    checkpoint: str = ""


def due_after(step: int, total_steps: int, every: int) -> int:
    """How many multiples of ``every`` lie in (step, total_steps]: the renders the loop still does."""
    if every <= 0 or total_steps <= step:
        return 0
    return total_steps // every - step // every


def evals_due_after(step: int, total_steps: int, every: int) -> int:
    """The fixed-noise losses still to come: every ``every`` steps, and once at the last step."""
    if every <= 0 or total_steps <= step:
        return 0
    return due_after(step, total_steps, every) + (total_steps % every != 0)


def eta_seconds(step: int, total_steps: int, it_per_s: float, sample_every: int = 0, sample_seconds: float = 0.0,
                eval_every: int = 0, eval_seconds: float = 0.0) -> float:
    """The steps left at ``it_per_s``, plus the sample renders and evaluations still due at their last measured
    durations: neither is in a step's seconds, and on CPU rendering can take longer than the steps.

    0 while the speed is unknown (the page shows no ETA then); an unknown duration counts 0.
    """
    if not it_per_s:
        return 0.0
    remaining = max(total_steps - step, 0)
    return (remaining / it_per_s + due_after(step, total_steps, sample_every) * sample_seconds
            + evals_due_after(step, total_steps, eval_every) * eval_seconds)


def summarize(run_dir: str, state: str, events: list[ev.Event]) -> JobSnapshot:
    """Fold a run's events into a snapshot (used live and for runs read back from disk)."""
    snap = JobSnapshot(run_dir=run_dir, state=state)
    losses, eval_losses, log, samples, step_times = [], [], [], [], []
    sample_every = eval_every = 0  # the schedule, from the last start
    sample_seconds = eval_seconds = 0.0  # the last render's and evaluation's durations
    for e in events:
        if isinstance(e, ev.Start):
            sample_every, eval_every = e.sample_every, e.eval_every
            snap = replace(snap, total_steps=e.total_steps, step=e.start_step, error="")  # a resume starts clean
            # steps after the checkpoint it resumes from were lost with the killed process and are trained again:
            # the curve shows each step once, as trained by the run that kept it
            losses[:] = [(step, loss) for step, loss in losses if step <= e.start_step]
            eval_losses[:] = [(step, loss) for step, loss in eval_losses if step <= e.start_step]
            log.append(e.message or f"started: {e.images} images, {e.total_steps} steps ({e.arch})")
        elif isinstance(e, ev.Step):
            losses.append((e.step, e.loss))
            step_times.append(e.seconds)
            snap = replace(snap, step=e.step, total_steps=e.total_steps)
        elif isinstance(e, ev.Eval):
            eval_losses.append((e.step, e.loss))
            eval_seconds = e.seconds
        elif isinstance(e, ev.Checkpoint):
            snap = replace(snap, checkpoint=e.path)
            log.append(f"step {e.step}: checkpoint saved")
        elif isinstance(e, ev.Sample):
            samples = list(e.paths)
            sample_seconds = e.seconds
            log.append(f"step {e.step}: {len(e.paths)} sample image(s)")
        elif isinstance(e, ev.Log):
            log.append(e.message)
        elif isinstance(e, ev.Error):
            snap = replace(snap, error=e.message)
            log.append(f"error: {e.message}")
        elif isinstance(e, ev.Stopped):
            log.append(f"stopped at step {e.step}; checkpoint and exports written")
        elif isinstance(e, ev.Done):
            snap = replace(snap, exports=e.exports)
            log.append(f"done at step {e.step}")
    recent = step_times[-20:]
    it_per_s = len(recent) / sum(recent) if recent and sum(recent) > 0 else 0.0
    eta = eta_seconds(snap.step, snap.total_steps, it_per_s, sample_every, sample_seconds, eval_every, eval_seconds)
    return replace(snap, losses=tuple(losses), eval_losses=tuple(eval_losses), samples=tuple(samples), log=tuple(log[-200:]),
                   it_per_s=it_per_s, eta_s=eta)


class Job:
    """One training run on a background thread.

    Args:
        config: the validated run config; ``config.out`` is the run folder.
        resume: continue from the run folder's last checkpoint.
        runner: the training function (tests inject fakes; default is ``trainer.loop.run_training``).
    """

    def __init__(self, config: TrainConfig, resume: bool = False, runner: Optional[Runner] = None):
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.out)
        self.events: "queue.Queue[ev.Event]" = queue.Queue()
        self._runner = runner or _default_runner
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._history: list[ev.Event] = []
        self._lock = threading.Lock()
        self._state = "queued"
        self.result = None

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def is_active(self) -> bool:
        return self.state in LIVE

    def start(self) -> "Job":
        if self.resume:  # show the losses and samples from before the interruption too
            self._history = ev.read_jsonl(self.run_dir / "events.jsonl")
        self._thread = threading.Thread(target=self._run, name=f"train:{self.run_dir.name}", daemon=True)
        with self._lock:
            self._state = "running"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the loop to stop at the next step boundary (it saves before it exits)."""
        self._stop.set()
        with self._lock:
            if self._state == "running":
                self._state = "stopping"

    def wait(self, timeout: Optional[float] = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.is_active()

    def _emit(self, event: ev.Event) -> None:
        self.events.put(event)

    def _run(self) -> None:
        final = "done"
        try:
            self.result = self._runner(self.config, self._emit, self._stop, self.resume)
            if self._stop.is_set():
                final = "stopped"
        except UserError as err:
            final = "failed"
            self._emit(ev.Error(message=str(err)))
        except Exception as err:  # a bug: keep the app alive, show one line, keep the traceback in the log
            final = "failed"
            self._emit(ev.Error(message=f"internal error: {type(err).__name__}: {err} "
                                            "(the full traceback is in the log; please report it)"))
            self._emit(ev.Log(message=traceback.format_exc()))
        with self._lock:
            self._state = final

    def drain(self) -> list[ev.Event]:
        """Move queued events into the job's history; returns the new ones."""
        new = []
        while True:
            try:
                new.append(self.events.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._history.extend(new)
        return new

    def snapshot(self) -> JobSnapshot:
        self.drain()
        with self._lock:
            history = list(self._history)
            state = self._state
        return summarize(str(self.run_dir), state, history)


def disk_state(history: list[ev.Event]) -> str:
    """How a run that is not running ended, from the events after its last start (a resumed run
    that was stopped earlier and then finished is ``done``)."""
    starts = [i for i, e in enumerate(history) if isinstance(e, ev.Start)]
    tail = history[starts[-1]:] if starts else history
    for e in reversed(tail):
        if isinstance(e, ev.Done):
            return "done"
        if isinstance(e, ev.Stopped):
            return "stopped"
        if isinstance(e, ev.Error):
            return "failed"
    return "interrupted"


@dataclass(frozen=True)
class RunInfo:
    name: str
    path: str
    state: str  # done | stopped | failed | interrupted | running | queued | stopping | cancelled
    step: int
    total_steps: int
    resumable: bool


class JobManager:
    """Owns the single accelerator: at most one active job; lists runs under ``outputs_dir``."""

    def __init__(self, outputs_dir: str | Path, runner: Optional[Runner] = None):
        self.outputs_dir = Path(outputs_dir)
        self._runner = runner
        self._job: Optional[Job] = None
        self._lock = threading.Lock()

    def current(self) -> Optional[Job]:
        with self._lock:
            return self._job

    def start(self, config: TrainConfig, resume: bool = False) -> Job:
        """Start a job, or raise :class:`JobBusyError` while another one runs."""
        with self._lock:
            if self._job is not None and self._job.is_active():
                raise JobBusyError(
                    f"a training run is already in progress ({self._job.run_dir.name}); "
                    "stop it or wait for it to finish before starting another"
                )
            self._job = Job(config, resume=resume, runner=self._runner).start()
            return self._job

    def resume(self, run_name: str) -> Job:
        run_dir = self.run_path(run_name)
        config = load_config(run_dir / "config.yaml")
        return self.start(replace(config, out=str(run_dir)), resume=True)

    def snapshot(self, run_dir: str | Path) -> Optional[JobSnapshot]:
        """The live snapshot if ``run_dir`` is the current job's folder, else one read from its
        ``events.jsonl`` (``None`` when the folder has no events yet)."""
        run_dir = Path(run_dir)
        job = self.current()
        if job is not None and job.run_dir.resolve() == run_dir.resolve():
            return job.snapshot()
        history = ev.read_jsonl(run_dir / "events.jsonl")
        if not history:
            return None
        return summarize(str(run_dir), disk_state(history), history)

    def run_path(self, run_name: str) -> Path:
        """The folder of run ``run_name``; names that would escape ``outputs_dir`` are refused."""
        candidate = (self.outputs_dir / run_name).resolve()
        if candidate.parent != self.outputs_dir.resolve() or not (candidate / "config.yaml").is_file():
            raise UserError(f"no run named {run_name!r} under {self.outputs_dir}")
        return candidate

    def list_runs(self) -> list[RunInfo]:
        current = self.current()
        live = {}
        if current is not None and current.is_active():
            live[str(current.run_dir.resolve())] = "running"
        return list_runs(self.outputs_dir, live)


def list_runs(outputs_dir: str | Path, states: Optional[dict[str, str]] = None) -> list[RunInfo]:
    """Every run folder (one with a ``config.yaml``) under ``outputs_dir``, newest first.

    Args:
        states: ``{absolute run folder: state}`` from whoever runs jobs (the job manager, the queue);
            it overrides the state read from ``events.jsonl``. Only a run in state interrupted,
            stopped or failed with a checkpoint is resumable.
    """
    outputs_dir, states = Path(outputs_dir), states or {}
    runs: list[RunInfo] = []
    if not outputs_dir.is_dir():
        return runs
    for run_dir in newest_first(outputs_dir.iterdir()):
        if run_dir.name.startswith((".", "_")) or not (run_dir / "config.yaml").is_file():
            continue  # hidden: a run on its way out (trainer.housekeeping), the uploads folder
        history = ev.read_jsonl(run_dir / "events.jsonl")
        state = states.get(str(run_dir.resolve())) or disk_state(history)
        snap = summarize(str(run_dir), state, history)
        has_ckpt = any((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else False
        runs.append(RunInfo(name=run_dir.name, path=str(run_dir), state=state, step=snap.step,
                            total_steps=snap.total_steps,
                            resumable=has_ckpt and state in ("interrupted", "stopped", "failed")))
    return runs
