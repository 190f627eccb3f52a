"""A durable queue of training runs: the SQLite job table (:mod:`.db`) and the worker that drains it (:mod:`.worker`).

Runs wait in ``<outputs>/queue.sqlite3``; the database only tracks jobs, everything a run produces
stays in its run folder, so losing the database never loses a run. Nothing here imports torch
until a worker has a job, so the web app can enqueue and list cheaply.
"""

from trainer.queue.db import (ACTIVE, AUTO_RESUME_LIMIT, DB_NAME, RESUMABLE, STATES, JobQueue, QueuedJob, QueueError,
                              last_checkpoint)
from trainer.queue.worker import Runner, default_group, default_runner, run_worker

__all__ = ["ACTIVE", "AUTO_RESUME_LIMIT", "DB_NAME", "RESUMABLE", "STATES", "JobQueue", "QueuedJob", "QueueError",
           "Runner", "default_group", "default_runner", "last_checkpoint", "run_worker"]
