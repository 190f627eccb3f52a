"""Two CPU processes (torchrun, gloo) train exactly what one process with the doubled batch trains."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint import checkpoint_dirs
from trainer.config import load_config
from trainer.loop import run_training

REPO = Path(__file__).resolve().parent.parent


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[-1] / "adapter.safetensors"))


def torchrun(args: list[str], env: dict[str, str] | None = None, pythonpath: tuple[Path, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", "train",
           *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (*pythonpath, REPO))), "OMP_NUM_THREADS": "1",
           **(env or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_args(base: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["--base", str(base), "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", "1",
            "--resolution", "64", "--sample-every", "0", "--checkpoint-every", "2", "--lr", "1e-3",
            "--caption-dropout", "0.3", "--seed", "3"]


def assert_same(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)  # float sums in another order


def step_losses(run_dir: Path, kind: str = "step") -> list[float]:
    """The run's training losses (kind "step") or fixed-noise losses ("eval"), in order."""
    from trainer import events as ev

    return [e.loss for e in ev.read_jsonl(run_dir / "events.jsonl") if e.kind == kind]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_doubled_batch(base_dirs, scene_dir, tmp_path):
    """Flips, offset noise and Min-SNR weights included: they are drawn for the global batch too."""
    from trainer.export import read_lora

    proc = torchrun([*train_args(base_dirs["sd15"], scene_dir, tmp_path / "ddp", steps=6), "--flip", "--noise-offset",
                     "0.1", "--snr-gamma", "5", "--eval-every", "3"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert out.count("done at step 6") == 1  # only the main process reports and writes
    assert read_lora(tmp_path / "ddp" / "lora.safetensors")[1]["ss_total_batch_size"] == "2"  # 1 × 2 processes
    assert not (tmp_path / "ddp" / "cache.pt").exists()  # the shared cache file goes once every process read it
    ddp_config = load_config(tmp_path / "ddp" / "config.yaml")
    single = replace(ddp_config, out=str(tmp_path / "single"), batch_size=2)
    run_training(single)
    # the same draws give the same losses; a draw for one process's rows alone would change them at step 1
    assert step_losses(tmp_path / "ddp") == pytest.approx(step_losses(tmp_path / "single"), rel=1e-5)
    # the fixed-noise loss too: chunks of the global batch, the same draws on any number of processes
    assert step_losses(tmp_path / "ddp", "eval") == pytest.approx(step_losses(tmp_path / "single", "eval"), rel=1e-5)
    assert len(step_losses(tmp_path / "ddp", "eval")) == 3  # steps 0, 3 and 6
    # AdamW divides by √v: gradients near zero that differ in their last bits (another summation order)
    # move a weight by up to ~5 % of one step (lr 1e-3) with the offset noise's larger gradients
    assert_same(adapter(tmp_path / "ddp"), adapter(tmp_path / "single"), atol=1e-4)


@pytest.mark.slow
def test_killed_two_process_run_resumes_on_one_process_exactly(base_dirs, scene_dir, tmp_path):
    steps = 30
    proc = torchrun(train_args(base_dirs["sd15"], scene_dir, tmp_path / "ddp", steps=steps))
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not checkpoint_dirs(tmp_path / "ddp") and proc.poll() is None:
            time.sleep(0.1)
        assert checkpoint_dirs(tmp_path / "ddp"), proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout"
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # like a crash: no rank gets to clean up
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    killed_at = int(checkpoint_dirs(tmp_path / "ddp")[-1].name.split("-")[1])
    if killed_at >= steps:
        pytest.skip("the 2-process run finished before it could be killed (machine much faster than expected)")
    # resume the 2 x 1 run on 1 process with batch 2: same global batch, so the continuation is exact
    config = replace(load_config(tmp_path / "ddp" / "config.yaml"), batch_size=2)
    resumed = run_training(config, resume=True)
    assert resumed.step == steps and (tmp_path / "ddp" / "lora.safetensors").is_file()
    straight = replace(config, out=str(tmp_path / "straight"))
    run_training(straight)
    assert_same(adapter(tmp_path / "ddp"), adapter(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_every_process_after_its_step_and_exits_with_the_shells_status(base_dirs, scene_dir, tmp_path,
                                                                                     sig):
    """Ctrl-C reaches only the launcher (torchrun starts each process in a session of its own), which passes it on
    once: each process stops after its step and the exports are written. The launcher exits 128 + the signal, as
    one process does, with none of torchrun's traceback or log lines."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "train", *train_args(base_dirs["sd15"], scene_dir, run_dir, steps=100_000),
           "--num-processes", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not checkpoint_dirs(run_dir) and proc.poll() is None:
            time.sleep(0.1)
        assert checkpoint_dirs(run_dir), proc.stderr.read()[-2000:] if proc.poll() is not None else "timeout"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    stopped_at = int(checkpoint_dirs(run_dir)[-1].name.split("-")[1])
    assert out.strip().splitlines()[-1].startswith(f"stopped at step {stopped_at}: "), out
    assert (run_dir / "lora.safetensors").is_file() and (run_dir / "lora_diffusers.safetensors").is_file()
    assert err.count("stopping after this step") == 1  # said by the main process only
    for noise in ("Traceback", "death signal", "aborted"):
        assert noise not in err, err[-2000:]


@pytest.mark.slow
def test_nf4_base_on_two_processes_equals_one_process_with_doubled_batch(base_dirs, scene_dir, tmp_path):
    """NF4 + DDP is supported: every process quantizes its own copy of the base, identically."""
    proc = torchrun([*train_args(base_dirs["sd15"], scene_dir, tmp_path / "ddp", steps=4), "--precision", "nf4"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    single = replace(load_config(tmp_path / "ddp" / "config.yaml"), out=str(tmp_path / "single"), batch_size=2)
    run_training(single)
    assert_same(adapter(tmp_path / "ddp"), adapter(tmp_path / "single"))


def process_failure(exitcode: int, timestamp: int, rank: int = 0):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    failure = ProcessFailure(local_rank=rank, pid=1, exitcode=exitcode, error_file="<none>")
    failure.timestamp = timestamp
    return failure


@pytest.mark.parametrize("codes, expected", [
    ({0: (-6, 100), 1: (2, 100)}, 2),  # one aborted while exiting (a signal), in the same second
    ({0: (-15, 99), 1: (2, 100)}, 2),  # a peer the launcher stopped is not the cause
    ({0: (2, 101), 1: (1, 100)}, 1),  # two own exits: the first one
    ({0: (-9, 100), 1: (-6, 100)}, 1),  # only signals: the launcher says which process was killed
    ({0: (3, 100), 1: (-9, 100)}, 1),  # a peer that stopped with it (PeerFailed) is not the cause either
])
def test_launcher_exits_with_the_code_of_the_process_that_failed_on_its_own(codes, expected):
    from trainer.distributed import failure_report

    code, line = failure_report({rank: process_failure(*code, rank) for rank, code in codes.items()}, 2)
    assert code == expected
    assert (line is None) == any(exitcode in (1, 2) for exitcode, _ in codes.values())  # an own exit has said why


@pytest.mark.parametrize("killed_by, hint", [(-9, "ran out of host memory"), (-11, "")])
def test_a_process_killed_before_it_could_say_why_gets_one_line_from_the_launcher(killed_by, hint):
    from trainer.distributed import failure_report

    # rank 0 stopped because its peer died (PeerFailed), or the launcher stopped it in the same second
    code, line = failure_report({0: process_failure(-15, 100, 0), 1: process_failure(killed_by, 100, 1)}, 2)
    assert failure_report({0: process_failure(3, 101, 0), 1: process_failure(killed_by, 100, 1)}, 2) == (code, line)
    name = {-9: "SIGKILL", -11: "SIGSEGV"}[killed_by]
    assert code == 1 and line.startswith(f"process 2 of 2 was killed by {name} before it could say why")
    assert hint in line and "\n" not in line


# imported by every process through sitecustomize: process 2 of 2 fails at its third step, the other does not
FAIL_ON_SECOND_PROCESS = '''
import os

if os.environ.get("RANK") == "1":
    import trainer.loop
    from trainer.errors import DataError

    real_step = trainer.loop.train_step

    def failing_step(parts, fetch, step, *args, **kwargs):
        if step == 2:
            {failure}
        return real_step(parts, fetch, step, *args, **kwargs)

    trainer.loop.train_step = failing_step
'''


def run_with_second_process_failing(failure: str, base_dirs, scene_dir, tmp_path) -> tuple[int, str]:
    """A 2-process run through our launcher in which process 2 executes ``failure`` at its third step."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_ON_SECOND_PROCESS.format(failure=failure))
    launcher = "import sys; from trainer.distributed import launch; sys.exit(launch(2, sys.argv[1:]))"
    cmd = [sys.executable, "-c", launcher, "train", *train_args(base_dirs["sd15"], scene_dir, tmp_path / "run", steps=6)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(hook), str(REPO))), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=240)  # the healthy process must not wait for its peer forever
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    return proc.returncode, err


@pytest.mark.slow
def test_error_on_one_process_stops_all_with_its_own_line(base_dirs, scene_dir, tmp_path):
    returncode, err = run_with_second_process_failing('raise DataError("image 3 cannot be read on this process")',
                                                      base_dirs, scene_dir, tmp_path)
    assert returncode == 2, err[-3000:]  # the failed process's exit code: a user error
    errors = re.findall(r"error: [^\r\n]*", err)  # the main process's progress bar may share the line
    assert errors == ["error: image 3 cannot be read on this process"], err[-3000:]  # one failure, one error line
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    from trainer import events as ev

    recorded = [e.message for e in ev.read_jsonl(tmp_path / "run" / "events.jsonl") if isinstance(e, ev.Error)]
    assert recorded == ["process 2 of 2: image 3 cannot be read on this process"]


@pytest.mark.slow
def test_a_process_killed_mid_run_is_named_by_the_launcher_in_one_line(base_dirs, scene_dir, tmp_path):
    """The out-of-memory killer leaves no word from the process: the launcher says what happened."""
    returncode, err = run_with_second_process_failing("os.kill(os.getpid(), 9)", base_dirs, scene_dir, tmp_path)
    assert returncode == 1, err[-3000:]
    errors = re.findall(r"error: [^\r\n]*", err)
    assert len(errors) == 1 and errors[0].startswith("error: process 2 of 2 was killed by SIGKILL"), err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    from trainer import events as ev
    from trainer.distributed import SILENT_PEER

    recorded = [e.message for e in ev.read_jsonl(tmp_path / "run" / "events.jsonl") if isinstance(e, ev.Error)]
    assert recorded == [SILENT_PEER]  # the run's history says what happened, not "see its error line"
