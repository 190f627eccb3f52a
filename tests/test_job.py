"""JobManager / Job without a browser or torch: start, stop, one-at-a-time, resume, errors.

The runner is injected: :class:`FakeLoop` behaves like ``trainer.loop.run_training``
as far as the job can see (events on ``emit`` *and* in ``events.jsonl``,
``config.yaml``, a checkpoint folder per save, a stop flag checked between steps).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from trainer import events as ev
from trainer.config import dump_yaml, make_config
from trainer.errors import DataError, JobBusyError, UserError
from trainer.job import Job, JobManager, disk_state, summarize


class FakeLoop:
    """A stand-in for the training loop. ``gate`` (if set) must be released before each step."""

    def __init__(self, step_seconds: float = 0.0, fail_at: int | None = None, error: Exception | None = None,
                 gate: threading.Semaphore | None = None):
        self.step_seconds = step_seconds
        self.fail_at = fail_at
        self.error = error
        self.gate = gate
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, config, emit, stop, resume):
        run = Path(config.out)
        run.mkdir(parents=True, exist_ok=True)
        self.calls.append((str(run), resume))

        def out(event):
            ev.append_jsonl(run / "events.jsonl", event)
            emit(event)

        start = 0
        if resume:
            ckpts = sorted((run / "checkpoints").glob("step-*"))
            if not ckpts:
                raise UserError("nothing to resume: no checkpoint yet")
            start = int(ckpts[-1].name.split("-")[1])
        (run / "config.yaml").write_text(dump_yaml(config), encoding="utf-8")
        out(ev.Start(run_dir=str(run), total_steps=config.steps, start_step=start, images=3, arch="sd15"))
        step = start
        while step < config.steps and not stop.is_set():
            if self.gate is not None:
                self.gate.acquire()
                if stop.is_set():
                    break
            if self.fail_at is not None and step == self.fail_at:
                raise self.error
            time.sleep(self.step_seconds)
            step += 1
            out(ev.Step(step=step, total_steps=config.steps, loss=1.0 / step, lr=1e-4, seconds=0.01))
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                out(ev.Checkpoint(step=step, path=save_checkpoint(run, step)))
        out(ev.Checkpoint(step=step, path=save_checkpoint(run, step)))
        exports = (str(run / "lora.safetensors"),)
        out(ev.Stopped(step=step) if stop.is_set() and step < config.steps else ev.Done(step=step, exports=exports))
        return step


def save_checkpoint(run: Path, step: int) -> str:
    """A checkpoint folder with the two files a complete one has (what the queue looks for)."""
    folder = run / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter.safetensors").write_bytes(b"x")
    (folder / "state.pt").write_bytes(b"x")
    return str(folder)


def config_for(tmp_path: Path, name: str = "run1", **kw):
    values = dict(base="demo:sd15", data=str(tmp_path / "data"), out=str(tmp_path / "outputs" / name), steps=5,
                  checkpoint_every=2, resolution=64)
    values.update(kw)
    return make_config(values)


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def test_job_runs_to_done_and_snapshot_has_progress(tmp_path):
    manager = JobManager(tmp_path / "outputs", runner=FakeLoop())
    job = manager.start(config_for(tmp_path))
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.state == "done"
    assert (snap.step, snap.total_steps) == (5, 5)
    assert [s for s, _ in snap.losses] == [1, 2, 3, 4, 5]
    assert snap.exports and snap.checkpoint.endswith("step-000005")
    assert snap.it_per_s > 0 and snap.eta_s == 0
    assert any("done at step 5" in line for line in snap.log)


def test_stop_midway_leaves_a_final_checkpoint(tmp_path):
    gate = threading.Semaphore(0)
    manager = JobManager(tmp_path / "outputs", runner=FakeLoop(gate=gate))
    job = manager.start(config_for(tmp_path, steps=50))
    gate.release(3)
    wait_for(lambda: job.snapshot().step == 3)
    job.stop()
    assert job.state == "stopping"
    gate.release(100)
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.state == "stopped"
    assert snap.step < 50
    assert snap.checkpoint.endswith(f"step-{snap.step:06d}")
    assert Path(snap.checkpoint).is_dir()


def test_second_start_is_refused_while_a_job_runs(tmp_path):
    gate = threading.Semaphore(0)
    manager = JobManager(tmp_path / "outputs", runner=FakeLoop(gate=gate))
    first = manager.start(config_for(tmp_path, name="a", steps=3))
    with pytest.raises(JobBusyError, match="already in progress.*stop it or wait"):
        manager.start(config_for(tmp_path, name="b", steps=3))
    assert manager.current() is first
    gate.release(10)
    assert first.wait(10)
    second = manager.start(config_for(tmp_path, name="b", steps=2))  # free again once the first is done
    gate.release(10)
    assert second.wait(10) and second.state == "done"


def test_user_error_is_one_line_and_the_manager_stays_usable(tmp_path):
    runner = FakeLoop(fail_at=1, error=DataError("no images found in data; add images first"))
    manager = JobManager(tmp_path / "outputs", runner=runner)
    job = manager.start(config_for(tmp_path))
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.state == "failed"
    assert snap.error == "no images found in data; add images first"
    assert "\n" not in snap.error
    manager._runner = FakeLoop()  # the next start works: a failed job never blocks the app
    assert manager.start(config_for(tmp_path, name="run2")).wait(10)


def test_internal_error_keeps_traceback_in_log_not_in_the_error_line(tmp_path):
    manager = JobManager(tmp_path / "outputs", runner=FakeLoop(fail_at=2, error=RuntimeError("boom")))
    job = manager.start(config_for(tmp_path))
    assert job.wait(10)
    snap = job.snapshot()
    assert snap.state == "failed"
    assert snap.error.startswith("internal error: RuntimeError: boom")
    assert "\n" not in snap.error
    assert any("Traceback" in line for line in snap.log)


def test_list_runs_and_resume_an_interrupted_run(tmp_path):
    gate = threading.Semaphore(0)
    manager = JobManager(tmp_path / "outputs", runner=FakeLoop(gate=gate))
    job = manager.start(config_for(tmp_path, steps=8))
    gate.release(4)
    wait_for(lambda: job.snapshot().step == 4)
    job.stop()
    gate.release(100)
    assert job.wait(10)

    # a new process (server restart) sees the run on disk
    runner = FakeLoop()
    fresh = JobManager(tmp_path / "outputs", runner=runner)
    [info] = fresh.list_runs()
    assert (info.name, info.state, info.step, info.total_steps, info.resumable) == ("run1", "stopped", 4, 8, True)
    snap = fresh.snapshot(tmp_path / "outputs" / "run1")
    assert snap.state == "stopped" and snap.step == 4

    resumed = fresh.resume("run1")
    assert resumed.wait(10)
    assert runner.calls == [(str((tmp_path / "outputs" / "run1").resolve()), True)]
    snap = resumed.snapshot()
    assert snap.state == "done" and snap.step == 8
    assert [s for s, _ in snap.losses] == list(range(1, 9))  # history from before the stop is kept
    [info] = fresh.list_runs()
    assert (info.state, info.resumable) == ("done", False)


def test_run_killed_without_a_final_event_is_interrupted(tmp_path):
    run = tmp_path / "outputs" / "crashed"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(config_for(tmp_path, name="crashed")), encoding="utf-8")
    for e in (ev.Start(run_dir=str(run), total_steps=5, start_step=0, images=1, arch="sd15"),
              ev.Step(step=1, total_steps=5, loss=0.5, lr=1e-4, seconds=1.0)):
        ev.append_jsonl(run / "events.jsonl", e)
    with open(run / "events.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # torn last line from a killed process
    [info] = JobManager(tmp_path / "outputs").list_runs()
    assert (info.state, info.step, info.resumable) == ("interrupted", 1, True)


def test_disk_state_uses_the_last_session():
    start = ev.Start(run_dir="r", total_steps=4, start_step=0, images=1, arch="sd15")
    assert disk_state([start, ev.Stopped(step=2), replace(start, start_step=2), ev.Done(step=4, exports=())]) == "done"
    assert disk_state([start, ev.Stopped(step=2), replace(start, start_step=2)]) == "interrupted"
    assert disk_state([start, ev.Done(step=4, exports=()), replace(start), ev.Error(message="x")]) == "failed"
    assert disk_state([ev.Error(message="bad data")]) == "failed"
    assert disk_state([]) == "interrupted"


def test_run_path_refuses_names_outside_outputs(tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.yaml").write_text("steps: 1\n")
    manager = JobManager(tmp_path / "outputs")
    for name in ("../secret", "..", "/etc", "a/../../secret"):
        with pytest.raises(UserError):
            manager.run_path(name)


def test_an_error_from_an_earlier_session_is_cleared_by_a_resume():
    start = ev.Start(run_dir="r", total_steps=4, start_step=0, images=1, arch="sd15")
    snap = summarize("r", "running", [start, ev.Error(message="out of memory"), replace(start, start_step=2)])
    assert snap.error == "" and any("out of memory" in line for line in snap.log)


def test_summarize_eta_and_speed():
    events = [ev.Start(run_dir="r", total_steps=10, start_step=0, images=1, arch="sd15")]
    events += [ev.Step(step=i, total_steps=10, loss=1.0, lr=1e-4, seconds=0.5) for i in range(1, 5)]
    snap = summarize("r", "running", events)
    assert snap.it_per_s == pytest.approx(2.0)
    assert snap.eta_s == pytest.approx(3.0)


def test_job_without_manager_can_be_stopped_before_first_step(tmp_path):
    job = Job(config_for(tmp_path), runner=FakeLoop(step_seconds=0.05))
    job.stop()  # stop requested before start: the loop exits at its first check
    job.start()
    assert job.wait(10)
    assert job.snapshot().state == "stopped"


def test_a_resumed_run_shows_each_step_once():
    """A run killed at step 5 with a checkpoint at 3 trains steps 4-5 again: the curve keeps the redone ones."""
    first = [ev.Start(run_dir="r", total_steps=8, start_step=0, images=1, arch="sd15")]
    first += [ev.Step(step=i, total_steps=8, loss=1.0, lr=1e-4, seconds=0.5) for i in range(1, 6)]
    again = [ev.Start(run_dir="r", total_steps=8, start_step=3, images=1, arch="sd15")]
    again += [ev.Step(step=i, total_steps=8, loss=0.5, lr=1e-4, seconds=0.5) for i in range(4, 9)]
    first += [ev.Eval(step=i, loss=0.9) for i in (0, 2, 4)]  # fixed-noise loss every 2 steps
    again += [ev.Eval(step=i, loss=0.4) for i in (4, 6, 8)]
    snap = summarize("r", "done", first + again)
    assert snap.losses == ((1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5), (5, 0.5), (6, 0.5), (7, 0.5), (8, 0.5))
    assert snap.eval_losses == ((0, 0.9), (2, 0.9), (4, 0.4), (6, 0.4), (8, 0.4))
