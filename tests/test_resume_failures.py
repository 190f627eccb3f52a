"""Resume is exact; NaN, stop, disk-full and a killed process lose nothing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from trainer import events as ev
from trainer.checkpoint import checkpoint_dirs
from trainer.errors import TrainingDiverged, WriteError
from trainer.loop import run_training


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[-1] / "adapter.safetensors"))


def stop_at(step: int, stop: threading.Event):
    def emit(event):
        if isinstance(event, ev.Step) and event.step == step:
            stop.set()
    return emit


def test_stop_then_resume_matches_an_uninterrupted_run(base_dirs, scene_dir, tmp_path):
    settings = dict(steps=6, checkpoint_every=2, lr=1e-2, caption_dropout=0.2, batch_size=2, lr_scheduler="cosine",
                    warmup_steps=2, flip=True)  # dropout and flips draw from the checkpointed generator too
    straight = run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "straight", **settings))
    assert straight.step == 6

    config = tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "split", **settings)
    stop = threading.Event()
    first = run_training(config, emit=stop_at(3, stop), stop=stop)
    assert first.stopped and first.step == 3
    assert [p.name for p in checkpoint_dirs(tmp_path / "split")][-1] == "step-000003"  # final checkpoint on stop
    assert (tmp_path / "split" / "lora.safetensors").is_file()  # and the exports so far
    resumed = run_training(config, resume=True)
    assert resumed.step == 6 and not resumed.stopped
    expected, got = final_adapter(tmp_path / "straight"), final_adapter(tmp_path / "split")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    starts = [e for e in ev.read_jsonl(tmp_path / "split" / "events.jsonl") if isinstance(e, ev.Start)]
    assert [s.start_step for s in starts] == [0, 3]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_finished_run_trained_on_follows_the_longer_schedule(base_dirs, scene_dir, tmp_path, schedule):
    """Continuing a finished 4-step run to 8 steps: steps 5-8 train at the rates of an 8-step schedule (not at
    the finished schedule's 0 for the first of them), and the log says the rate was recomputed."""
    def rates(run: Path) -> dict[int, float]:
        return {e.step: e.lr for e in ev.read_jsonl(run / "events.jsonl") if isinstance(e, ev.Step)}

    settings = dict(lr=1e-2, lr_scheduler=schedule, warmup_steps=1, checkpoint_every=2)
    straight = tmp_path / "straight"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, straight, steps=8, **settings))
    run = tmp_path / "run"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, **settings))
    assert rates(run)[4] != rates(straight)[4]  # the shorter schedule is further along at step 4
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=8, **settings), resume=True)
    expected, got = rates(straight), rates(run)
    assert [got[s] for s in range(5, 9)] == pytest.approx([expected[s] for s in range(5, 9)], rel=1e-12, abs=0)
    assert got[5] > 0
    notes = [e.message for e in ev.read_jsonl(run / "events.jsonl") if isinstance(e, ev.Log)]
    assert any(n.startswith("the schedule now ends at the new total: the learning rate continues at") for n in notes)


def test_a_resume_with_fewer_steps_than_trained_is_refused_before_it_writes(base_dirs, scene_dir, tmp_path):
    """`train --resume --steps 3` of a run that trained 4 used to export files saying "4 of 3 steps"."""
    from trainer.errors import UserError

    run = tmp_path / "run"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, checkpoint_every=2))
    (run / "lora.safetensors").unlink()  # as when the process died after the last checkpoint
    events_before = (run / "events.jsonl").read_bytes()
    with pytest.raises(UserError, match="has trained 4 steps: --steps 3 is fewer; give at least 4"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=3, checkpoint_every=2), resume=True)
    assert not (run / "lora.safetensors").exists()
    assert (run / "events.jsonl").read_bytes() == events_before


