"""``python -m trainer pretrain-demo`` pieces: word-level tokenizers, a seconds-long pretraining
run that writes a loadable diffusers folder, resume, and CLI input errors."""

from __future__ import annotations

import argparse
import json

import pytest


def test_grammar_and_trigger_words_are_single_tokens(tmp_path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    from trainer.pretrain import models

    clip = models.clip_tokenizer()
    for word in models.grammar_words():
        assert len(clip(word).input_ids) == 3, word  # BOS, word, EOS
    clip.save_pretrained(tmp_path / "clip")
    again = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    text = "zkstyle, a small red star in the top left on a blue background"
    assert again(text).input_ids == clip(text).input_ids
    assert len(clip(text).input_ids) == 2 + len(text.replace(",", " ,").split())
    t5 = models.t5_tokenizer()
    t5.save_pretrained(tmp_path / "t5")
    ids = T5TokenizerFast.from_pretrained(tmp_path / "t5")(text).input_ids
    assert len(ids) == 1 + len(text.replace(",", " ,").split())  # one piece per word, plus </s>


def test_captions_fit_the_token_budget():
    import random

    from trainer.demo_data import describe, sample_spec
    from trainer.pretrain import models

    clip, rng = models.clip_tokenizer(), random.Random(0)
    longest = max(len(clip("zkstyle, " + describe(sample_spec(rng), True, True)).input_ids) for _ in range(300))
    assert longest <= models.MAX_TOKENS


def test_augmented_captions_keep_the_scene():
    import random

    from trainer.pretrain.data import augment_caption

    rng = random.Random(0)
    out = [augment_caption("a red circle on a blue background", rng, junk=1.0) for _ in range(20)]
    assert all(o.endswith(", a red circle on a blue background") for o in out)


@pytest.fixture(scope="module")
def tiny_pretrain(tmp_path_factory):
    """A seconds-long sd15 pretraining run (budgets in minutes: 0.05 = 3 s)."""
    from trainer.pretrain.train import pretrain

    root = tmp_path_factory.mktemp("pretrain")
    summary = pretrain("sd15", root / "sd15", root / "work", minutes=0.05, pool=64, batch=4, vae_minutes=0.05,
                       vae_pool=32, log=lambda *_: None)
    return root, summary


def test_pretrain_writes_a_loadable_fp16_folder(tiny_pretrain):
    from safetensors import safe_open

    from trainer.config import Precision
    from trainer.models import load_base

    root, summary = tiny_pretrain
    folder = root / "sd15"
    studio = json.loads((folder / "studio.json").read_text())
    assert studio["steps"] >= 1 and studio["guidance"] > 0 and studio["train_steps"] == summary["train_steps"] >= 1
    for part in ("unet", "vae", "text_encoder"):
        (weights,) = (folder / part).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            assert f.get_tensor(next(iter(f.keys()))).dtype.is_floating_point
            assert str(f.get_tensor(next(iter(f.keys()))).dtype) == "torch.float16"
    base = load_base(str(folder), Precision.FP32, "cpu")
    assert base.arch == "sd15" and base.pipe.unet.dtype.is_floating_point
    assert base.pipe.scheduler.config.prediction_type == "v_prediction"
    image = base.pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_pretrain_resumes_from_its_state(tiny_pretrain):
    from trainer.pretrain.train import pretrain

    root, first = tiny_pretrain
    log = (root / "work" / "sd15" / "loss.jsonl").read_text().splitlines()
    assert len(log) == first["train_steps"]
    minutes = (first["train_seconds"] + 2.0) / 60
    again = pretrain("sd15", root / "sd15", root / "work", minutes=minutes, pool=64, batch=4, log=lambda *_: None)
    assert again["train_steps"] > first["train_steps"]  # continued, not restarted
    steps = [json.loads(line)["step"] for line in (root / "work" / "sd15" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, again["train_steps"] + 1))


def test_cli_rejects_a_bad_budget():
    from trainer.errors import UserError
    from trainer.pretrain import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(UserError, match="--minutes"):
        cli.run(parser.parse_args(["--arch", "sd15", "--out", "x", "--minutes", "0"]))


def test_init_from_continues_from_a_demo_base_folder(tiny_pretrain):
    """--init-from: a fresh work folder adopts the folder's autoencoder (so its latents
    stay valid) and starts the denoiser and text encoder from the folder's weights."""
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline

    from trainer.pretrain import models
    from trainer.pretrain.train import _load_weights, pretrain

    root, _ = tiny_pretrain
    source = root / "sd15"
    work = root / "warm"
    summary = pretrain("sd15", root / "warm-out", work, minutes=0.02, pool=64, batch=4, init_from=source,
                       log=lambda *_: None)
    earlier = json.loads((source / "studio.json").read_text())
    written = json.loads((root / "warm-out" / "studio.json").read_text())
    assert written["earlier_training"] == [{"train_steps": earlier["train_steps"],  # the history travels along
                                            "train_minutes": earlier["train_minutes"], "seed": earlier["seed"]}]
    assert written["train_steps"] == summary["train_steps"] and written["lora_lr_scale"] > 1
    adopted, shipped = AutoencoderKL.from_pretrained(work / "vae"), AutoencoderKL.from_pretrained(source / "vae")
    assert adopted.config.shift_factor is not None  # FLUX-style work folders need the latent mean
    for key, value in shipped.encoder.state_dict().items():
        assert torch.equal(adopted.encoder.state_dict()[key], value), key

    pipe = models.build_pipeline("sd15", adopted)
    before = pipe.unet.conv_in.weight.detach().clone()
    _load_weights("sd15", pipe, source)
    trained = DiffusionPipeline.from_pretrained(source, dtype=torch.float32)
    assert not torch.equal(before, pipe.unet.conv_in.weight)
    for part in ("unet", "text_encoder"):
        want, got = getattr(trained, part).state_dict(), getattr(pipe, part).state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), part


