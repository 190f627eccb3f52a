"""The trainer's own loop on a CUDA GPU, for every base precision: what CI (no GPU) cannot run.

Runs in the GPU session's ``gpu-tests`` slice (benchmarks/session.py). The spec: a few steps on
the tiny bases in fp16, bf16 and NF4 (bitsandbytes' CUDA kernels, frozen parts parked on the CPU,
fused AdamW) give the losses of the same run in fp32 on the CPU (the noise and timesteps come
from the same CPU generator; on CPU the four precisions agree within 1 %), the export loads with
diffusers, and the GPU memory is handed back when the run ends.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

from tests.conftest import ARCHS, tiny_config
from trainer import events as ev
from trainer.loop import run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs CUDA: the GPU session's gpu-tests slice runs it")]
STEPS = 3


def _losses(config) -> list[float]:
    seen = []
    run_training(config, emit=seen.append)
    return [e.loss for e in seen if isinstance(e, ev.Step)]


@pytest.fixture(scope="module")
def cpu_losses(base_dirs, scene_dir, tmp_path_factory) -> dict[str, list[float]]:
    return {arch: _losses(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path_factory.mktemp(f"cpu-{arch}"),
                                      steps=STEPS, lr=2e-2, device="cpu", precision="fp32"))
            for arch in ARCHS}


@pytest.mark.parametrize("precision", ["fp16", "bf16", "nf4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_gpu_run_matches_the_cpu_run_exports_and_frees_memory(base_dirs, scene_dir, tmp_path, cpu_losses, arch,
                                                                  precision):
    gc.collect()
    before = torch.cuda.memory_allocated()
    config = tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "run", steps=STEPS, lr=2e-2, device="cuda",
                         precision=precision)
    losses = _losses(config)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx(cpu_losses[arch], rel=0.03), (losses, cpu_losses[arch])

    gc.collect()
    assert torch.cuda.memory_allocated() - before < 2**20  # nothing of the run stays on the GPU

    from trainer.models import load_base

    base = load_base(config.base, device="cpu")
    base.pipe.load_lora_weights(str(tmp_path / "run" / "lora_diffusers.safetensors"))
    assert any("lora" in name for name, _ in base.denoiser.named_parameters())
