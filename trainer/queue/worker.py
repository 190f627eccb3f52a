"""The worker that drains the queue: one job at a time per device group, with heartbeats.

It trains through the same ``trainer.loop.run_training`` the CLI and the web app use (imported only
when there is work, so listing and enqueueing stay torch-free). A cancel (state ``stopping``) or a
worker shutdown becomes the training loop's stop flag; a crash of the job is recorded, not raised.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

from trainer import events as ev
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.queue.db import JobQueue, QueueError, QueuedJob

log = logging.getLogger(__name__)

Runner = Callable[[TrainConfig, ev.Emit, threading.Event, bool], object]
JobEmit = Callable[[QueuedJob, ev.Event], None]


def default_group() -> str:
    """This process's device group: its CUDA_VISIBLE_DEVICES, or "default"."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "") or "default"


def default_runner(config: TrainConfig, emit: ev.Emit, stop: threading.Event, resume: bool):
    from trainer.loop import run_training  # torch is imported only by a worker that has work

    return run_training(config, emit=emit, stop=stop, resume=resume)


def run_worker(queue: JobQueue, group: Optional[str] = None, once: bool = False, poll: float = 1.0,
               stop: Optional[threading.Event] = None, runner: Optional[Runner] = None,
               emit: Optional[JobEmit] = None, on_job: Optional[Callable[[QueuedJob], None]] = None,
               auto_resume: bool = True) -> list[QueuedJob]:
    """Run queued jobs one at a time until ``stop`` is set (or, with ``once``, until none is left to claim).

    Args:
        group: device group (default: CUDA_VISIBLE_DEVICES or "default"); one job at a time per group.
        poll: seconds between looks at an empty queue, and between heartbeats.
        stop: set it to shut the worker down; the running job stops after its current step with a checkpoint
            and becomes ``interrupted`` (a worker that starts later continues it).
        runner: the training function (tests inject fakes; default ``trainer.loop.run_training``).
        emit: receives ``(job, event)`` for every training event (events.jsonl gets them anyway).
        on_job: called with each job when it starts and when it ends.
        auto_resume: put interrupted jobs back in the queue on start.

    Returns:
        The jobs this worker ran, as they ended.
    """
    group = (group if group is not None else default_group()).replace(" ", "") or "default"
    stop = stop or threading.Event()
    if auto_resume:
        for job in queue.requeue_interrupted():  # recovers jobs of dead workers first; said, as nobody pressed Resume
            log.warning("job %d (%s) was interrupted when its worker stopped: it continues from %s "
                        "(`python -m trainer queue cancel %d` takes it out)", job.id, Path(job.run_dir).name,
                        "its last checkpoint" if job.resume else "step 0 (it had no checkpoint yet)", job.id)
    else:
        queue.recover()
    finished = []
    while not stop.is_set():
        try:
            job = queue.claim_next(group)
        except QueueError as err:
            if once or not err.transient:  # a corrupt or unwritable database: its message says what to do
                raise
            log.warning("could not look at the queue, trying again: %s", err)  # a long lock elsewhere, a full disk
            stop.wait(poll)
            continue
        if job is None:
            if once:
                break
            stop.wait(poll)
            continue
        finished.append(_run_job(queue, job, runner or default_runner, stop, poll, emit, on_job))
    return finished


def _run_job(queue: JobQueue, job: QueuedJob, runner: Runner, worker_stop: threading.Event, poll: float,
             emit: Optional[JobEmit], on_job: Optional[Callable[[QueuedJob], None]]) -> QueuedJob:
    if on_job is not None:
        on_job(job)
    job_stop, ended = threading.Event(), threading.Event()
    why = {"stop": ""}

    def watch() -> None:
        """Heartbeats, and turns a cancel (state ``stopping``) or a worker shutdown into the loop's stop flag."""
        next_beat = 0.0
        while not ended.wait(min(poll, 0.25)):
            if worker_stop.is_set() and not job_stop.is_set():
                why["stop"] = "worker"
                job_stop.set()
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + poll
            try:
                state = queue.heartbeat(job.id, job.token)
            except QueueError as err:  # a long lock elsewhere; try again at the next beat
                log.warning("job %s: heartbeat skipped: %s", job.id, err)
                continue
            if state in (None, "stopping") and not job_stop.is_set():
                why["stop"] = "cancel" if state == "stopping" else "lost"
                job_stop.set()

    watcher = threading.Thread(target=watch, name=f"queue-heartbeat:{job.id}", daemon=True)
    watcher.start()
    state, error = "interrupted", "the worker was aborted during this job"  # unless the runner returns or raises
    try:
        config = job.config
        forward = (lambda event: emit(job, event)) if emit is not None else (lambda event: None)
        result = runner(config, forward, job_stop, job.resume)
        state, error = "done", ""
        if getattr(result, "stopped", job_stop.is_set()):
            state = "interrupted" if why["stop"] == "worker" else "stopped"
            if state == "interrupted":
                error = "the worker was shut down; the run continues when a worker starts again"
    except UserError as err:  # ConfigError, TrainingDiverged, data/base problems: the user can act on these
        state, error = "failed", str(err)
    except Exception as err:  # a bug: keep the worker alive for the next job; the traceback goes to the log
        log.exception("job %s crashed", job.id)
        state, error = "failed", f"internal error: {type(err).__name__}: {err} (the traceback is in the worker's log)"
    finally:
        ended.set()
        watcher.join()
        if not _record(queue, job, state, error, worker_stop, poll):
            log.warning("job %s was taken over while it ran (its worker was thought dead); its result is not recorded", job.id)
    try:
        done = queue.get(job.id)
    except QueueError:
        done = replace(job, state=state, error=error)
    if on_job is not None:
        on_job(done)
    return done


def _record(queue: JobQueue, job: QueuedJob, state: str, error: str, worker_stop: threading.Event,
            poll: float) -> bool:
    """``queue.finish``, tried again while the database is locked or full: a job left ``running`` under a live
    worker would hold its device group, and every later job would wait on it. Gives up after a few tries once
    the worker is shutting down (the next worker then recovers the job as ``interrupted``)."""
    wait, tries = min(poll, 0.5), 0
    while True:
        try:
            return queue.finish(job.id, state, error, token=job.token)
        except QueueError as err:
            tries += 1
            if not err.transient or (worker_stop.is_set() and tries >= 3):
                log.error("job %s: its end (%s) could not be recorded: %s", job.id, state, err)
                return True
            log.warning("job %s: recording its end failed, trying again: %s", job.id, err)
            if worker_stop.is_set():
                time.sleep(min(wait, 1.0))  # shutting down: a few quick tries, then the next worker recovers it
            else:
                worker_stop.wait(wait)
            wait = min(wait * 2, 10.0)
