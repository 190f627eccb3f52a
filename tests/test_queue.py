"""The durable job queue: runs finish in order, a killed worker's run resumes, a bad database is a clear error."""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import tiny_config
from trainer import events as ev
from trainer.config import load_config
from trainer.errors import DataError, ModelNotFoundError, UserError
from trainer.queue import AUTO_RESUME_LIMIT, JobQueue, QueueError, run_worker

REPO = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from trainer.cli_queue import main; sys.exit(main(sys.argv[1:]))"


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before {what}: {log.read_text() if log else ''}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def light_config(tmp_path: Path, name: str, **overrides):
    """A valid config for fake runners (no model is loaded)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    return tiny_config("demo:sd15", tmp_path / "data", tmp_path / "outputs" / name, **overrides)


def fake_runner(ran: list, fail: dict | None = None):
    """Records (run name, resume) and ends like run_training; ``fail`` maps run names to exceptions."""
    def runner(config, emit, stop, resume):
        name = Path(config.out).name
        ran.append((name, resume))
        if fail and name in fail:
            raise fail[name]
        return SimpleNamespace(stopped=False)
    return runner


def blocking_runner(started: threading.Event):
    """Trains 'forever' until the stop flag is set, like the loop checking it between steps."""
    def runner(config, emit, stop, resume):
        started.set()
        assert stop.wait(30), "the stop flag never came"
        return SimpleNamespace(stopped=True)
    return runner


def fake_checkpoint(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    (ckpt / "adapter.safetensors").write_bytes(b"x")


def dead_worker_claims(outputs: Path) -> int:
    """A worker process claims the next job and is killed: the job is left 'running' with a dead pid."""
    code = ("import sys, time; from trainer.queue import JobQueue; "
            "job = JobQueue(sys.argv[1]).claim_next('default'); print(job.id, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(outputs)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        job_id = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    return job_id


# -- real training ---------------------------------------------------------------------------------

def test_three_queued_runs_all_finish_in_order(base_dirs, scene_dir, tmp_path):
    queue = JobQueue(tmp_path / "outputs")
    added = [queue.add(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "outputs" / f"run{i}", steps=2))
             for i in range(3)]
    assert [j.position for j in added] == [1, 2, 3] and {j.state for j in added} == {"queued"}

    ran = run_worker(queue, once=True, poll=0.1)

    assert [j.id for j in ran] == [j.id for j in added]
    jobs = queue.list()
    assert [j.state for j in jobs] == ["done"] * 3 and all(j.error == "" for j in jobs)
    for job in jobs:
        assert (Path(job.run_dir) / "lora.safetensors").is_file()
        assert (Path(job.run_dir) / "lora_diffusers.safetensors").is_file()
        assert isinstance(ev.read_jsonl(Path(job.run_dir) / "events.jsonl")[-1], ev.Done)
        assert job.created_at <= job.started_at <= job.finished_at and job.device_group == "default"
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier.created_at <= later.created_at and earlier.finished_at <= later.started_at  # one at a time


@pytest.mark.slow
def test_killed_worker_is_recovered_and_its_run_resumes(base_dirs, scene_dir, tmp_path):
    outputs = tmp_path / "outputs"
    queue = JobQueue(outputs)
    job = queue.add(tiny_config(str(base_dirs["sd15"]), scene_dir, outputs / "long", steps=300, checkpoint_every=2))
    run_dir = Path(job.run_dir)
    log = tmp_path / "worker.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", ENTRY, "run", "--once", "--poll", "0.2", "--outputs", str(outputs)],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=err, stderr=err)
    try:
        wait_for(lambda: queue.get(job.id).last_checkpoint, 240, "the first checkpoint", proc, log)
        assert queue.get(job.id).state == "running" and queue.get(job.id).worker_pid == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert queue.get(job.id).state == "running"  # nobody has noticed yet
    assert not (run_dir / "lora.safetensors").exists()

    [recovered] = queue.recover()
    killed_at = int(recovered.last_checkpoint.split("-")[1])
    assert recovered.id == job.id and recovered.state == "interrupted" and recovered.resumable
    assert recovered.crashes == 1 and f"resumes from checkpoint {recovered.last_checkpoint}" in recovered.error
    assert 0 < killed_at < 300

    # the rest of 300 steps would take minutes here; a new learning rate, as after a diverged run
    requeued = queue.resume(job.id, steps=killed_at + 2, lr=5e-5)
    assert requeued.state == "queued" and requeued.resume and requeued.position == 1
    assert (requeued.config.steps, requeued.config.lr) == (killed_at + 2, 5e-5)
    [finished] = run_worker(queue, once=True, poll=0.1)
    assert load_config(run_dir / "config.yaml").lr == 5e-5

    assert finished.id == job.id and finished.state == "done", finished.error
    history = ev.read_jsonl(run_dir / "events.jsonl")
    assert [e.start_step for e in history if isinstance(e, ev.Start)] == [0, killed_at]
    assert isinstance(history[-1], ev.Done) and history[-1].step == killed_at + 2
    assert (run_dir / "lora.safetensors").is_file()


def test_cancel_of_a_running_job_stops_it_with_a_checkpoint(base_dirs, scene_dir, tmp_path):
    queue = JobQueue(tmp_path / "outputs")
    job = queue.add(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "outputs" / "long", steps=300,
                                checkpoint_every=2))
    worker = threading.Thread(target=run_worker, args=(queue,), kwargs=dict(once=True, poll=0.1))
    worker.start()
    try:
        wait_for(lambda: queue.get(job.id).last_checkpoint, 120, "the first checkpoint")
        assert queue.cancel(job.id).state == "stopping"
    finally:
        worker.join(120)
    assert not worker.is_alive()
    ended = queue.get(job.id)
    assert ended.state == "stopped" and ended.resumable
    stopped = ev.read_jsonl(Path(ended.run_dir) / "events.jsonl")[-2]  # Stopped, then the "exports written" log
    assert isinstance(stopped, ev.Stopped) and 2 <= stopped.step < 300
    assert ended.last_checkpoint == f"step-{stopped.step:06d}"  # the final checkpoint at the stop
    assert (Path(ended.run_dir) / "lora.safetensors").is_file()


# -- queue logic (fake runners: no model) ----------------------------------------------------------

def test_cancelled_job_never_runs_and_ended_jobs_cannot_be_cancelled(tmp_path):
    queue = JobQueue(tmp_path / "outputs")
    first, second = queue.add(light_config(tmp_path, "a")), queue.add(light_config(tmp_path, "b"))
    assert queue.cancel(first.id).state == "cancelled"
    assert queue.get(second.id).position == 1
    ran = []
    run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    assert ran == [("b", False)]
    assert [j.state for j in queue.list()] == ["cancelled", "done"]
    with pytest.raises(QueueError, match="already ended \\(cancelled\\)"):
        queue.cancel(first.id)
    with pytest.raises(QueueError, match="no job 99"):
        queue.cancel(99)


def test_forgetting_a_run_folder_removes_its_ended_jobs_and_refuses_a_waiting_one(tmp_path):
    """Deleting a run removes its jobs, so none resumes or lists a folder that is gone; not while one waits."""
    queue = JobQueue(tmp_path / "outputs")
    a = queue.add(light_config(tmp_path, "a"))
    b = queue.add(light_config(tmp_path, "b"))
    with pytest.raises(QueueError, match=f"job {a.id} of a is queued: take it out of the queue first"):
        queue.forget(tmp_path / "outputs" / "a")
    queue.cancel(a.id)
    run_worker(queue, once=True, poll=0.05, runner=fake_runner([]))
    again = queue.add(light_config(tmp_path, "a"))  # a second job of the same folder, ended too
    queue.cancel(again.id)
    assert queue.forget(tmp_path / "outputs" / "a") == 2
    assert [j.id for j in queue.list()] == [b.id]
    assert queue.forget(tmp_path / "outputs" / "never") == 0
    c = queue.add(light_config(tmp_path, "c"))  # an interrupted job would resume a folder that is gone: it goes too
    with sqlite3.connect(queue.path) as conn:
        conn.execute("UPDATE jobs SET state = 'interrupted' WHERE id = ?", (c.id,))
    assert queue.forget(tmp_path / "outputs" / "c") == 1 and queue.requeue_interrupted() == []


def test_failures_are_recorded_and_the_worker_goes_on(tmp_path):
    queue = JobQueue(tmp_path / "outputs")
    for name in ("bad", "bug", "good"):
        queue.add(light_config(tmp_path, name))
    ran = []
    fail = {"bad": UserError("the data folder has no images"), "bug": KeyError("oops")}
    ended = run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran, fail))
    assert [j.state for j in ended] == ["failed", "failed", "done"]
    assert ended[0].error == "the data folder has no images"
    assert ended[1].error.startswith("internal error: KeyError")
    with pytest.raises(QueueError, match="no checkpoint .* to resume from"):
        queue.resume(ended[0].id)
    fake_checkpoint(Path(ended[1].run_dir), 3)  # the failed job kept a checkpoint at step 3
    for refused in (lambda: queue.resume(ended[1].id, steps=2),
                    lambda: queue.add(replace(ended[1].config, steps=2), resume=True)):
        with pytest.raises(QueueError, match="has trained 3 steps: --steps 2 is fewer; give at least 3"):
            refused()  # it would record a run that trained past its own length
    assert queue.resume(ended[1].id, steps=3).state == "queued"


def test_a_done_job_trains_on_only_with_more_steps(tmp_path):
    """Its style came out faint: ``queue resume ID --steps N`` trains the same job on from its last checkpoint."""
    queue = JobQueue(tmp_path / "outputs")
    job = queue.add(light_config(tmp_path, "faint", steps=4))
    ran = []
    run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    fake_checkpoint(Path(job.run_dir), 4)
    for steps in (None, 4, 3):
        with pytest.raises(QueueError, match="job 1 is done: it trained all 4 steps; to train it on, pass --steps "
                                             "with more \\(e.g. --steps 8\\)"):
            queue.resume(job.id, steps=steps)
    again = queue.resume(job.id, steps=6)
    assert (again.state, again.config.steps, again.resume) == ("queued", 6, True)
    from trainer.cli_queue import _progress

    assert again.planned_steps == 6 and _progress(again).endswith("/6")  # `queue list`: the new total, not 4
    run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    assert ran == [("faint", False), ("faint", True)] and [j.state for j in queue.list()] == ["done"]


def flaky(queue: JobQueue, failures: dict, error: QueueError):
    """Make the queue's methods named in ``failures`` raise ``error`` that many times first."""
    def wrap(method):
        real = getattr(queue, method)

        def call(*args, **kwargs):
            if failures[method]:
                failures[method] -= 1
                raise error
            return real(*args, **kwargs)
        return call

    return {method: wrap(method) for method in failures}


