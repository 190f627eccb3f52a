"""Half precision that does not lose the training signal.

fp16 bases: the VAE encodes in fp32 where its config asks, and training uses loss scaling, so the LoRA
gradients are the fp32 base's, not a rounded-away part of them. bf16 adapters: a compute dtype (autocast),
with fp32 weights and optimizer, so small updates are not rounded away either.

Per-element gradients of a mean loss are about 1/latent-size; carried unscaled through fp16 activations the
small ones round to zero (measured on the demo bases: 7 % wrong at SD1.5 512 px, 20 % at SDXL 1024 px, with
the loss itself exact). The trainer's step scales the loss (``torch.amp.GradScaler``), unscales before clipping
and the NaN check, skips a step whose scaled gradients overflowed, and checkpoints the scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import ARCHS, tiny_config
from trainer.distributed import Dist
from trainer.loop import inject_lora
from trainer.models import load_base
from trainer.step import StepParts, grad_scaler, train_step

LATENT_SIDE = 64  # 512 px
DEMO_MODELS = Path(__file__).resolve().parents[1] / "demo_models"


def one_batch_step(base: str, precision: str, scaler, tmp_path, lr: float = 0.0, side: int = LATENT_SIDE):
    """StepParts for the trainer's step on one fixed batch (no clipping), and the batch's fetch function."""
    config = tiny_config(base, tmp_path, tmp_path, rank=4, alpha=8.0, device="cpu", precision=precision,
                         max_grad_norm=0.0, lr=1e-4)
    loaded = load_base(config.base, config.precision, "cpu")
    inject_lora(loaded, config)
    denoiser = loaded.denoiser
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would give A no gradient at all
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    channels = denoiser.config.in_channels if loaded.arch != "flux" else denoiser.config.in_channels // 4
    latents = torch.randn(1, channels, side, side, generator=g)
    cond = {k: v[None].float() for k, v in loaded.handler.encode_text(loaded.pipe, ["zkstyle, a red circle"])[0].items()}
    if loaded.arch == "sdxl":
        px = side * loaded.pipe.vae_scale_factor
        cond["time_ids"] = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    parts = StepParts(handler=loaded.handler, pipe=loaded.pipe, denoiser=denoiser, forward=denoiser,
                      noise_scheduler=loaded.handler.training_scheduler(loaded.pipe), optimizer=optimizer,
                      lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), params=params,
                      generator=torch.Generator().manual_seed(7), dist=Dist(), max_grad_norm=0.0, scaler=scaler)
    denoiser.train()
    return parts, lambda _: (latents, cond)


def lora_gradients(base: str, precision: str, scaled: bool, tmp_path) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one trainer step (lr 0, no clipping) on one fixed batch."""
    scaler = grad_scaler(precision, torch.device("cpu")) if scaled else None
    parts, fetch = one_batch_step(base, precision, scaler, tmp_path)
    train_step(parts, fetch, 0, check=lambda loss, norm: None)
    return {n: p.grad.double().clone() for n, p in parts.denoiser.named_parameters() if p.requires_grad}


def relative_error(got: dict, want: dict) -> float:
    num = sum(((got[n] - want[n]) ** 2).sum() for n in want) ** 0.5
    return float(num / sum((want[n] ** 2).sum() for n in want) ** 0.5)


def test_only_fp16_gets_a_scaler():
    assert isinstance(grad_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)
    assert all(grad_scaler(p, torch.device("cpu")) is None for p in ("fp32", "bf16", "nf4"))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_lora_gradients_match_the_fp32_base(tmp_path, arch):
    """On the trained demo bases (random tiny weights hide the effect) at 512 px, one batch, the same draws."""
    assert (DEMO_MODELS / arch / "model_index.json").is_file(), f"demo_models/{arch} is missing (it is committed)"
    exact = lora_gradients(f"demo:{arch}", "fp32", False, tmp_path)
    scaled = relative_error(lora_gradients(f"demo:{arch}", "fp16", True, tmp_path), exact)
    unscaled = relative_error(lora_gradients(f"demo:{arch}", "fp16", False, tmp_path), exact)
    # measured: scaled 0.05-0.07 %; unscaled 5.5 % (sd15), 1.9 % (sdxl), 0.5 % (flux)
    assert scaled < 0.002, scaled
    assert unscaled > 5 * scaled, (scaled, unscaled)  # what the scaler is for, shown on the same batch


