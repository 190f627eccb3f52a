"""The shipped demo bases (demo_models/<arch>): offline loading, size, prompt following
judged by trainer.judge, a style LoRA that visibly learns, and the one-line error
for missing or damaged weights.

Measured numbers (full 32 prompts x 4 seeds, learning/leakage) are in docs/demo-bases.md;
these tests check smaller subsets against floors set from those measurements.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "demo_models"
ARCHS = ("sd15", "sdxl", "flux")
MAX_BYTES = 12 * 1024 * 1024  # issue 10: <= 12 MB per architecture

# Issue 10's prompt-following thresholds, checked on 32 prompts x 1 seed (the full 32 x 4
# measurement is in docs/demo-bases.md: background 100 % for all three, object colour
# 74 / 72 / 66 %; on this subset 78 / 72 / 78 %). Random weights score about 2-6 %.
JUDGE_FLOORS = {arch: {"background": 0.80, "object": 0.60} for arch in ARCHS}


def shipped(arch: str) -> Path:
    folder = SHIPPED / arch
    assert (folder / "model_index.json").is_file(), f"demo_models/{arch} is missing from this checkout (it is committed)"
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_base_is_small_fp16_and_loads_offline(arch):
    from safetensors import safe_open

    from trainer.bases import parse_base
    from trainer.config import Precision
    from trainer.models import demo_folder, load_base

    folder = shipped(arch)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"{arch}: {size / 2**20:.1f} MB on disk"
    weights = sorted(folder.rglob("*.safetensors"))
    assert weights and not list(folder.rglob("*.bin"))
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert all(str(f.get_slice(k).get_dtype()) == "F16" for k in f.keys()), path
    studio = json.loads((folder / "studio.json").read_text())
    assert studio["arch"] == arch and studio["steps"] >= 1
    assert demo_folder(parse_base(f"demo:{arch}")) == folder  # the alias resolves to the shipped weights
    for name in (f"demo:{arch}", str(folder)):  # alias and plain local folder: the normal loading code
        base = load_base(name, Precision.FP32, "cpu")
        assert base.arch == arch and base.denoiser.dtype.is_floating_point
        assert str(base.denoiser.dtype) == "torch.float32"


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_base_draws_with_plain_diffusers(arch):
    """An engineer's first try, with no dtype given: every part loads in one dtype and the pipeline draws
    (transformers 5 loads a text encoder in the dtype its config names; the weights themselves are fp16)."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(shipped(arch)))
    dtypes = {c.dtype for c in pipe.components.values() if isinstance(c, torch.nn.Module)}
    assert dtypes == {torch.float32}, dtypes
    image = pipe("a red circle on a blue background", num_inference_steps=1, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_missing_or_damaged_weights_say_how_to_rebuild(tmp_path, monkeypatch):
    """Works on a random tiny base standing in for the shipped one, so it runs in every checkout."""
    import trainer.models as models
    from trainer.errors import ModelNotFoundError
    from trainer.models import load_base, tiny

    fake_root = tmp_path / "demo_models"
    tiny.save("sd15", fake_root / "sd15")
    import trainer.bases as bases

    monkeypatch.setattr(models, "SHIPPED_DEMOS", fake_root)
    monkeypatch.setattr(bases, "SHIPPED_DEMOS", fake_root)  # where bases.demo_path looks
    assert load_base("demo:sd15").arch == "sd15"  # intact: loads

    (weights,) = (fake_root / "sd15" / "unet").glob("*.safetensors")
    damaged = weights.read_bytes()[:100]
    for breakage in ("missing", "corrupt"):
        if breakage == "missing":
            backup = weights.read_bytes()
            weights.unlink()
        else:
            weights.write_bytes(damaged)
        with pytest.raises(ModelNotFoundError) as err:
            load_base("demo:sd15")
        message = str(err.value)
        assert "\n" not in message
        assert "pretrain-demo --arch sd15" in message and "git checkout -- demo_models/sd15" in message
        if breakage == "missing":
            weights.write_bytes(backup)


@pytest.fixture(scope="module")
def judged():
    """Judge scores of each shipped base on 32 prompts x 1 seed (computed once; ~10 s for the three)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from demo_quality import evaluate

    return {arch: evaluate(f"demo:{arch}", 32, 1) for arch in ARCHS if (SHIPPED / arch / "model_index.json").is_file()}


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_base_follows_prompts(judged, arch):
    shipped(arch)
    result = judged[arch]
    for key, floor in JUDGE_FLOORS[arch].items():
        assert result[key] >= floor, f"{arch} {key}: {result[key]:.1%} < {floor:.0%} ({result})"


@pytest.mark.slow
def test_style_lora_learns_on_the_demo_base(tmp_path):
    """Issue 10's learning check: 300 steps of the default style preset on the demo style set.

    The base scales the preset's learning rate (studio.json ``lora_lr_scale``: 1e-4 -> 3e-3) and
    samples at guidance 1. Measured on 32 held-out scenes (docs/demo-bases.md, LoRA seeds 7/1/2):
    style loss -51 to -52 %, colour histogram 36/29/31 % of the way to the style set (this test
    is seed 7: 36 %), clean-prompt loss +275 to +346 % (k/v leakage, reported not asserted).
    Same numbers with 1 or 2 threads. ~40 s.
    """
    from tests.conftest import tiny_config

    from trainer.demo_data import write_style_set
    from trainer.loop import run_training
    from trainer.pretrain.evaluate import learning_report

    shipped("sd15")
    data = tmp_path / "style"
    write_style_set("sepia-outline", data, n=20, seed=0)
    config = tiny_config("demo:sd15", data, tmp_path / "run", steps=300, preset="style")
    assert config.lr == pytest.approx(3e-3)  # the preset's 1e-4 scaled by the demo base
    run_training(config)
    report = learning_report("demo:sd15", tmp_path / "run" / "lora_diffusers.safetensors", n=32)
    summary = {k: v for k, v in report.items() if k != "images"}
    assert report["style_loss"]["change"] <= -0.20, summary
    assert report["style_histogram_progress"] >= 0.30, summary
