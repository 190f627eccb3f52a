"""The SD training objective's options: offset noise and Min-SNR-γ weighting.

Each loss is checked against the noise, timesteps and targets read back from what the denoiser was given
(a stand-in denoiser that predicts zero, so each sample's error is its target's mean square), not against a
second copy of the loss code.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config
from trainer.errors import ConfigError
from trainer.models import load_base
from trainer.objective import Objective

SD_ARCHS = ("sd15", "sdxl")
PREDICTIONS = ("epsilon", "v_prediction")


@pytest.fixture(scope="module")
def sd_bases(base_dirs):
    return {arch: load_base(str(base_dirs[arch]), "fp32", "cpu") for arch in SD_ARCHS}


class ZeroDenoiser:
    """Called in place of the UNet: records its inputs and predicts zero."""

    def __init__(self):
        self.calls = []

    def __call__(self, noisy, timesteps, *args, **kwargs):
        self.calls.append((noisy.detach().clone(), timesteps.clone()))
        return (torch.zeros_like(noisy),)


def sd_loss(base, objective, prediction="epsilon", seed=3, bsz=4):
    """(loss, latents, noisy, timesteps, scheduler) of one loss call on synthetic latents and cached-style conds."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config, prediction_type=prediction)
    latents = torch.randn(bsz, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    width = base.denoiser.config.cross_attention_dim
    cond = {"encoder_hidden_states": torch.zeros(bsz, 77, width)}
    if base.arch == "sdxl":
        cond.update(text_embeds=torch.zeros(bsz, 32), time_ids=torch.zeros(bsz, 6))
    zero = ZeroDenoiser()
    loss = base.handler.loss(base.pipe, base.denoiser, scheduler, latents, cond, torch.Generator().manual_seed(seed),
                             forward=zero, objective=objective)
    (noisy, timesteps), = zero.calls
    return loss, latents, noisy, timesteps, scheduler


def recovered_noise(scheduler, latents, noisy, timesteps):
    """ε from x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε."""
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return (noisy - alpha_bar.sqrt() * latents) / (1 - alpha_bar).sqrt()


def target_of(prediction, scheduler, latents, noise, timesteps):
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return noise if prediction == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents


@pytest.mark.parametrize("arch", SD_ARCHS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 5.0])
def test_min_snr_weights_each_sample_by_min_snr_gamma_over_snr(sd_bases, arch, prediction, gamma):
    loss, latents, noisy, timesteps, scheduler = sd_loss(sd_bases[arch], Objective(snr_gamma=gamma), prediction)
    noise = recovered_noise(scheduler, latents, noisy, timesteps)
    per_sample = target_of(prediction, scheduler, latents, noise, timesteps).pow(2).mean(dim=(1, 2, 3))
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    if gamma == 0:  # off: the plain mean squared error
        weights = torch.ones_like(snr)
    else:
        weights = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1 if prediction == "v_prediction" else snr)
    assert len(set(timesteps.tolist())) > 1  # the weights differ between samples
    torch.testing.assert_close(loss, (per_sample * weights).mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", SD_ARCHS)
def test_a_gamma_above_every_snr_is_the_plain_loss(sd_bases, arch):
    plain = sd_loss(sd_bases[arch], Objective())[0]
    assert sd_loss(sd_bases[arch], Objective(snr_gamma=1e9))[0] == pytest.approx(float(plain), rel=1e-5)
    assert sd_loss(sd_bases[arch], Objective(snr_gamma=0.05))[0] < plain  # a low γ damps the low-noise samples


@pytest.mark.parametrize("prediction,terminal", [("epsilon", 1.0), ("v_prediction", 0.0)])
def test_a_zero_terminal_snr_step_gets_the_limit_of_its_weight_not_nan(prediction, terminal):
    from diffusers import DDPMScheduler

    from trainer.models.sd import min_snr_weights

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction)  # SNR 0 at the last step
    weights = min_snr_weights(scheduler, torch.tensor([0, 500, 999]), 5.0)
    assert torch.isfinite(weights).all() and weights[-1] == terminal


@pytest.mark.parametrize("arch", SD_ARCHS)
@pytest.mark.parametrize("offset", [0.05, 0.1])
def test_offset_noise_adds_a_normal_draw_per_image_and_channel_scaled_by_the_offset(sd_bases, arch, offset):
    _, latents, plain_noisy, plain_t, scheduler = sd_loss(sd_bases[arch], Objective(), seed=3)
    loss, _, noisy, timesteps, _ = sd_loss(sd_bases[arch], Objective(noise_offset=offset), seed=3)
    assert torch.equal(timesteps, plain_t)  # the same timesteps and pixel noise: only the offset is new
    plain = recovered_noise(scheduler, latents, plain_noisy, plain_t)
    shift = recovered_noise(scheduler, latents, noisy, timesteps) - plain
    # the generator's draws in order: pixel noise, timesteps, then N(0, 1) of shape (batch, channels, 1, 1)
    replay = torch.Generator().manual_seed(3)
    torch.randn(latents.shape, generator=replay)
    torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=replay)
    draw = torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=replay)
    torch.testing.assert_close(shift, (offset * draw).expand_as(shift), rtol=0, atol=2e-4)
    # the offset is part of the target too: the zero prediction's error is the whole noise
    torch.testing.assert_close(loss, (plain + shift).pow(2).mean(), rtol=1e-4, atol=1e-6)


def test_sd_training_with_the_options_and_flips_records_them_in_the_export(base_dirs, scene_dir, tmp_path):
    from trainer.export import read_lora
    from trainer.loop import run_training

    seen = []
    result = run_training(tiny_config(str(base_dirs["sd15"]), scene_dir, tmp_path / "r", steps=2, noise_offset=0.1,
                                      snr_gamma=5.0, flip=True), emit=seen.append)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(e.loss)) for e in seen if e.kind == "step")
    meta = read_lora(result.exports[0])[1]
    assert (meta["ss_noise_offset"], meta["ss_min_snr_gamma"], meta["ss_flip_aug"], meta["ss_seed"]) == \
        ("0.1", "5", "True", "7")


@pytest.mark.parametrize("options", [{"noise_offset": 0.1}, {"snr_gamma": 5.0}])
def test_flux_refuses_the_sd_objective_options_before_writing_anything(base_dirs, scene_dir, tmp_path, options):
    from trainer.loop import run_training

    with pytest.raises(ConfigError, match="FLUX trains with flow matching, so set both to 0"):
        run_training(tiny_config(str(base_dirs["flux"]), scene_dir, tmp_path / "r", **options))
    assert not (tmp_path / "r" / "config.yaml").exists() and not (tmp_path / "r" / "checkpoints").exists()
