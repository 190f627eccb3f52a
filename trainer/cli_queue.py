"""``python -m trainer queue {add,list,cancel,resume,run}``: queue runs now, train them one by one later.

``queue add`` takes the same flags as ``train`` and stores the validated config;
``queue run`` is the worker (Ctrl-C stops the current job after its step, with a
checkpoint, and the next ``queue run`` continues it). See docs/queue.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from trainer import events as ev
from trainer.errors import UserError
from trainer.job import TRAINING
from trainer.queue import JobQueue, QueueError, QueuedJob, default_group, run_worker


def add_arguments(p: argparse.ArgumentParser) -> None:
    from trainer import cli_train

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--outputs", default="outputs",
                        help="outputs folder holding queue.sqlite3 and the run folders (default: outputs)")
    sub = p.add_subparsers(dest="queue_action", required=True, metavar="{add,list,cancel,resume,run}")

    add = sub.add_parser("add", parents=[common], help="queue a training run (takes the same flags as `train`)")
    cli_train.add_arguments(add)
    add.add_argument("--group", default="", help="only a worker with this CUDA_VISIBLE_DEVICES may run it (default: any)")

    sub.add_parser("list", parents=[common], help="show the jobs: state, place in the queue, run folder")
    cancel = sub.add_parser("cancel", parents=[common], help="drop a queued job, or stop a running one after its step")
    cancel.add_argument("id", type=int)
    resume = sub.add_parser("resume", parents=[common], help="queue an interrupted, stopped or failed job again")
    resume.add_argument("id", type=int)
    resume.add_argument("--steps", type=int, help="new total step count (default: the job's own)")
    resume.add_argument("--lr", type=float, help="new learning rate (default: the job's own; lower it after a "
                                                 "diverged run)")

    work = sub.add_parser("run", parents=[common], help="the worker: train queued jobs one at a time")
    work.add_argument("--once", action="store_true", help="exit when nothing is left to run (default: wait for more)")
    work.add_argument("--group", default=None,
                      help="device group; one job at a time per group (default: CUDA_VISIBLE_DEVICES, else 'default')")
    work.add_argument("--poll", type=float, default=1.0, help="seconds between looks at an empty queue (default 1)")


def run(args: argparse.Namespace) -> int:
    action = args.queue_action
    if action not in ("add", "run") and not (Path(args.outputs) / "queue.sqlite3").is_file():
        # reading a queue never creates one: a mistyped --outputs would otherwise show an empty queue
        raise QueueError(f"no queue in {args.outputs} (it has no queue.sqlite3): check --outputs; "
                         "`python -m trainer queue add` starts one")
    queue = JobQueue(args.outputs)
    if action == "add":
        return _add(queue, args)
    if action == "list":
        with contextlib.suppress(QueueError):  # show a dead worker's job as interrupted; a busy database can wait
            queue.recover()
        _print_table(queue.list())
        return 0
    if action == "cancel":
        job = queue.cancel(args.id)
        print(f"job {job.id}: " + ("will stop after its current step (checkpoint and exports are written)"
                                   if job.state == "stopping" else "cancelled; it will not run"))
        return 0
    if action == "resume":
        job = queue.resume(args.id, steps=args.steps, lr=args.lr)
        how = f"from checkpoint {job.last_checkpoint}" if job.resume else "from step 0 (it had no checkpoint)"
        print(f"job {job.id} queued again at position {job.position}, continuing {how}")
        return 0
    return _work(queue, args)


def _add(queue: JobQueue, args: argparse.Namespace) -> int:
    from trainer.cli_train import config_from_args
    from trainer.config import load_yaml

    if (getattr(args, "num_processes", None) or 1) > 1:
        raise UserError("--num-processes is for `train`; the queue worker trains each job in one process "
                        "(one job at a time per device group)")
    config, warnings = config_from_args(args)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out_given = args.out is not None or (args.config and "out" in load_yaml(args.config))
    if not out_given:  # `train` puts runs in ./outputs/<data folder>; the queue uses its own outputs folder
        config = replace(config, out=str(Path(args.outputs) / Path(config.data).resolve().name))
    job = queue.add(config, resume=args.resume, group=args.group)
    print(f"queued job {job.id} at position {job.position}: {job.run_dir}")
    if not any(j.state in TRAINING for j in queue.list()):
        print(f"start a worker with: python -m trainer queue run --outputs {args.outputs}", file=sys.stderr)
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(t)) if t else "-"


def _progress(job: QueuedJob) -> str:
    """``step/total`` from the run's events (the queue itself does not track steps); a queued job's total is the
    one it will train to (``queue resume --steps`` changed it)."""
    step = total = 0
    for event in ev.read_jsonl(Path(job.run_dir) / "events.jsonl"):
        if isinstance(event, ev.Start):
            step, total = event.start_step, event.total_steps
        elif isinstance(event, ev.Step):
            step, total = event.step, event.total_steps
    if job.state == "queued":
        total = job.planned_steps or total
    return f"{step}/{total}" if total else "-"


def _print_table(jobs: list[QueuedJob]) -> None:
    if not jobs:
        print("the queue is empty; add a run with: python -m trainer queue add --config run.yaml")
        return
    rows = [("ID", "STATE", "POS", "GROUP", "STEP", "ADDED", "STARTED", "ENDED", "RUN", "NOTE")]
    for job in jobs:
        note = job.error + (" [resumable]" if job.resumable else "")
        rows.append((str(job.id), job.state, str(job.position or "-"), job.device_group or job.group or "any",
                     _progress(job), _when(job.created_at), _when(job.started_at), _when(job.finished_at),
                     job.run_dir, note.strip()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _work(queue: JobQueue, args: argparse.Namespace) -> int:
    stop = threading.Event()

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nworker stopping: the current job stops after this step with a checkpoint and continues when a "
              "worker starts again (Ctrl-C again to abort)", file=sys.stderr)

    def on_job(job: QueuedJob) -> None:
        if job.state == "running":
            how = f"resuming from {job.last_checkpoint}" if job.resume else "from the start"
            print(f"job {job.id} started ({how}): {job.run_dir}", flush=True)
        else:
            print(f"job {job.id} {job.state}" + (f": {job.error}" if job.error else ""), flush=True)

    def on_event(job: QueuedJob, event: ev.Event) -> None:
        if isinstance(event, ev.Log):
            print(f"job {job.id}: note: {event.message}", file=sys.stderr, flush=True)
        elif isinstance(event, ev.Checkpoint):
            print(f"job {job.id}: step {event.step} checkpoint saved", flush=True)

    group = args.group if args.group is not None else default_group()
    print(f"worker pid {os.getpid()}, device group {group!r}, queue {queue.path}"
          + ("" if args.once else " (Ctrl-C to stop)"), flush=True)
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signals can only be caught there
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ran = run_worker(queue, group=group, once=args.once, poll=args.poll, stop=stop, emit=on_event, on_job=on_job)
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
    counts = {s: sum(j.state == s for j in ran) for s in dict.fromkeys(j.state for j in ran)}
    print(f"worker done: {len(ran)} job(s)" + "".join(f", {n} {s}" for s, n in counts.items()))
    left = [j for j in queue.list() if j.state in ("queued", "running", "stopping")]
    if args.once and left and not stop.is_set():  # said, so that a person sees the queue was not emptied
        held = ", ".join(f"job {j.id} {j.state}, group {j.group or 'any'}" for j in left[:3])
        print(f"{len(left)} job(s) not done: another worker or device group holds them ({held}); `queue list` shows "
              "them", flush=True)
    return 1 if counts.get("failed") else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m trainer queue`` calls :func:`run`): user errors are one line and exit 2."""
    from trainer.__main__ import OneLineParser, _quiet_libraries, run_command

    parser = OneLineParser(prog="python -m trainer queue", description="A durable queue of training runs.")
    add_arguments(parser)
    args = parser.parse_args(argv)

    if args.queue_action == "run":  # the worker loads diffusers/transformers; their chatter is not for artists
        _quiet_libraries()
    return run_command(run, args)