LOCKED = QueueError("queue database is locked by another process", transient=True)


def test_a_database_hiccup_neither_ends_the_worker_nor_leaves_a_job_running(tmp_path, monkeypatch):
    """A lock held too long (or a full disk) while the worker looks for work or records a job's end: it tries
    again. Before, the worker thread died and the finished job stayed 'running' under the live server, so
    every later job waited on it until a restart."""
    queue = JobQueue(tmp_path / "outputs")
    for name in ("a", "b"):
        queue.add(light_config(tmp_path, name))
    failures = {"claim_next": 1, "finish": 2}
    for method, call in flaky(queue, failures, LOCKED).items():
        monkeypatch.setattr(queue, method, call)
    ran, stop = [], threading.Event()
    worker = threading.Thread(target=run_worker, args=(queue,), kwargs={"poll": 0.05, "stop": stop,
                                                                        "runner": fake_runner(ran)})
    worker.start()
    wait_for(lambda: [j.state for j in queue.list()] == ["done", "done"], 10, "both jobs recorded as done")
    stop.set()
    worker.join(10)
    assert failures == {"claim_next": 0, "finish": 0} and ran == [("a", False), ("b", False)]


@pytest.mark.parametrize("error, once", [(LOCKED, True), (QueueError("queue database is corrupt"), False)])
def test_a_database_error_that_will_not_clear_or_a_one_shot_worker_ends_with_its_message(tmp_path, monkeypatch,
                                                                                         error, once):
    """`queue run --once` answers a locked database with the lock's one line (it used to wait for ever), and
    a corrupt one ends any worker with the message that says how to fix it."""
    queue = JobQueue(tmp_path / "outputs")
    queue.add(light_config(tmp_path, "a"))
    monkeypatch.setattr(queue, "claim_next", flaky(queue, {"claim_next": 100}, error)["claim_next"])
    with pytest.raises(QueueError, match=str(error)):
        run_worker(queue, once=once, poll=0.01, stop=threading.Event(), runner=fake_runner([]))


