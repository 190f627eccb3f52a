"""The fixed-noise loss: the same draws at every evaluation, from a stream of its own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ARCHS, tiny_config
from trainer import events as ev
from trainer.checkpoint import checkpoint_dirs
from trainer.data import prepare, scan_dataset
from trainer.eval_loss import eval_batches, fixed_noise_loss
from trainer.loop import build_cache, run_training
from trainer.models import load_base


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluating_leaves_training_unchanged_and_starts_at_the_base_models_loss(base_dirs, scene_dir, tmp_path, arch):
    settings = dict(steps=4, lr=2e-2, checkpoint_every=4, flip=True, caption_dropout=0.2)
    evaluated = run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "eval", eval_every=2, **settings))
    plain = run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "plain", **settings))
    assert evaluated.step == plain.step == 4
    with_eval, without = (load_file(str(checkpoint_dirs(r)[-1] / "adapter.safetensors")) for r in
                          (tmp_path / "eval", tmp_path / "plain"))
    for key in without:  # the run's generator never served the evaluation
        assert torch.equal(with_eval[key], without[key]), key
    evals = [e for e in ev.read_jsonl(tmp_path / "eval" / "events.jsonl") if isinstance(e, ev.Eval)]
    assert [e.step for e in evals] == [0, 2, 4]
    assert not any(isinstance(e, ev.Eval) for e in ev.read_jsonl(tmp_path / "plain" / "events.jsonl"))

    # step 0: a LoRA starts as a no-op, so the loss is the bare base's on the same images and draws
    config = tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "x")
    base = load_base(str(base_dirs[arch]), "fp32", "cpu")
    examples, _ = prepare(scan_dataset(scene_dir), config.resolution, config.center_crop, config.trigger, config.seed)
    cache = build_cache(base, examples)
    batches = eval_batches(cache.latents, [{**cache.text[ex.caption], **cache.extra[i]} for i, ex in enumerate(examples)],
                           [ex.bucket for ex in examples])
    scheduler = base.handler.training_scheduler(base.pipe)
    bare = fixed_noise_loss(base.handler, base.pipe, base.denoiser, scheduler, batches, config.seed + 1, base.device)
    assert evals[0].loss == pytest.approx(bare, rel=1e-5)
    again = fixed_noise_loss(base.handler, base.pipe, base.denoiser, scheduler, batches, config.seed + 1, base.device)
    assert again == bare  # fixed draws: the same weights give the same number
    assert evals[-1].loss != pytest.approx(bare, rel=1e-4)  # trained weights: another number
    assert sum(len(latents) for latents, _ in batches) == min(8, len(examples))
