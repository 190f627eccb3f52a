"""FSDP2 on two CPU processes (torchrun, gloo): the sharded base trains exactly what one process trains.

accelerate turns FSDP on only for GPUs, so these runs set the environment its launcher would set from
an FSDP config (docs/multi-gpu.md); the trainer shards with torch's ``fully_shard`` on CPU and GPU alike.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.test_distributed import adapter, assert_same, torchrun, train_args
from trainer import events as ev
from trainer.checkpoint import checkpoint_dirs, load_checkpoint
from trainer.config import load_config
from trainer.distributed import Dist
from trainer.errors import UnsupportedError
from trainer.fsdp import FsdpPlan, plan_from_env
from trainer.loop import run_training

FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def run_fsdp(args: list[str]) -> str:
    proc = torchrun(args, env=FSDP)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def logged(run_dir: Path) -> list[str]:
    return [e.message for e in ev.read_jsonl(run_dir / "events.jsonl") if isinstance(e, ev.Log)]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_with_doubled_batch_and_resume_it(base_dirs, scene_dir, tmp_path):
    args = [*train_args(base_dirs["sd15"], scene_dir, tmp_path / "fsdp", steps=6), "--sample-every", "3",
            "--sample-steps", "2"]
    out = run_fsdp(args)
    assert out.count("done at step 6") == 1
    assert any("(FSDP2)" in line and "sharded in" in line for line in logged(tmp_path / "fsdp"))
    single = replace(load_config(tmp_path / "fsdp" / "config.yaml"), out=str(tmp_path / "single"), batch_size=2)
    run_training(single)
    # checkpoints and exports hold the gathered LoRA and optimizer state, as one process writes them
    assert_same(adapter(tmp_path / "fsdp"), adapter(tmp_path / "single"))
    for name in ("lora.safetensors", "lora_diffusers.safetensors"):
        assert_same(load_file(str(tmp_path / "fsdp" / name)), load_file(str(tmp_path / "single" / name)))
    sharded, whole = (load_checkpoint(checkpoint_dirs(tmp_path / r)[-1]).optimizer["state"] for r in ("fsdp", "single"))
    assert sharded.keys() == whole.keys()
    for index in whole:
        assert_same(sharded[index], whole[index])
    # samples are rendered by both processes together (each denoiser call gathers the shards)
    for path in sorted((tmp_path / "single" / "samples").glob("*.png")):
        a = np.asarray(Image.open(path), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "fsdp" / "samples" / path.name), dtype=np.int16)
        assert np.abs(a - b).max() <= 2, path.name  # 8-bit rounding of nearly equal floats

    # the single process's step-4 checkpoint, resumed on two FSDP processes: its optimizer state is
    # sharded on load, so the continuation equals the uninterrupted single run
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "single", crashed)
    shutil.rmtree(checkpoint_dirs(crashed)[-1])
    assert checkpoint_dirs(crashed)[-1].name == "step-000004"
    run_fsdp(["--resume", "--out", str(crashed), "--steps", "6", "--batch-size", "1"])
    assert checkpoint_dirs(crashed)[-1].name == "step-000006"
    assert_same(adapter(crashed), adapter(tmp_path / "single"))


def test_fsdp_settings_come_from_accelerates_environment():
    assert plan_from_env({}) is None
    assert plan_from_env(FSDP) == FsdpPlan(reshard_after_forward=True, wrap_classes=None)
    plan = plan_from_env({**FSDP, "FSDP_RESHARD_AFTER_FORWARD": "false",
                          "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock, ResnetBlock2D"})
    assert plan == FsdpPlan(reshard_after_forward=False, wrap_classes=("BasicTransformerBlock", "ResnetBlock2D"))
    assert plan_from_env({**FSDP, "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}).wrap_classes == ()


def test_unsupported_fsdp_settings_are_refused_all_at_once_with_the_fix():
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_OFFLOAD_PARAMS": "true",
           "ACCELERATE_MIXED_PRECISION": "bf16"}
    with pytest.raises(UnsupportedError) as caught:
        plan_from_env(env)
    message = str(caught.value)
    assert "set fsdp_version: 2" in message
    assert "fsdp_offload_params: true is not supported yet" in message
    assert "pass --precision bf16" in message and "docs/multi-gpu.md" in message


def test_nf4_base_with_fsdp_is_refused_before_sharding():
    from trainer.quant import quantize_nf4

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    quantize_nf4(model, compute_dtype=torch.float32, device=torch.device("cpu"))
    dist = Dist(rank=0, world=2, accelerator=SimpleNamespace(device="cpu"), fsdp=FsdpPlan())
    with pytest.raises(UnsupportedError, match="NF4 with FSDP is not supported.*plain multi-GPU \\(DDP\\)"):
        dist.wrap(model)


def test_shipped_accelerate_fsdp_config_is_accepted():
    """docs/accelerate-fsdp.yaml, turned into the environment by accelerate's own launcher code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = Path(__file__).resolve().parent.parent / "docs" / "accelerate-fsdp.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "trainer", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert plan_from_env(env) == FsdpPlan(reshard_after_forward=True, wrap_classes=None)