def test_an_overflowing_fp16_step_is_skipped_not_called_divergence(base_dirs, tmp_path):
    """A scale too large for fp16 makes the gradients inf: the scaler skips that update and halves its scale.
    A non-finite *loss* is still divergence."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -12)  # a few steps down
    parts, fetch = one_batch_step(str(base_dirs["sd15"]), "fp16", scaler, tmp_path, lr=0.1, side=8)
    before = [p.detach().clone() for p in parts.params]
    seen = []
    loss, norm = train_step(parts, fetch, 0, check=lambda loss, norm: seen.append((loss, norm)))
    assert not torch.isfinite(torch.tensor(norm)) and seen == [(loss, 0.0)]
    assert all(torch.equal(a, p) for a, p in zip(before, parts.params))  # the update was skipped
    assert scaler.get_scale() == 2.0 ** 28
    assert parts.lr_scheduler.last_epoch == 0  # and the schedule did not move: no warmup spent without an update
    for step in range(1, 6):  # the scale comes down until a step goes through
        train_step(parts, fetch, step, check=lambda loss, norm: None)
        if not all(torch.equal(a, p) for a, p in zip(before, parts.params)):
            break
    assert scaler.get_scale() < 2.0 ** 28 and not all(torch.equal(a, p) for a, p in zip(before, parts.params))
    assert parts.lr_scheduler.last_epoch == 1  # the one step that went through

    def diverged(loss, norm):
        raise AssertionError(f"loss {loss}")

    nan_batch = (fetch(0)[0] * float("nan"), fetch(0)[1])
    with pytest.raises(AssertionError, match="loss nan"):
        train_step(parts, lambda _: nan_batch, 99, check=lambda loss, norm: diverged(loss, norm)
                   if loss != loss else None)


def test_an_fp16_run_checkpoints_its_loss_scale_and_resumes_exactly(base_dirs, scene_dir, tmp_path):
    import threading

    from tests.test_resume_failures import final_adapter, stop_at
    from trainer.checkpoint import checkpoint_dirs, load_checkpoint
    from trainer.loop import run_training

    settings = dict(steps=6, checkpoint_every=2, lr=1e-2, precision="fp16", device="cpu")
    straight = run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "straight", **settings))
    config = tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "split", **settings)
    stop = threading.Event()
    assert run_training(config, emit=stop_at(3, stop), stop=stop).step == 3
    state = load_checkpoint(checkpoint_dirs(tmp_path / "split")[-1])
    assert state.scaler is not None and state.scaler["scale"] > 0
    assert run_training(config, resume=True).step == straight.step == 6
    expected, got = final_adapter(tmp_path / "straight"), final_adapter(tmp_path / "split")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_an_fp16_vae_marked_force_upcast_encodes_the_cache_in_fp32(base_dirs, scene_dir, arch):
    """SDXL's and FLUX's VAEs overflow in fp16 (their configs say ``force_upcast``): the latent cache is encoded
    in fp32, and the VAE goes back to fp16 afterwards."""
    from trainer.config import Precision
    from trainer.data import prepare
    from trainer.scan import scan_dataset
    from trainer.loop import build_cache

    examples = prepare(scan_dataset(scene_dir), 64, False, "", 0)[0][:2]
    fp32 = build_cache(load_base(str(base_dirs[arch]), Precision.FP32, "cpu"), examples)
    base = load_base(str(base_dirs[arch]), Precision.FP16, "cpu")
    vae = base.pipe.vae
    vae.register_to_config(force_upcast=True)
    seen = []
    vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    cache = build_cache(base, examples)
    assert seen == [torch.float32] and vae.dtype == torch.float16
    for got, want in zip(cache.latents, fp32.latents):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # fp32 encoding of fp16-stored weights
    vae.register_to_config(force_upcast=False)
    seen.clear()
    build_cache(base, examples)
    assert seen == [torch.float16]  # a VAE that does not ask for it stays in fp16


def test_a_non_finite_latent_names_the_image(base_dirs, scene_dir, monkeypatch):
    from trainer.config import Precision
    from trainer.data import prepare
    from trainer.scan import scan_dataset
    from trainer.errors import DataError
    from trainer.loop import build_cache

    examples = prepare(scan_dataset(scene_dir), 64, False, "", 0)[0][:3]
    base = load_base(str(base_dirs["sd15"]), Precision.FP32, "cpu")
    real = base.handler.encode_image
    monkeypatch.setattr(type(base.handler), "encode_image",
                        lambda self, pipe, pixels: real(pipe, pixels) * torch.tensor([1.0, float("inf"), 1.0])[
                            :len(pixels)].view(-1, 1, 1, 1))
    assert len({ex.bucket for ex in examples}) == 1  # one chunk: its second image is the bad one
    with pytest.raises(DataError) as err:
        build_cache(base, examples)
    assert str(err.value) == (f"{Path(examples[1].source).name}: the VAE gave a non-finite latent (fp32); train with "
                              "precision fp32 or bf16, or leave this image out")


def test_bf16_adapters_compute_in_bf16_and_keep_fp32_weights_so_every_update_lands(base_dirs, scene_dir, tmp_path):
    """Pure-bf16 LoRA weights under AdamW left 80 % of lora_A unchanged per step (lr 1e-4: the updates are below
    bf16's resolution). adapter_dtype bf16 keeps the weights fp32 and runs the step under bf16 autocast."""
    from safetensors.torch import load_file

    from trainer import events as ev
    from trainer.checkpoint import checkpoint_dirs
    from trainer.loop import run_training

    losses = {}
    for dtype in ("fp32", "bf16"):
        seen = []
        run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / dtype, steps=3, lr=1e-4, rank=8,
                                 precision="bf16", adapter_dtype=dtype, checkpoint_every=1, keep_checkpoints=3),
                     emit=seen.append)
        losses[dtype] = [e.loss for e in seen if isinstance(e, ev.Step)]
        before, after = (load_file(str(c / "adapter.safetensors")) for c in checkpoint_dirs(tmp_path / dtype)[-2:])
        down = [k for k in after if "lora_A" in k]
        assert all(after[k].dtype == torch.float32 for k in after), dtype
        unchanged = sum(int((after[k] == before[k]).sum()) for k in down) / sum(after[k].numel() for k in down)
        assert unchanged < 0.01, (dtype, unchanged)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_bf16_adapters_on_an_fp16_base_are_refused(base_dirs, scene_dir, tmp_path):
    from trainer.errors import ConfigError
    from trainer.loop import run_training

    with pytest.raises(ConfigError, match="adapter_dtype bf16 with an fp16 base"):
        run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "r", steps=1, precision="fp16",
                                 adapter_dtype="bf16"))


def test_an_out_of_memory_after_unscaling_is_redone_with_a_fresh_scaler_stage(base_dirs, tmp_path):
    """The engine's auto rule redoes a step that ran out of memory; in fp16 that can happen after unscale_
    (clipping, AdamW's first step), and the redone step must not trip the scaler's "already unscaled" check."""
    class FirstStepOOM(torch.optim.SGD):
        failed = False

        def step(self, closure=None):
            if not FirstStepOOM.failed:
                FirstStepOOM.failed = True
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().step(closure)

    parts, fetch = one_batch_step(str(base_dirs["sd15"]), "fp16", grad_scaler("fp16", torch.device("cpu")), tmp_path,
                                  lr=0.1, side=8)
    parts.optimizer = FirstStepOOM(parts.params, lr=0.1)
    parts.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, lambda _: 1.0)
    before = [p.detach().clone() for p in parts.params]
    retried = []
    loss, _ = train_step(parts, fetch, 0, check=lambda loss, norm: None, on_oom=lambda: retried.append(True))
    assert retried == [True] and loss == loss
    assert not all(torch.equal(a, p) for a, p in zip(before, parts.params))  # the redone step updated the LoRA
