"""SD1.5 and SDXL: UNet denoisers trained on the noise-prediction objective.

The objective, timestep sampling and conditioning follow diffusers' own
``train_text_to_image_lora.py`` / ``train_text_to_image_lora_sdxl.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.dataset_check import CAPTION_TOKENIZERS, CaptionReader, reader_for
from trainer.objective import Objective


def draw_shard(sample, local_shape: tuple, generator: torch.Generator, shard: tuple[int, int]) -> torch.Tensor:
    """Draw for the whole global batch, keep rows ``rank·local … (rank+1)·local``."""
    rank, world = shard
    local = local_shape[0]
    full = sample((local * world, *local_shape[1:]), generator=generator)
    return full[rank * local:(rank + 1) * local]


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight of each sample's mean squared error (see :class:`Objective`)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    denominator = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
    # a zero-terminal-SNR schedule has SNR 0 at its last step: there ε-prediction's min(SNR, γ)/SNR tends to 1
    # (diffusers' example divides 0 by 0 there), and v-prediction's min(SNR, γ)/(SNR + 1) is 0
    return torch.where(denominator > 0, clipped / denominator.clamp(min=torch.finfo(torch.float32).tiny),
                       torch.ones_like(snr))


class SD15:
    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_attr = "unet"
    modelspec_architecture = "stable-diffusion-v1/lora"
    base_model_version = "sd_v1"
    kohya_prefix = "lora_unet_"
    peft_prefix = "unet"

    def text_encoders(self, pipe):
        return [pipe.text_encoder]

    def caption_reader(self, pipe) -> CaptionReader:
        """The text encoder whose token limit cuts captions off in training."""
        return reader_for(self.name, getattr(pipe, CAPTION_TOKENIZERS[self.name][0]))

    @torch.no_grad()
    def encode_text(self, pipe, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        embeds, _ = pipe.encode_prompt(captions, pipe.text_encoder.device, 1, False)
        return [{"encoder_hidden_states": e.cpu()} for e in embeds]

    @torch.no_grad()
    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (latents * vae.config.scaling_factor).float().cpu()

    def extra_conditioning(self, pipe, original_size, crop_top_left, target_size, dtype, device):
        return {}

    def loss(self, pipe, denoiser, noise_scheduler, latents, cond, generator, shard=(0, 1), forward=None,
             objective: Objective = Objective()) -> torch.Tensor:
        """Mean noise-prediction loss of this process's share of the global batch.

        Noise and timesteps are drawn for the *global* batch (``world`` × local) from the
        shared generator and sliced by ``rank``, so N processes see exactly the draws a
        single process with an N-times larger batch would. ``forward`` is the (possibly
        DDP-wrapped) module to call; ``denoiser`` is the bare model for its attributes.
        """
        if objective.timestep_sampling != "uniform":  # refused by the loop and the web app; guards other callers
            raise ValueError("timestep_sampling other than uniform is for FLUX's flow matching")
        bsz = latents.shape[0]
        noise = draw_shard(torch.randn, (bsz, *latents.shape[1:]), generator, shard).to(latents.device, latents.dtype)
        timesteps = draw_shard(lambda shape, generator: torch.randint(0, noise_scheduler.config.num_train_timesteps, shape,
                                                                      generator=generator), (bsz,), generator, shard)
        timesteps = timesteps.to(latents.device)
        if objective.noise_offset:  # drawn after the timesteps: offset 0 keeps a run's draws as they were
            offset = draw_shard(torch.randn, (bsz, latents.shape[1], 1, 1), generator, shard)
            noise = noise + objective.noise_offset * offset.to(latents.device, latents.dtype)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        pred = (forward or denoiser)(noisy.to(denoiser.dtype), timesteps, cond["encoder_hidden_states"].to(denoiser.dtype),
                        added_cond_kwargs=added or None, return_dict=False)[0]
        if not objective.snr_gamma:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        return (per_sample * min_snr_weights(noise_scheduler, timesteps, objective.snr_gamma)).mean()

    def training_scheduler(self, pipe):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def pipeline_kwargs(self, pipe) -> dict:
        return {}

    def guidance_kwargs(self, pipe, guidance: float) -> dict:
        """Pipeline arguments for classifier-free guidance strength ``guidance``."""
        return {"guidance_scale": float(guidance)}


class SDXL(SD15):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    base_model_version = "sdxl_base_v1-0"

    def text_encoders(self, pipe):
        return [pipe.text_encoder, pipe.text_encoder_2]

    @torch.no_grad()
    def encode_text(self, pipe, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=pipe.text_encoder.device,
                                                   num_images_per_prompt=1, do_classifier_free_guidance=False)
        return [{"encoder_hidden_states": e.cpu(), "text_embeds": p.cpu()} for e, p in zip(embeds, pooled)]

    def extra_conditioning(self, pipe, original_size, crop_top_left, target_size, dtype, device):
        """SDXL's micro-conditioning: original size, crop corner and target size (H, W order)."""
        ids = torch.tensor([list(original_size) + list(crop_top_left) + list(target_size)], dtype=torch.float32)
        return {"time_ids": ids[0]}