def test_a_claim_that_commits_always_reaches_its_worker(tmp_path, monkeypatch):
    queue = JobQueue(tmp_path / "outputs")
    queue.add(light_config(tmp_path, "a"))
    monkeypatch.setattr(queue, "get", lambda job_id: pytest.fail("the claim read its job in another transaction"))
    claimed = queue.claim_next("default")
    assert claimed.state == "running" and claimed.token and claimed.worker_pid == os.getpid()


def test_one_job_at_a_time_per_device_group(tmp_path):
    queue = JobQueue(tmp_path / "outputs")
    a, b, c = (queue.add(light_config(tmp_path, n)) for n in "abc")
    pinned = queue.add(light_config(tmp_path, "pinned"), group="1")
    claimed = queue.claim_next("0")
    assert claimed.id == a.id and claimed.state == "running" and claimed.worker_pid == os.getpid()
    assert queue.claim_next("0") is None  # group 0 is busy (its worker, this process, is alive)
    assert queue.claim_next("1").id == b.id  # another GPU group runs in parallel
    assert queue.claim_next("1") is None
    assert queue.finish(a.id, "done", token=claimed.token)
    assert not queue.finish(a.id, "done")  # only a running job can finish
    assert queue.claim_next("0").id == c.id
    assert queue.get(pinned.id).state == "queued" and queue.claim_next("0") is None  # pinned to group 1
    with pytest.raises(QueueError, match="already used by job"):
        queue.add(light_config(tmp_path, "c"))  # its run folder belongs to a running job


