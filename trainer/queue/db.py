"""A small durable job queue on SQLite (the worker that drains it is :mod:`trainer.queue.worker`).

Runs wait in ``<outputs>/queue.sqlite3`` (stdlib ``sqlite3``, WAL mode) and a
worker trains them one at a time per device group (its ``CUDA_VISIBLE_DEVICES``)
through the same ``trainer.loop.run_training`` the CLI and the web app use.
The database only tracks jobs; everything a run produces stays in its run
folder, so losing the database never loses a run.

States::

    queued ──claim──> running ──> done | failed | stopped | interrupted
      │                  │cancel
      │cancel            └──> stopping ──> stopped
      └──> cancelled     (worker died: running -> interrupted, stopping -> stopped)

``interrupted`` (the worker died or was shut down) is resumable: a worker that
starts puts it back at its old place in the queue and continues from its last
checkpoint. ``stopped`` and ``failed`` resume only when asked (:meth:`JobQueue.resume`).

This module imports no torch, so the web app can enqueue and list cheaply.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import yaml

from trainer.bases import parse_base
from trainer.config import TrainConfig, dump_yaml, make_config
from trainer.checkpoint import checkpoint_dirs, checkpoint_step, fewer_steps
from trainer.errors import DataError, UserError
from trainer.job import LIVE

DB_NAME = "queue.sqlite3"
SCHEMA_VERSION = 1
STATES = ("queued", "running", "stopping", "done", "failed", "stopped", "cancelled", "interrupted")
ACTIVE = (*LIVE, "interrupted")  # states that own their run folder
RESUMABLE = ("interrupted", "stopped", "failed")
AUTO_RESUME_LIMIT = 3  # after more crashes than this a job waits for a person (it may be what kills its worker)
HOST = socket.gethostname()

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    run_dir TEXT NOT NULL,
    config_yaml TEXT NOT NULL,
    resume INTEGER NOT NULL DEFAULT 0,   -- continue from the run folder's last checkpoint
    group_name TEXT NOT NULL DEFAULT '', -- device group the job is pinned to ('' = any worker)
    device_group TEXT NOT NULL DEFAULT '', -- group of the worker that last claimed it
    created_at REAL NOT NULL,
    queued_at REAL NOT NULL,             -- queue order; a crashed job keeps its place
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    worker_host TEXT NOT NULL DEFAULT '',
    worker_pid INTEGER,
    worker_start TEXT NOT NULL DEFAULT '', -- process start time, so a reused pid is not taken for the worker
    claim TEXT NOT NULL DEFAULT '',      -- token of the current claim; a worker that lost its job notices
    crashes INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT ''
)""",
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, queued_at, id)",
)

# primary SQLite result codes (``sqlite_errorcode & 0xff``)
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26


