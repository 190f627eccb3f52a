"""What the app reads from a run's events without a browser or torch: progress, curves, ETA, how it ended.

:class:`FakeLoop` (used by the app's tests too) behaves like ``trainer.loop.run_training`` as far as the
queue's worker and the app can see (events on ``emit`` *and* in ``events.jsonl``, ``config.yaml``, a
checkpoint folder per save, a stop flag checked between steps).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from trainer import events as ev
from trainer.config import dump_yaml, make_config
from trainer.errors import UserError
from trainer.job import disk_state, eta_seconds, list_runs, summarize


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
        if step == 0:  # stopped before its first step: like the loop, it writes nothing
            out(ev.Stopped(step=0))
            return step
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


def test_run_killed_without_a_final_event_is_interrupted(tmp_path):
    run = tmp_path / "outputs" / "crashed"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(config_for(tmp_path, name="crashed")), encoding="utf-8")
    for e in (ev.Start(run_dir=str(run), total_steps=5, start_step=0, images=1, arch="sd15"),
              ev.Step(step=1, total_steps=5, loss=0.5, lr=1e-4, seconds=1.0)):
        ev.append_jsonl(run / "events.jsonl", e)
    with open(run / "events.jsonl", "a") as f:
        f.write('{"event": "step", "st')  # torn last line from a killed process
    [info] = list_runs(tmp_path / "outputs")
    assert (info.state, info.step, info.resumable) == ("interrupted", 1, True)


def test_an_unreadable_line_inside_the_events_is_skipped_with_a_warning(tmp_path, caplog):
    """A torn last line is what a kill leaves: skipped quietly. Any other line that does not read (an event of a
    newer version, an edit by hand) is skipped too, but the log says so instead of losing it silently."""
    path = tmp_path / "events.jsonl"
    step = ev.Step(step=1, total_steps=5, loss=0.5, lr=1e-4, seconds=1.0)
    ev.append_jsonl(path, step)
    with open(path, "a") as f:
        f.write('{"event": "teleport", "step": 1}\n')
    ev.append_jsonl(path, replace(step, step=2))
    with caplog.at_level("WARNING", logger="trainer.events"):
        assert [e.step for e in ev.read_jsonl(path)] == [1, 2]
        assert [e.step for e in ev.read_jsonl(path)] == [1, 2]  # read again at the next step: said once
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 1 line(s) that are not events this version reads (line 2)"]
    caplog.clear()
    steps_only = path.read_text().splitlines()[::2]
    path.write_text("\n".join(steps_only) + "\n" + '{"event": "step", "st')  # and a torn last line
    with caplog.at_level("WARNING", logger="trainer.events"):
        assert [e.step for e in ev.read_jsonl(path)] == [1, 2]
    assert caplog.records == []


def test_disk_state_uses_the_last_session():
    start = ev.Start(run_dir="r", total_steps=4, start_step=0, images=1, arch="sd15")
    assert disk_state([start, ev.Stopped(step=2), replace(start, start_step=2), ev.Done(step=4, exports=())]) == "done"
    assert disk_state([start, ev.Stopped(step=2), replace(start, start_step=2)]) == "interrupted"
    assert disk_state([start, ev.Done(step=4, exports=()), replace(start), ev.Error(message="x")]) == "failed"
    assert disk_state([ev.Error(message="bad data")]) == "failed"
    assert disk_state([]) == "interrupted"


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


def schedule_events(done: int, total: int, step_seconds: float, sample_every: int = 0, sample_seconds: float = 0.0,
                    eval_every: int = 0, eval_seconds: float = 0.0) -> list[ev.Event]:
    """The events a run emits up to step ``done``: steps, then the evaluations and samples due at each."""
    events = [ev.Start(run_dir="r", total_steps=total, start_step=0, images=1, arch="sd15",
                       sample_every=sample_every, eval_every=eval_every)]
    if eval_every:
        events.append(ev.Eval(step=0, loss=1.0, seconds=eval_seconds))
    for step in range(1, done + 1):
        events.append(ev.Step(step=step, total_steps=total, loss=1.0, lr=1e-4, seconds=step_seconds))
        if eval_every and (step % eval_every == 0 or step == total):
            events.append(ev.Eval(step=step, loss=1.0, seconds=eval_seconds))
        if sample_every and step % sample_every == 0:
            events.append(ev.Sample(step=step, paths=("a.png",), prompts=("a",), seconds=sample_seconds))
    return events


@pytest.mark.parametrize("step, total, it_per_s, schedule, eta", [
    # 90 steps at 1 s, samples at 25 50 75 100 (5 s each), evaluations at 50 100 (2 s each)
    (10, 100, 1.0, dict(sample_every=25, sample_seconds=5.0, eval_every=50, eval_seconds=2.0), 114.0),
    (10, 100, 1.0, dict(eval_every=30, eval_seconds=2.0), 98.0),  # at 30 60 90, and at the last step
    (10, 100, 1.0, dict(eval_every=50, eval_seconds=2.0), 94.0),  # 50 divides 100: the last step counts once
    (25, 100, 2.0, dict(sample_every=25, sample_seconds=5.0), 52.5),  # the render at the current step is past
    (10, 100, 1.0, dict(sample_every=25, eval_every=50), 90.0),  # no duration measured yet
    (100, 100, 1.0, dict(sample_every=25, sample_seconds=5.0, eval_every=7, eval_seconds=2.0), 0.0),
    (10, 100, 0.0, dict(sample_every=25, sample_seconds=5.0), 0.0),  # no speed yet: no ETA
])
def test_eta_seconds(step, total, it_per_s, schedule, eta):
    assert eta_seconds(step, total, it_per_s, **schedule) == eta


@pytest.mark.parametrize("done, total, settings, eta", [
    # 70 steps at 1 s, samples at 50 75 100 (5 s each), evaluations at 50 100 (2 s each)
    (30, 100, dict(step_seconds=1.0, sample_every=25, sample_seconds=5.0, eval_every=50, eval_seconds=2.0), 89.0),
    # evaluations at 30 60 90 and once more at the last step, 100
    (10, 100, dict(step_seconds=1.0, eval_every=30, eval_seconds=2.0), 98.0),
    # the ones at the current step are not counted: samples at 75 100, one evaluation at 100
    (50, 100, dict(step_seconds=0.5, sample_every=25, sample_seconds=5.0, eval_every=50, eval_seconds=2.0), 37.0),
    # 99 is a multiple of 3, and the last step is evaluated once
    (99, 100, dict(step_seconds=0.5, eval_every=3, eval_seconds=2.0), 2.5),
    # eval_every 10 divides 100: the last step's evaluation is not counted twice
    (95, 100, dict(step_seconds=1.0, eval_every=10, eval_seconds=0.25), 5.25),
    (10, 100, dict(step_seconds=1.0), 90.0),  # neither samples nor evaluations
    (24, 100, dict(step_seconds=1.0, sample_every=25, sample_seconds=5.0), 76.0),  # no render timed yet: 0 each
    (100, 100, dict(step_seconds=1.0, sample_every=25, sample_seconds=5.0, eval_every=50, eval_seconds=2.0), 0.0),
    (0, 100, dict(step_seconds=1.0, eval_every=50, eval_seconds=2.0), 0.0),  # no speed yet: no ETA
])
def test_eta_counts_the_samples_and_evaluations_still_due(done, total, settings, eta):
    assert summarize("r", "running", schedule_events(done, total, **settings)).eta_s == eta


def test_eta_of_a_run_from_before_the_schedule_was_recorded_counts_steps_only():
    events = schedule_events(30, 100, 1.0, sample_every=25, sample_seconds=5.0, eval_every=50, eval_seconds=2.0)
    events[0] = ev.Start(run_dir="r", total_steps=100, start_step=0, images=1, arch="sd15")  # no sample/eval_every
    assert summarize("r", "running", events).eta_s == 70.0


def test_eta_follows_the_schedule_of_the_last_start():
    """A run resumed with another sample_every renders on the new schedule."""
    events = schedule_events(30, 100, 1.0, sample_every=25, sample_seconds=5.0)
    events.append(ev.Start(run_dir="r", total_steps=100, start_step=25, images=1, arch="sd15", sample_every=50))
    events += [ev.Step(step=i, total_steps=100, loss=1.0, lr=1e-4, seconds=1.0) for i in range(26, 31)]
    assert summarize("r", "running", events).eta_s == 70.0 + 2 * 5.0  # renders at 50 and 100


def test_an_old_events_file_without_seconds_or_schedule_still_reads(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"event": "start", "time": 1.0, "run_dir": "r", "total_steps": 4, "start_step": 0, "images": 1, '
        '"arch": "sd15", "message": ""}\n'
        '{"event": "eval", "time": 2.0, "step": 0, "loss": NaN}\n'  # what older versions wrote for a NaN loss
        '{"event": "sample", "time": 3.0, "step": 2, "paths": ["a.png"], "prompts": ["a"]}\n', encoding="utf-8")
    start, evaluation, sample = ev.read_jsonl(path)
    assert (start.sample_every, start.eval_every) == (0, 0)
    assert evaluation.seconds == 0.0 and math.isnan(evaluation.loss)
    assert sample.seconds == 0.0 and sample.paths == ("a.png",)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_is_written_as_valid_json_and_read_back_as_nan(tmp_path, loss):
    path = tmp_path / "events.jsonl"
    ev.append_jsonl(path, ev.Eval(step=3, loss=loss, seconds=0.5))

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    line = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)  # a strict reader takes the line
    assert line["loss"] is None and line["seconds"] == 0.5
    [back] = ev.read_jsonl(path)
    assert math.isnan(back.loss) and (back.step, back.seconds) == (3, 0.5)


def test_a_real_run_times_its_evaluations_and_samples(base_dirs, scene_dir, tmp_path):
    from tests.conftest import tiny_config
    from trainer.loop import run_training

    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "r", steps=1, eval_every=1, sample_every=1))
    history = ev.read_jsonl(tmp_path / "r" / "events.jsonl")
    [start] = [e for e in history if isinstance(e, ev.Start)]
    assert (start.sample_every, start.eval_every) == (1, 1)
    timed = [(e.kind, e.step) for e in history if isinstance(e, (ev.Eval, ev.Sample)) and e.seconds > 0]
    assert timed == [("eval", 0), ("eval", 1), ("sample", 1)]
