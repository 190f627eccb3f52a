"""The training objective's options: offset noise and Min-SNR-γ weighting (SD1.5/SDXL), timestep sampling (FLUX).

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


@pytest.mark.parametrize("arch,options,recorded", [
    ("sd15", dict(noise_offset=0.1, snr_gamma=5.0, flip=True),
     {"ss_noise_offset": "0.1", "ss_min_snr_gamma": "5", "ss_flip_aug": "True"}),
    ("flux", dict(timestep_sampling="logit_normal", flip=True),
     {"ss_timestep_sampling": "sigmoid", "ss_sigmoid_scale": "1.0", "ss_flip_aug": "True", "ss_noise_offset": "0"}),
])
def test_training_with_the_options_records_them_in_the_export(base_dirs, scene_dir, tmp_path, arch, options, recorded):
    from trainer.export import read_lora
    from trainer.loop import run_training

    seen = []
    result = run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "r", steps=2, **options),
                          emit=seen.append)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(e.loss)) for e in seen if e.kind == "step")
    meta = read_lora(result.exports[0])[1]
    assert {key: meta.get(key) for key in recorded} == recorded and meta["ss_seed"] == "7"


@pytest.mark.parametrize("arch,options,message", [
    ("flux", {"noise_offset": 0.1}, "FLUX trains with flow matching, so set both to 0"),
    ("flux", {"snr_gamma": 5.0}, "FLUX trains with flow matching, so set both to 0"),
    ("sd15", {"timestep_sampling": "logit_normal"}, "sd15 draws its timesteps uniformly"),
    ("sdxl", {"timestep_sampling": "logit_normal"}, "sdxl draws its timesteps uniformly"),
])
def test_an_option_the_architectures_loss_lacks_is_refused_before_writing_anything(base_dirs, scene_dir, tmp_path,
                                                                                   arch, options, message):
    from trainer.loop import run_training

    with pytest.raises(ConfigError, match=message):
        run_training(tiny_config(str(base_dirs[arch]), scene_dir, tmp_path / "r", **options))
    assert not (tmp_path / "r" / "config.yaml").exists() and not (tmp_path / "r" / "checkpoints").exists()


class ZeroTransformer:
    """Called in place of the FLUX transformer: records the timestep and predicts zero."""

    def __init__(self):
        self.timesteps = []

    def __call__(self, hidden_states, timestep, **kwargs):
        self.timesteps.append(timestep.clone())
        return (torch.zeros_like(hidden_states),)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_flux_draws_its_timesteps_as_the_sampling_says(base_dirs, sampling):
    base = load_base(str(base_dirs["flux"]), "fp32", "cpu")
    scheduler = base.handler.training_scheduler(base.pipe)
    bsz = 64
    latents = torch.randn(bsz, base.denoiser.config.in_channels // 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.zeros(bsz, 8, base.denoiser.config.joint_attention_dim),
            "pooled_projections": torch.zeros(bsz, base.denoiser.config.pooled_projection_dim)}
    zero = ZeroTransformer()
    base.handler.loss(base.pipe, base.denoiser, scheduler, latents, cond, torch.Generator().manual_seed(4),
                      forward=zero, objective=Objective(timestep_sampling=sampling))
    replay = torch.Generator().manual_seed(4)
    torch.randn(latents.shape, generator=replay)  # the noise comes first
    u = torch.sigmoid(torch.randn(bsz, generator=replay)) if sampling == "logit_normal" else torch.rand(bsz, generator=replay)
    expected = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()] / 1000
    torch.testing.assert_close(zero.timesteps[0], expected)
    middle = ((expected > 0.25) & (expected < 0.75)).float().mean()
    assert (middle > 0.6) == (sampling == "logit_normal")  # logit-normal: about 73 % in the middle half, uniform 50 %