def test_a_run_refused_before_it_starts_leaves_no_folder_behind(base_dirs, tmp_path):
    """A missing --data is one error; the run folder it would have made is not left holding only that error (a
    folder that was there before is kept)."""
    from trainer.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        run_training(tiny_config(str(base_dirs["sd15"]), tmp_path / "no-data", tmp_path / "x1"))
    assert not (tmp_path / "x1").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="does not exist"):
        run_training(tiny_config(str(base_dirs["sd15"]), tmp_path / "no-data", tmp_path / "mine"))
    assert (tmp_path / "mine" / "events.jsonl").is_file()  # the folder was the user's: the error is recorded in it


def test_resume_without_checkpoint_is_a_clear_error(base_dirs, scene_dir, tmp_path):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="no checkpoint yet"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "r"), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base_dirs, scene_dir, tmp_path, monkeypatch):
    from trainer.models.sd import SD15

    real_loss = SD15.loss
    calls = {"n": 0}

    def flaky_loss(self, *args, **kwargs):
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(SD15, "loss", flaky_loss)
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="diverged at step 4.*last good checkpoint is step-000002"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run_dir, steps=8, checkpoint_every=2))
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-000002"]
    assert all(torch.isfinite(t).all() for t in final_adapter(run_dir).values())
    assert not (run_dir / "lora.safetensors").exists()  # no export of a diverged adapter
    last = ev.read_jsonl(run_dir / "events.jsonl")[-1]
    assert isinstance(last, ev.Error) and "diverged" in last.message


