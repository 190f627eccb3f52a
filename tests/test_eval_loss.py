"""The fixed-noise loss: the same draws at every evaluation, from a stream of its own."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ARCHS, tiny_config
from trainer import events as ev
from trainer.checkpoint import checkpoint_dirs
from trainer.data import prepare
from trainer.scan import scan_dataset
from trainer.eval_loss import eval_batches, fixed_noise_loss
from trainer.loop import build_cache, run_training
from trainer.models import load_base


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluating_leaves_training_unchanged_and_starts_at_the_base_models_loss(base_dirs, scene_dir, tmp_path, arch):
    settings = dict(steps=5, lr=2e-2, checkpoint_every=4, flip=True, caption_dropout=0.2)
    evaluated = run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "eval", eval_every=2, **settings))
    plain = run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "plain", **settings))
    assert evaluated.step == plain.step == 5
    with_eval, without = (load_file(str(checkpoint_dirs(r)[-1] / "adapter.safetensors")) for r in
                          (tmp_path / "eval", tmp_path / "plain"))
    for key in without:  # the run's generator never served the evaluation
        assert torch.equal(with_eval[key], without[key]), key
    evals = [e for e in ev.read_jsonl(tmp_path / "eval" / "events.jsonl") if isinstance(e, ev.Eval)]
    assert [e.step for e in evals] == [0, 2, 4, 5]  # and the last step, where the run ends
    assert not any(isinstance(e, ev.Eval) for e in ev.read_jsonl(tmp_path / "plain" / "events.jsonl"))

    # step 0: a LoRA starts as a no-op, so the loss is the bare base's on the same images and draws
    config = tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "x")
    base = load_base(str(base_dirs[arch]), "fp32", "cpu")
    examples, _ = prepare(scan_dataset(scene_dir), config.resolution, config.center_crop, config.trigger, config.seed)
    cache = build_cache(base, examples)
    batches = eval_batches(cache.latents, [{**cache.text[ex.caption], **cache.extra[i]} for i, ex in enumerate(examples)],
                           [ex.bucket for ex in examples], config.batch_size)
    scheduler = base.handler.training_scheduler(base.pipe)
    bare = fixed_noise_loss(base.handler, base.pipe, base.denoiser, scheduler, batches, config.seed + 1, base.device)
    assert evals[0].loss == pytest.approx(bare, rel=1e-5)
    again = fixed_noise_loss(base.handler, base.pipe, base.denoiser, scheduler, batches, config.seed + 1, base.device)
    assert again == bare  # fixed draws: the same weights give the same number
    assert evals[-1].loss != pytest.approx(bare, rel=1e-4)  # trained weights: another number
    assert sum(len(latents) for latents, _ in batches) == min(8, len(examples))


def test_eval_batches_take_the_first_images_one_size_and_at_most_a_batch_each():
    buckets = [(64, 64), (128, 32)] * 6  # 12 images of two sizes
    latents = [torch.full((4, 8, 8), float(i)) for i in range(12)]
    conditioning = [{"encoder_hidden_states": torch.full((3, 5), float(i))} for i in range(12)]
    batches = eval_batches(latents, conditioning, buckets, batch_size=3)
    seen = []
    for batch_latents, cond in batches:
        ids = [int(x) for x in batch_latents[:, 0, 0, 0]]
        assert len(ids) <= 3 and len({buckets[i] for i in ids}) == 1
        assert [int(x) for x in cond["encoder_hidden_states"][:, 0, 0]] == ids  # each image keeps its caption
        seen += ids
    assert sorted(seen) == list(range(8))  # the first EVAL_IMAGES images, each once


def test_the_denoiser_is_evaluated_in_eval_mode_and_left_as_it_was():
    class Handler:
        modes = []

        def loss(self, pipe, denoiser, noise_scheduler, latents, cond, generator):
            self.modes.append(denoiser.training)
            return (denoiser(latents) ** 2).mean()

    model = torch.nn.Dropout(0.5)
    model.train()
    batch = [(torch.ones(2, 4), {})]
    first = fixed_noise_loss(Handler(), None, model, None, batch, seed=1, device=torch.device("cpu"))
    assert Handler.modes == [False] * 4 and model.training  # dropout off while evaluating, training mode back after
    assert first == 1.0  # no dropout: ones in, ones out


def test_a_stop_skips_the_evaluation_and_samples_due_at_its_step(base_dirs, scene_dir, tmp_path):
    """Ctrl-C means "write the checkpoint and exports now"; on several processes torchrun's grace time is short."""
    import threading

    stop = threading.Event()

    def stop_at_step_3(event):
        if isinstance(event, ev.Step) and event.step == 3:
            stop.set()

    result = run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "r", steps=9, eval_every=3,
                                      sample_every=3), emit=stop_at_step_3, stop=stop)
    assert result.stopped and result.step == 3 and result.exports
    kinds = [(e.kind, getattr(e, "step", None)) for e in ev.read_jsonl(tmp_path / "r" / "events.jsonl")]
    assert ("eval", 0) in kinds and ("eval", 3) not in kinds and not any(kind == "sample" for kind, _ in kinds)