def test_worker_start_resumes_interrupted_jobs_at_their_old_place(tmp_path, caplog):
    outputs = tmp_path / "outputs"
    queue = JobQueue(outputs)
    crashed = queue.add(light_config(tmp_path, "crashed"))
    later = queue.add(light_config(tmp_path, "later"))
    assert dead_worker_claims(outputs) == crashed.id
    fake_checkpoint(Path(crashed.run_dir), 4)
    assert queue.get(crashed.id).state == "running"

    ran = []
    with caplog.at_level("WARNING", logger="trainer.queue.worker"):
        run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))

    assert ran == [("crashed", True), ("later", False)]  # recovered, resumed first, from its checkpoint
    assert [r.getMessage() for r in caplog.records] == [  # said, as nobody pressed Resume
        f"job {crashed.id} (crashed) was interrupted when its worker stopped: it continues from its last checkpoint "
        f"(`python -m trainer queue cancel {crashed.id}` takes it out)"]
    assert queue.get(crashed.id).state == "done" and queue.get(crashed.id).crashes == 1
    assert queue.get(later.id).state == "done"


def test_an_interrupted_job_without_a_checkpoint_is_said_to_start_again(tmp_path, caplog):
    queue = JobQueue(tmp_path / "outputs")
    job = queue.add(light_config(tmp_path, "early"))
    assert dead_worker_claims(tmp_path / "outputs") == job.id  # killed before its first checkpoint
    ran = []
    with caplog.at_level("WARNING", logger="trainer.queue.worker"):
        run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    assert ran == [("early", False)]
    assert [r.getMessage() for r in caplog.records] == [
        f"job {job.id} (early) was interrupted when its worker stopped: it continues from step 0 (it had no "
        f"checkpoint yet) (`python -m trainer queue cancel {job.id}` takes it out)"]


def test_a_job_that_keeps_killing_its_worker_waits_for_a_person(tmp_path):
    outputs = tmp_path / "outputs"
    queue = JobQueue(outputs)
    job = queue.add(light_config(tmp_path, "killer"))
    assert dead_worker_claims(outputs) == job.id
    with sqlite3.connect(queue.path) as conn:  # as if it had died AUTO_RESUME_LIMIT times before
        conn.execute("UPDATE jobs SET crashes = ? WHERE id = ?", (AUTO_RESUME_LIMIT, job.id))
    ran = []
    run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    assert ran == [] and queue.get(job.id).state == "interrupted" and queue.get(job.id).resumable
    assert "no checkpoint yet" in queue.get(job.id).error
    assert not queue.resume(job.id).resume  # no checkpoint: it restarts from step 0
    run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    assert ran == [("killer", False)] and queue.get(job.id).state == "done"