def test_disk_full_midway_leaves_no_half_written_file(base_dirs, scene_dir, tmp_path, monkeypatch):
    import trainer.export as export

    run_dir = tmp_path / "full"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run_dir, steps=2))
    good_bytes = (run_dir / "lora.safetensors").read_bytes()

    def save_half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)  # part of a file ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(export, "save_file", save_half_then_fail)
    with pytest.raises(WriteError, match="No space left on device.*Nothing half-written"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run_dir, steps=3), resume=True)
    assert (run_dir / "lora.safetensors").read_bytes() == good_bytes  # the old export is intact
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_checkpoint_that_torch_cannot_finish_writing_is_a_write_error(base_dirs, scene_dir, tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError ("unexpected pos"), not OSError."""
    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"\x00" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(WriteError, match=r"saving checkpoint step 2 failed \(\[enforce fail .*unexpected pos 64 vs 0\)"
                                         r"; the disk may be full"):
        run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "full", steps=3, checkpoint_every=2))
    assert checkpoint_dirs(tmp_path / "full") == [] and not list((tmp_path / "full" / "checkpoints").iterdir())


def test_a_run_stopped_before_its_first_step_writes_nothing(base_dirs, scene_dir, tmp_path):
    stop = threading.Event()
    stop.set()  # e.g. Ctrl-C while the base was loading
    result = run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "early", steps=3), stop=stop)
    assert result.stopped and result.step == 0 and result.exports == ()
    assert not (tmp_path / "early" / "checkpoints").exists() and not (tmp_path / "early" / "lora.safetensors").exists()
    assert isinstance(ev.read_jsonl(tmp_path / "early" / "events.jsonl")[-1], ev.Log)


def test_unwritable_run_folder_is_a_clear_error(base_dirs, scene_dir, tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"run folder .*file-not-folder/run cannot be created \(Not a directory\); "
                                         r"pick another --out"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, blocker / "run", steps=1))
    with pytest.raises(WriteError, match=r"run folder .*file-not-folder is a file; pick another --out"):
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, blocker, steps=1))


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_final_step(base_dirs, scene_dir, tmp_path):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "trainer", "train", "--base", str(base_dirs["sd15"]), "--data", str(scene_dir),
           "--out", str(run_dir), "--steps", "400", "--checkpoint-every", "5", "--resolution", "64", "--sample-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(checkpoint_dirs(run_dir)) < 1:
            time.sleep(0.2)
        assert checkpoint_dirs(run_dir), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = int(checkpoint_dirs(run_dir)[-1].name.split("-")[1])
    assert 0 < killed_at < 400 and not (run_dir / "lora.safetensors").exists()
    from trainer.config import load_config
    from dataclasses import replace

    config = replace(load_config(run_dir / "config.yaml"), steps=killed_at + 5)
    result = run_training(config, resume=True)
    assert result.step == killed_at + 5 and (run_dir / "lora.safetensors").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_with_a_checkpoint_and_the_shells_exit_status(base_dirs, scene_dir, tmp_path, sig):
    """Ctrl-C (or SIGTERM) stops after the step with a checkpoint and exports, and exits 128 + the signal
    (130 for Ctrl-C), so a script can tell a stopped run from a finished one (0)."""
    run_dir = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "trainer", "train", "--base", str(base_dirs["flux"]), "--data", str(scene_dir),
           "--out", str(run_dir), "--steps", "100000", "--checkpoint-every", "5", "--resolution", "64",
           "--sample-every", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not checkpoint_dirs(run_dir) and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoint_dirs(run_dir), "no checkpoint"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, out
    assert out.startswith("stopped at step ") and (run_dir / "lora.safetensors").is_file()


@pytest.mark.parametrize("history, trained_at, now, step, expected", [
    ("", 0.003, 0.003, 20, ""),
    ("", 0.003, 0.0015, 20, "0.003 for steps 1-20, 0.0015 from step 21"),
    ("0.003 for steps 1-20, 0.0015 from step 21", 0.0015, 0.0015, 30, "0.003 for steps 1-20, 0.0015 from step 21"),
    ("0.003 for steps 1-20, 0.0015 from step 21", 0.0015, 0.001, 30,
     "0.003 for steps 1-20, 0.0015 from step 21, 0.001 from step 31"),
])
def test_learning_rate_history_of_resumes(history, trained_at, now, step, expected):
    from trainer.export import learning_rates

    assert learning_rates(history, trained_at, now, step) == expected


@pytest.mark.parametrize("step, expected", [(10, ""), (20, ""), (21, "0.003 for steps 1-20, 0.0015 from step 21"),
                                            (31, "0.003 for steps 1-20, 0.0015 from step 21, 0.001 from step 31")])
def test_a_step_export_records_only_the_rates_it_trained_with(step, expected):
    from trainer.export import rates_until

    assert rates_until("0.003 for steps 1-20, 0.0015 from step 21, 0.001 from step 31", step) == expected


def test_a_run_resumed_at_another_rate_says_so_in_its_files(base_dirs, scene_dir, tmp_path):
    """kohya's ss_learning_rate holds one rate: the final file says the rate it ends with and keeps the history
    beside it; an earlier step's file says the rate that step trained with."""
    from trainer.export import read_lora
    from trainer.reexport import reexport
    from trainer.steps import learning_rate_history
    from ui import format as fmt

    run = tmp_path / "run"
    run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=2, checkpoint_every=2, lr=3e-3))
    began = read_lora(run / "lora.safetensors")[1]["ss_training_started_at"]
    resumed = tiny_config(str(base_dirs["sd15"]), scene_dir, run, steps=4, checkpoint_every=2, lr=1.5e-3)
    time.sleep(1.1)  # a resume a second later must still say when the run began
    run_training(resumed, resume=True)
    meta = read_lora(run / "lora.safetensors")[1]
    assert meta["ss_training_started_at"] == began
    assert (meta["ss_learning_rate"], meta["ss_unet_lr"]) == ("0.0015", "0.0015")
    assert meta["studio.learning_rates"] == learning_rate_history(run) == "0.003 for steps 1-2, 0.0015 from step 3"
    early = read_lora(reexport(run, "kohya", 2)[0])[1]
    assert early["ss_learning_rate"] == "0.003" and "studio.learning_rates" not in early
    late = read_lora(reexport(run, "diffusers", 4)[0])[1]
    assert (late["ss_learning_rate"], late["studio.learning_rates"]) == ("0.0015", meta["studio.learning_rates"])
    line = fmt.recipe("run", resumed, learning_rate_history(run))
    assert "learning rate 0.0015 (constant; so far 0.003 for steps 1-2, 0.0015 from step 3)" in line