class QueueError(UserError):
    """The queue database cannot be used (corrupt, locked, unwritable) or a request does not fit a job's state.
    ``transient``: it may clear by itself (a lock held by another process, a full disk), so a worker tries again."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class QueuedJob:
    """One row of the queue, as a snapshot (the web app's queue view draws these)."""

    id: int
    state: str
    run_dir: str
    config_yaml: str
    resume: bool
    group: str  # pinned device group, "" = any worker
    device_group: str  # group of the worker that ran it last
    created_at: float
    queued_at: float
    started_at: Optional[float]
    finished_at: Optional[float]
    heartbeat_at: Optional[float]
    worker_pid: Optional[int]
    crashes: int
    error: str
    token: str = ""
    position: Optional[int] = None  # 1-based place among queued jobs
    last_checkpoint: str = ""  # e.g. "step-000010"

    @property
    def config(self) -> TrainConfig:
        return make_config(yaml.safe_load(self.config_yaml) or {})

    @property
    def planned_steps(self) -> int:
        """The steps its stored config trains to (a resume with --steps changes it); 0 when the config no longer
        reads (the worker says why)."""
        try:
            return self.config.steps
        except (UserError, ValueError, yaml.YAMLError):
            return 0

    @property
    def resumable(self) -> bool:
        """True when :meth:`JobQueue.resume` would accept it (the web app's resume button)."""
        return self.state in RESUMABLE and (bool(self.last_checkpoint) or self.state == "interrupted")


def last_checkpoint(run_dir: str | Path) -> str:
    """Name of the run folder's newest complete checkpoint, "" if none."""
    found = checkpoint_dirs(Path(run_dir))
    return found[-1].name if found else ""


def _proc_stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time) of a process from /proc; None where there is no /proc (or no such process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def _pid_alive(pid: Optional[int], start: str) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state not in ("Z", "X") and (not start or started == start)


def _absolute(config: TrainConfig) -> TrainConfig:
    """Paths made absolute, so a worker started from another folder finds the same files."""
    changes = {name: str(Path(getattr(config, name)).expanduser().resolve())
               for name in ("data", "out", "base_config", "init_lora") if getattr(config, name)}
    if Path(config.base).expanduser().exists():  # a local folder or file, not demo:<arch> or a hub id
        changes["base"] = str(Path(config.base).expanduser().resolve())
    return replace(config, **changes)


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "never"


class JobQueue:
    """The queue in ``outputs_dir/queue.sqlite3``; every call opens its own short connection (thread-safe).

    Args:
        outputs_dir: the outputs folder (created if missing).
        busy_timeout: seconds to wait for another process's lock before :class:`QueueError`.
        stale_after: seconds without a heartbeat after which a worker on *another host* counts as dead
            (on this host the worker's pid is checked directly).

    Raises:
        QueueError: the database is corrupt, locked, unwritable, or from a newer version.
    """

    def __init__(self, outputs_dir: str | Path, busy_timeout: float = 5.0, stale_after: float = 120.0):
        self.outputs_dir = Path(outputs_dir)
        self.busy_timeout = busy_timeout
        self.stale_after = stale_after
        try:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise QueueError(f"cannot create the outputs folder {self.outputs_dir}: {err.strerror or err}") from None
        self.outputs_dir = self.outputs_dir.resolve()
        self.path = self.outputs_dir / DB_NAME
        self._open()

    # -- database plumbing -------------------------------------------------------------------------

    def _error(self, err: sqlite3.Error) -> QueueError:
        code = getattr(err, "sqlite_errorcode", 0) & 0xFF
        text = str(err)
        if code in (_BUSY, _LOCKED) or "locked" in text:
            return QueueError(
                f"queue database is locked by another process ({self.path}; waited {self.busy_timeout:g} s). "
                "Another queue command or worker is writing to it; try again in a moment, or find the process "
                f"holding it with `fuser {self.path}`", transient=True)
        if code in (_CORRUPT, _NOTADB) or "malformed" in text or "not a database" in text:
            return self._corrupt(text)
        if code in (_CANTOPEN, _READONLY, _IOERR, _FULL):
            return QueueError(f"cannot use the queue database {self.path} ({text}); check that the outputs folder "
                              "is writable and the disk is not full", transient=code in (_IOERR, _FULL))
        return QueueError(f"queue database {self.path}: {text}")

    def _corrupt(self, detail: str) -> QueueError:
        return QueueError(
            f"queue database {self.path} is corrupt ({detail}). Move it aside (mv {self.path} {self.path}.bad); "
            f"an empty queue is created on the next start. Runs under {self.outputs_dir} are not affected: "
            "add unfinished ones again with `queue add --out RUN --resume`")

    @contextlib.contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection; ``write`` wraps the block in ``BEGIN IMMEDIATE`` (one writer, decided up front)."""
        conn = None
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            if write:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if write:
                conn.execute("COMMIT")
        except sqlite3.Error as err:
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise self._error(err) from None
        except BaseException:
            if conn is not None and conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        finally:
            if conn is not None:
                conn.close()

    def _open(self) -> None:
        with self._db() as conn:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise self._corrupt(" ".join(" ".join(problems[:3]).split()))  # one line
            conn.execute("PRAGMA journal_mode=WAL")  # readers (the queue view) never wait for the worker
            has_meta = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
            version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if has_meta else None
        if version is None:
            with self._db(write=True) as conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(version[0]) > SCHEMA_VERSION:
            raise QueueError(f"queue database {self.path} was written by a newer version of the studio "
                             f"(schema {version[0]}, this one reads {SCHEMA_VERSION}); update, or use another outputs folder")

    def _row(self, conn: sqlite3.Connection, job_id: int) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise QueueError(f"no job {job_id} in the queue ({self.path}); `queue list` shows the jobs")
        return row

    def _job(self, row: sqlite3.Row, position: Optional[int] = None) -> QueuedJob:
        return QueuedJob(id=row["id"], state=row["state"], run_dir=row["run_dir"], config_yaml=row["config_yaml"],
                         resume=bool(row["resume"]), group=row["group_name"], device_group=row["device_group"],
                         created_at=row["created_at"], queued_at=row["queued_at"], started_at=row["started_at"],
                         finished_at=row["finished_at"], heartbeat_at=row["heartbeat_at"], worker_pid=row["worker_pid"],
                         crashes=row["crashes"], error=row["error"], token=row["claim"], position=position,
                         last_checkpoint=last_checkpoint(row["run_dir"]))

    def _worker_alive(self, row: sqlite3.Row) -> bool:
        if row["worker_host"] == HOST and os.name == "posix":
            return _pid_alive(row["worker_pid"], row["worker_start"])
        return row["heartbeat_at"] is not None and time.time() - row["heartbeat_at"] < self.stale_after

    def _recover(self, conn: sqlite3.Connection) -> list[int]:
        """Running jobs whose worker is gone: running -> interrupted, stopping -> stopped."""
        found = []
        for row in conn.execute("SELECT * FROM jobs WHERE state IN ('running', 'stopping')").fetchall():
            if self._worker_alive(row):
                continue
            ckpt = last_checkpoint(row["run_dir"])
            where = (f"the worker (pid {row['worker_pid']} on {row['worker_host'] or '?'}) stopped responding; "
                     f"last heartbeat {_when(row['heartbeat_at'])}")
            if row["state"] == "stopping":  # its final checkpoint and exports may not have been written
                state, crashes = "stopped", row["crashes"]
                note = f"{where} while stopping; " + (f"resume continues from checkpoint {ckpt}" if ckpt else
                                                      "it had no checkpoint yet")
            else:
                state, crashes = "interrupted", row["crashes"] + 1
                note = f"{where}; " + (f"resumes from checkpoint {ckpt}" if ckpt else "no checkpoint yet, it restarts from step 0")
            conn.execute("UPDATE jobs SET state = ?, crashes = ?, error = ?, finished_at = ?, claim = '' WHERE id = ?",
                         (state, crashes, note, time.time(), row["id"]))
            found.append(row["id"])
        return found

    def _clash(self, conn: sqlite3.Connection, run_dir: str, job_id: int = 0) -> None:
        row = conn.execute("SELECT id, state FROM jobs WHERE run_dir = ? AND id != ? AND state IN "
                           f"({', '.join('?' * len(ACTIVE))})", (run_dir, job_id, *ACTIVE)).fetchone()
        if row is not None:
            raise QueueError(f"run folder {run_dir} is already used by job {row['id']} ({row['state']}); "
                             f"pick another --out, or cancel job {row['id']} first")

    # -- the API -----------------------------------------------------------------------------------

    def add(self, config: TrainConfig, resume: bool = False, group: str = "") -> QueuedJob:
        """Queue a run; ``config.out`` is its run folder (made absolute, like every path in it).

        Args:
            resume: continue the run folder's last checkpoint (``train --resume``).
            group: pin the job to workers of this device group ("" = any worker).

        Raises:
            ConfigError: the config is invalid.
            DataError, ModelNotFoundError: the data folder or the base model does not exist.
            QueueError: the run folder is taken by an active job, or holds a run that is not being resumed.
        """
        config = _absolute(config)
        text = dump_yaml(config)
        make_config(yaml.safe_load(text))  # what the worker will load back, validated now
        parse_base(config.base)  # a missing base or data folder fails now, not at 3 a.m. in the worker
        if not Path(config.data).is_dir():
            raise DataError(f"data folder {config.data!r} does not exist; pass --data with a folder of images")
        ckpt = last_checkpoint(config.out)
        if resume and not ckpt:
            raise QueueError(f"nothing to resume in {config.out}: it has no checkpoint yet; queue it without --resume")
        if resume and (refused := fewer_steps(f"{config.out}", ckpt, config.steps)):
            raise QueueError(refused)
        if ckpt and not resume:
            raise QueueError(f"run folder {config.out} already holds a run (checkpoint {ckpt}); queue it with --resume "
                             "to continue that run, or pick a new --out")
        now = time.time()
        with self._db(write=True) as conn:
            self._recover(conn)
            self._clash(conn, config.out)
            cur = conn.execute("INSERT INTO jobs (state, run_dir, config_yaml, resume, group_name, created_at, queued_at) "
                               "VALUES ('queued', ?, ?, ?, ?, ?, ?)", (config.out, text, int(resume), group.strip(), now, now))
            job_id = cur.lastrowid
        return self.get(job_id)

    def list(self) -> list[QueuedJob]:
        """All jobs, oldest first, with each queued job's 1-based position."""
        with self._db() as conn:
            rows = conn.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        order = sorted((r for r in rows if r["state"] == "queued"), key=lambda r: (r["queued_at"], r["id"]))
        places = {r["id"]: i + 1 for i, r in enumerate(order)}
        return [self._job(r, places.get(r["id"])) for r in rows]

    def get(self, job_id: int) -> QueuedJob:
        for job in self.list():
            if job.id == job_id:
                return job
        raise QueueError(f"no job {job_id} in the queue ({self.path}); `queue list` shows the jobs")

    def cancel(self, job_id: int) -> QueuedJob:
        """queued/interrupted -> cancelled (never runs); running -> stopping (the worker stops it after the
        current step, writing a checkpoint and exports).

        Raises:
            QueueError: no such job, or it already ended.
        """
        with self._db(write=True) as conn:
            self._recover(conn)
            state = self._row(conn, job_id)["state"]
            if state in ("queued", "interrupted"):
                conn.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?", (time.time(), job_id))
            elif state == "running":
                conn.execute("UPDATE jobs SET state = 'stopping' WHERE id = ?", (job_id,))
            elif state != "stopping":
                raise QueueError(f"job {job_id} already ended ({state}); nothing to cancel")
        return self.get(job_id)

    def forget(self, run_dir: str | Path) -> int:
        """Remove the jobs of a run folder that is about to be deleted; returns how many. An interrupted job
        goes too (it would otherwise resume a folder that is gone).

        Raises:
            QueueError: one of them is queued, running or stopping: cancel or stop it first.
        """
        folder = str(Path(run_dir).expanduser().resolve())
        with self._db(write=True) as conn:
            self._recover(conn)
            row = conn.execute("SELECT id, state FROM jobs WHERE run_dir = ? AND state IN ('queued', 'running', "
                               "'stopping')", (folder,)).fetchone()
            if row is not None:
                what = "take it out of the queue" if row["state"] == "queued" else "stop it and wait until it has"
                raise QueueError(f"job {row['id']} of {Path(folder).name} is {row['state']}: {what} first")
            return conn.execute("DELETE FROM jobs WHERE run_dir = ?", (folder,)).rowcount

    def resume(self, job_id: int, steps: Optional[int] = None, lr: Optional[float] = None) -> QueuedJob:
        """Queue an interrupted, stopped or failed job again (at the back), continuing from its last checkpoint;
        an interrupted job without a checkpoint restarts from step 0. A done job trains on when ``steps`` is more
        than it trained (its style came out faint).

        Args:
            steps: a new total step count (as ``train --resume --steps``).
            lr: a new peak learning rate (as ``train --resume --lr``: the advice after a diverged run).

        Raises:
            QueueError: the job is not resumable, or its run folder is now used by another active job.
        """
        with self._db(write=True) as conn:
            self._recover(conn)
            row = self._row(conn, job_id)
            ckpt = last_checkpoint(row["run_dir"])
            if row["state"] == "done" and ckpt:
                trained = checkpoint_step(Path(ckpt))
                if steps is None or steps <= trained:
                    raise QueueError(f"job {job_id} is done: it trained all {trained} steps; to train it on, pass "
                                     f"--steps with more (e.g. --steps {2 * trained})")
            elif row["state"] not in RESUMABLE:
                raise QueueError(f"job {job_id} is {row['state']}; only {', '.join(RESUMABLE)} jobs can be resumed, and "
                                 "done ones that kept a checkpoint" if row["state"] == "done" else
                                 f"job {job_id} is {row['state']}; only {', '.join(RESUMABLE)} jobs can be resumed")
            if not ckpt and row["state"] != "interrupted":
                raise QueueError(f"job {job_id} has no checkpoint in {row['run_dir']} to resume from; "
                                 "queue the run again with `queue add`")
            if ckpt and steps is not None and (refused := fewer_steps(f"job {job_id}", ckpt, steps)):
                raise QueueError(refused)
            self._clash(conn, row["run_dir"], job_id)
            text = row["config_yaml"]
            changes = {k: v for k, v in (("steps", steps), ("lr", lr)) if v is not None}
            if changes:
                text = dump_yaml(make_config({**yaml.safe_load(text), **changes}))
            self._requeue(conn, job_id, bool(ckpt), text, queued_at=time.time())
        return self.get(job_id)

    def _requeue(self, conn: sqlite3.Connection, job_id: int, resume: bool, text: str, queued_at: float) -> None:
        conn.execute("UPDATE jobs SET state = 'queued', resume = ?, config_yaml = ?, queued_at = ?, finished_at = NULL, "
                     "error = '', claim = '' WHERE id = ?", (int(resume), text, queued_at, job_id))

    def recover(self) -> list[QueuedJob]:
        """Mark jobs whose worker died (crash, kill, power loss) interrupted; returns them."""
        with self._db(write=True) as conn:
            ids = self._recover(conn)
        return [job for job in self.list() if job.id in ids]

    def requeue_interrupted(self, limit: int = AUTO_RESUME_LIMIT) -> list[QueuedJob]:
        """Put interrupted jobs back at their old place (what a starting worker does); a job whose worker
        died more than ``limit`` times stays interrupted until someone resumes it."""
        with self._db(write=True) as conn:
            self._recover(conn)
            rows = conn.execute("SELECT * FROM jobs WHERE state = 'interrupted' AND crashes <= ?", (limit,)).fetchall()
            for row in rows:
                if conn.execute("SELECT 1 FROM jobs WHERE run_dir = ? AND id != ? AND state IN ('queued', 'running', "
                                "'stopping')", (row["run_dir"], row["id"])).fetchone():
                    continue
                self._requeue(conn, row["id"], bool(last_checkpoint(row["run_dir"])), row["config_yaml"], row["queued_at"])
        return [job for job in self.list() if job.id in {r["id"] for r in rows} and job.state == "queued"]

    def claim_next(self, group: str) -> Optional[QueuedJob]:
        """Atomically move the next queued job for ``group`` to running; None when there is none, or while
        another job of the group runs with a live worker (one job at a time per device group)."""
        with self._db(write=True) as conn:
            self._recover(conn)
            if conn.execute("SELECT 1 FROM jobs WHERE state IN ('running', 'stopping') AND device_group = ?",
                            (group,)).fetchone():
                return None
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' AND group_name IN ('', ?) "
                               "ORDER BY queued_at, id LIMIT 1", (group,)).fetchone()
            if row is None:
                return None
            now = time.time()
            conn.execute("UPDATE jobs SET state = 'running', device_group = ?, started_at = ?, heartbeat_at = ?, "
                         "finished_at = NULL, worker_host = ?, worker_pid = ?, worker_start = ?, claim = ?, error = '' "
                         "WHERE id = ?", (group, now, now, HOST, os.getpid(), (_proc_stat(os.getpid()) or ("", ""))[1],
                                          uuid.uuid4().hex, row["id"]))
            # read in the same transaction: a claim that commits always reaches its worker (a separate read that
            # failed would leave the job 'running' under a live process, holding its device group)
            return self._job(conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def heartbeat(self, job_id: int, token: str) -> Optional[str]:
        """Record that the worker holding claim ``token`` is alive; returns the job's state (``stopping``
        when cancelled), or None when the claim was lost (the job was recovered elsewhere)."""
        with self._db(write=True) as conn:
            conn.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND claim = ?", (time.time(), job_id, token))
            row = conn.execute("SELECT state FROM jobs WHERE id = ? AND claim = ?", (job_id, token)).fetchone()
        return row["state"] if row is not None else None

    def finish(self, job_id: int, state: str, error: str = "", token: Optional[str] = None) -> bool:
        """Record how a running job ended; False if it was no longer running (or no longer this claim's)."""
        if state not in ("done", "failed", "stopped", "interrupted"):
            raise ValueError(f"finish state must be done, failed, stopped or interrupted, not {state!r}")
        with self._db(write=True) as conn:
            cur = conn.execute("UPDATE jobs SET state = ?, error = ?, finished_at = ?, claim = '' WHERE id = ? AND "
                               "state IN ('running', 'stopping') AND (? IS NULL OR claim = ?)",
                               (state, error, time.time(), job_id, token, token))
        return cur.rowcount == 1