def test_a_worker_that_died_while_stopping_leaves_a_stopped_job_that_resumes_from_its_last_checkpoint(tmp_path):
    """Cancel asked it to stop; it died before its final checkpoint: the note says where Resume continues."""
    outputs = tmp_path / "outputs"
    queue = JobQueue(outputs)
    job = queue.add(light_config(tmp_path, "halted"))
    with sqlite3.connect(queue.path) as conn:  # its worker is alive while the cancel arrives
        conn.execute("UPDATE jobs SET state = 'stopping', worker_pid = ? WHERE id = ?", (os.getpid(), job.id))
    fake_checkpoint(Path(job.run_dir), 2)
    with sqlite3.connect(queue.path) as conn:  # then it is gone
        conn.execute("UPDATE jobs SET worker_pid = ?, heartbeat_at = 0 WHERE id = ?", (2**22 + 12345, job.id))
    [recovered] = queue.recover()
    assert recovered.state == "stopped" and recovered.resumable
    assert recovered.error.endswith("while stopping; resume continues from checkpoint step-000002")


def test_worker_shutdown_leaves_the_job_interrupted_for_the_next_worker(tmp_path):
    queue = JobQueue(tmp_path / "outputs")
    job = queue.add(light_config(tmp_path, "overnight"))
    started, stop = threading.Event(), threading.Event()
    worker = threading.Thread(target=run_worker, args=(queue,),
                              kwargs=dict(poll=0.05, stop=stop, runner=blocking_runner(started)))
    worker.start()
    assert started.wait(10)
    stop.set()  # Ctrl-C on `queue run`
    worker.join(10)
    assert not worker.is_alive()
    assert queue.get(job.id).state == "interrupted" and queue.get(job.id).crashes == 0
    fake_checkpoint(Path(job.run_dir), 7)  # what the loop writes when it stops
    ran = []
    run_worker(queue, once=True, poll=0.05, runner=fake_runner(ran))
    assert ran == [("overnight", True)]


def test_add_stores_absolute_paths_and_guards_run_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    queue = JobQueue("outputs")
    with pytest.raises(DataError, match="data folder .*data.* does not exist"):
        queue.add(tiny_config("demo:sd15", Path("data"), Path("outputs/rel")))
    with pytest.raises(ModelNotFoundError, match="base model .*missing-base.* does not exist"):
        queue.add(tiny_config("missing-base", Path("."), Path("outputs/rel")))
    (tmp_path / "data").mkdir()
    job = queue.add(tiny_config("demo:sd15", Path("data"), Path("outputs/rel")))
    assert job.run_dir == str(tmp_path / "outputs" / "rel") and job.config.data == str(tmp_path / "data")
    assert "out: " + str(tmp_path / "outputs" / "rel") in job.config_yaml  # YAML written by dump_yaml
    with pytest.raises(QueueError, match="nothing to resume"):
        queue.add(light_config(tmp_path, "fresh"), resume=True)
    fake_checkpoint(tmp_path / "outputs" / "old", 10)
    with pytest.raises(QueueError, match="already holds a run .*--resume"):
        queue.add(light_config(tmp_path, "old"))
    assert queue.add(light_config(tmp_path, "old", steps=10), resume=True).resume


# -- a damaged or busy database --------------------------------------------------------------------

def damage_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8192:8192 + 64] = b"\xff" * 64  # the header of page 3: a valid SQLite file with a broken b-tree
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbage", "broken page"])
def test_corrupt_database_is_a_clear_error_and_deletes_nothing(tmp_path, damage):
    outputs = tmp_path / "outputs"
    db = outputs / "queue.sqlite3"
    if damage == "garbage":
        outputs.mkdir()
        db.write_bytes(os.urandom(64) * 100)
    else:
        queue = JobQueue(outputs)
        for i in range(40):
            queue.add(light_config(tmp_path, f"r{i}", description="x" * 300))
        damage_pages(db)
    (outputs / "finished-run").mkdir()
    (outputs / "finished-run" / "lora.safetensors").write_bytes(b"weights")
    before = {p: p.read_bytes() for p in outputs.rglob("*") if p.is_file()}

    with pytest.raises(QueueError) as err:
        JobQueue(outputs)
    message = str(err.value)
    assert f"queue database {db} is corrupt" in message and "Move it aside" in message
    assert "are not affected" in message and "\n" not in message
    assert {p: p.read_bytes() for p in outputs.rglob("*") if p.is_file()} == before

    db.rename(db.with_suffix(".bad"))  # what the message says to do
    assert JobQueue(outputs).list() == []


