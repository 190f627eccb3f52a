"""FLUX: a rectified-flow transformer trained on the flow-matching objective.

Timestep sampling, packing and the target ``noise - latents`` follow diffusers'
``train_dreambooth_lora_flux.py`` (weighting scheme "none": uniform timesteps, or "logit_normal").
"""

from __future__ import annotations

import torch

from trainer.models.sd import SD15, draw_shard
from trainer.objective import Objective


class Flux(SD15):
    name = "flux"
    pipeline_class = "FluxPipeline"
    denoiser_attr = "transformer"
    modelspec_architecture = "flux-1-dev/lora"
    base_model_version = "flux1"
    peft_prefix = "transformer"
    # The value fed to a guidance-distilled transformer's guidance embedding while training (FLUX.1-dev; schnell and
    # the demo base have none). A decision, not a copy: diffusers' train_dreambooth_lora_flux.py defaults to 3.5;
    # 1.0 trains the LoRA at the embedding's low end. Not yet compared on real weights (a GPU item).
    train_guidance = 1.0

    def text_encoders(self, pipe):
        return [pipe.text_encoder, pipe.text_encoder_2]

    def max_sequence_length(self, pipe) -> int:
        return self.caption_reader(pipe).limit

    @torch.no_grad()
    def encode_text(self, pipe, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        embeds, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, device=pipe.text_encoder.device,
                                               max_sequence_length=self.max_sequence_length(pipe))
        return [{"encoder_hidden_states": e.cpu(), "pooled_projections": p.cpu()} for e, p in zip(embeds, pooled)]

    @torch.no_grad()
    def encode_image(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        vae = pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float().cpu()

    def extra_conditioning(self, pipe, original_size, crop_top_left, target_size, dtype, device):
        return {}

    def training_scheduler(self, pipe):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def loss(self, pipe, denoiser, noise_scheduler, latents, cond, generator, shard=(0, 1), forward=None,
             objective: Objective = Objective()) -> torch.Tensor:
        """Mean flow-matching loss of this process's share of the global batch (see ``SD15.loss``)."""
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if objective.shapes_noise_prediction:  # the loop and the web app refuse these for FLUX; this guards other callers
            raise ValueError("noise_offset and snr_gamma shape the SD noise-prediction loss; FLUX trains with "
                             "flow matching")

        bsz, channels, height, width = latents.shape
        device, dtype = latents.device, denoiser.dtype
        noise = draw_shard(torch.randn, tuple(latents.shape), generator, shard).to(device, latents.dtype)
        scheme = "logit_normal" if objective.timestep_sampling == "logit_normal" else "none"  # none: uniform
        u = draw_shard(lambda shape, generator: compute_density_for_timestep_sampling(
            scheme, shape[0], logit_mean=0.0, logit_std=1.0, generator=generator), (bsz,), generator, shard)
        # a float32 sigmoid rounds to 1.0 beyond ~17σ: keep the index inside the table
        indices = (u * noise_scheduler.config.num_train_timesteps).long().clamp(max=len(noise_scheduler.timesteps) - 1)
        timesteps = noise_scheduler.timesteps[indices].to(device)
        sigmas = noise_scheduler.sigmas[indices].to(device).view(bsz, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
        text = cond["encoder_hidden_states"].to(dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((bsz,), self.train_guidance, device=device, dtype=torch.float32)
        pred = (forward or denoiser)(hidden_states=packed.to(dtype), timestep=timesteps / 1000, guidance=guidance,
                        pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=text,
                        txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = pipe.vae_scale_factor
        pred = FluxPipeline._unpack_latents(pred, height * scale, width * scale, scale)
        target = noise - latents
        return torch.mean((pred.float() - target.float()) ** 2)

    def pipeline_kwargs(self, pipe) -> dict:
        return {"max_sequence_length": self.max_sequence_length(pipe)}

    def guidance_kwargs(self, pipe, guidance: float) -> dict:
        """FLUX.1-dev embeds guidance; a transformer without guidance embeds (schnell, the tiny
        demo base) ignores ``guidance_scale``, so guidance > 1 becomes true CFG with an empty negative."""
        if pipe.transformer.config.guidance_embeds or guidance <= 1.0:
            return {"guidance_scale": float(guidance)}
        return {"guidance_scale": 1.0, "true_cfg_scale": float(guidance), "negative_prompt": ""}