def test_init_from_drops_the_retired_pooled_text_path_and_refuses_other_mismatches(tiny_pretrain, tmp_path):
    """The shipped sd15 base's stages 1-2 had a pooled-text embedding (``addition_embed_type="text"``);
    continuing from such a folder drops exactly that part. Any other mismatch is one clear line."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from trainer.errors import UserError
    from trainer.pretrain import models
    from trainer.pretrain.train import _load_weights

    root, _ = tiny_pretrain
    old = tmp_path / "stage2"
    shutil.copytree(root / "sd15", old)
    current = UNet2DConditionModel.from_pretrained(old / "unet")
    assert current.config.addition_embed_type is None  # SD1.5's design: prompts only through cross-attention
    config = {k: v for k, v in current.config.items() if not k.startswith("_")}
    with_path = UNet2DConditionModel(**{**config, "addition_embed_type": "text"})
    with_path.load_state_dict(current.state_dict(), strict=False)
    with_path.save_pretrained(old / "unet")
    assert any(k.startswith("add_embedding.") for k in with_path.state_dict())

    pipe, lines = models.build_pipeline("sd15", models.vae()), []
    _load_weights("sd15", pipe, old, log=lines.append)
    assert any("retired pooled-text path" in line for line in lines), lines
    got = pipe.unet.state_dict()
    assert set(got) == set(current.state_dict())
    assert all(torch.equal(got[k], v.float()) for k, v in current.state_dict().items())

    wider = UNet2DConditionModel(**{**config, "block_out_channels": (32, 64, 128)})
    wider.save_pretrained(old / "unet")
    with pytest.raises(UserError, match="does not match the sd15 demo architecture.*without --init-from"):
        _load_weights("sd15", pipe, old, log=lines.append)


def test_init_from_a_folder_without_weights_is_one_clear_line(tmp_path):
    from trainer.errors import UserError
    from trainer.pretrain.train import pretrain

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no vae/ folder there"):
        pretrain("sd15", tmp_path / "out", tmp_path / "work", minutes=0.01, init_from=tmp_path / "empty",
                 log=lambda *_: None)