def test_newer_schema_is_refused(tmp_path):
    queue = JobQueue(tmp_path)
    with sqlite3.connect(queue.path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueError, match="newer version"):
        JobQueue(tmp_path)


def test_locked_database_is_a_clear_error_within_the_timeout(tmp_path):
    JobQueue(tmp_path)
    holder = sqlite3.connect(tmp_path / "queue.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        queue = JobQueue(tmp_path, busy_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(QueueError, match="queue database is locked by another process"):
            queue.add(light_config(tmp_path, "x"))
        assert time.monotonic() - t0 < 3
        assert queue.list() == []  # the queue view still reads (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert queue.add(light_config(tmp_path, "x")).state == "queued"


# -- command line ----------------------------------------------------------------------------------

def cli(*argv: str) -> int:
    from trainer.cli_queue import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def test_cli_add_list_cancel_resume(tmp_path, capsys):
    outputs, data = tmp_path / "outputs", tmp_path / "scenes"
    run_yaml = tmp_path / "run.yaml"
    data.mkdir()
    run_yaml.write_text(f"base: demo:sd15\ndata: {data}\nsteps: 3\nresolution: 64\nrank: 4\n")
    assert cli("add", "--outputs", str(outputs), "--config", str(run_yaml)) == 0
    assert cli("add", "--outputs", str(outputs), "--config", str(run_yaml), "--out", str(outputs / "second"),
               "--steps", "5", "--group", "1") == 0
    out = capsys.readouterr().out
    assert f"queued job 1 at position 1: {outputs / 'scenes'}" in out and "queued job 2 at position 2" in out

    jobs = JobQueue(outputs).list()
    assert (jobs[0].config.steps, jobs[0].config.rank, jobs[0].config.alpha) == (3, 4, 8.0)
    assert (jobs[1].config.steps, jobs[1].group) == (5, "1")

    assert cli("cancel", "1", "--outputs", str(outputs)) == 0
    assert "job 1: cancelled" in capsys.readouterr().out
    assert cli("list", "--outputs", str(outputs)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["ID", "STATE", "POS", "GROUP", "STEP"]
    assert table[1].split()[:3] == ["1", "cancelled", "-"]
    assert table[2].split()[:5] == ["2", "queued", "1", "1", "0/5"]  # the steps it will train, before it starts
    with pytest.raises(QueueError, match="job 1 is cancelled; only interrupted, stopped, failed"):
        cli("resume", "1", "--outputs", str(outputs))
    with pytest.raises(QueueError, match="already used by job 2"):
        cli("add", "--outputs", str(outputs), "--config", str(run_yaml), "--out", str(outputs / "second"))
    typo = tmp_path / "outptus"
    for action in (["list"], ["cancel", "1"], ["resume", "1"]):  # reading never creates a queue
        with pytest.raises(QueueError, match=f"no queue in {typo} \\(it has no queue.sqlite3\\): check --outputs"):
            cli(*action, "--outputs", str(typo))
    assert not typo.exists()


def test_cli_user_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "queue.sqlite3").write_bytes(b"not a database " * 300)
    proc = subprocess.run([sys.executable, "-c", ENTRY, "list", "--outputs", str(tmp_path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: queue database ")
    assert "is corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_a_one_shot_worker_says_which_jobs_it_left_for_others(tmp_path, capsys):
    """`queue run --once && shutdown`: a job pinned to another device group is not this worker's, and it says so
    instead of ending as if the queue were empty."""
    queue = JobQueue(tmp_path / "outputs")
    pinned = queue.add(light_config(tmp_path, "pinned"), group="1")
    assert cli("run", "--once", "--outputs", str(tmp_path / "outputs"), "--group", "0", "--poll", "0.05") == 0
    out = capsys.readouterr().out
    assert "worker done: 0 job(s)" in out
    assert f"1 job(s) not done: another worker or device group holds them (job {pinned.id} queued, group 1)" in out
    failing = queue.add(light_config(tmp_path, "empty"), group="0")  # its data folder has no pictures: it fails
    assert cli("run", "--once", "--outputs", str(tmp_path / "outputs"), "--group", "0", "--poll", "0.05") == 1
    out = capsys.readouterr().out
    assert f"job {failing.id} failed: " in out and "worker done: 1 job(s), 1 failed" in out  # still exit 1
    assert "1 job(s) not done" in out
