"""What the app and the CLI know about a run from its ``events.jsonl``: progress, loss curves, ETA and how
it ended (:func:`summarize`, :func:`disk_state`), the runs on disk (:func:`list_runs`), and the names of the
job states that own a run.

The web app trains through the queue's worker (``trainer.queue``) and talks to a run only through the queue
(a cancel is the loop's stop flag); ``python -m trainer train`` runs the loop in its own process. Both write
the events read here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from trainer import events as ev
from trainer.paths import newest_first

TRAINING = ("running", "stopping")  # a job that holds the accelerator now
LIVE = ("queued", *TRAINING)  # a job that will still train or write files: its run is not to be touched


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


def list_runs(outputs_dir: str | Path, states: Optional[dict[str, str]] = None) -> list[RunInfo]:
    """Every run folder (one with a ``config.yaml``) under ``outputs_dir``, newest first.

    Args:
        states: ``{absolute run folder: state}`` from whoever runs jobs (the queue);
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
