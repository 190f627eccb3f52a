"""The reference step: a LoRA training step as diffusers' official examples write it.

Followed line by line (diffusers ``examples/text_to_image/train_text_to_image_lora.py``,
``train_text_to_image_lora_sdxl.py``, ``examples/dreambooth/train_dreambooth_lora_flux.py``),
with their defaults:

- nothing is cached: every step VAE-encodes the batch (``latent_dist.sample()``) and runs the
  text encoders on token ids (custom per-image captions, as a style set has); tokenization itself
  is left out (synthetic ids);
- frozen weights in ``weight_dtype``; the SDXL example keeps its VAE in fp32 ("to avoid NaN
  losses", the default without ``--pretrained_vae_model_name_or_path``); LoRA via peft
  ``LoraConfig(init_lora_weights="gaussian")`` + ``add_adapter``, upcast to fp32 only for fp16
  (``cast_training_params``), as the examples do;
- mixed precision the way ``accelerate`` applies it to the prepared denoiser: forward under
  ``torch.autocast``; for fp16 a ``GradScaler`` (scale, unscale before clipping, step, update);
- ``torch.optim.AdamW`` with default kernels (not fused), gradient clipping at 1.0, constant LR,
  ``optimizer.zero_grad()`` after the step, ``loss.detach().item()`` logged every step;
- default attention processor, no compile, no gradient checkpointing (the harness turns it on only
  if the step runs out of memory, as a user of the example would have to, and says so);
- NF4: the pattern of diffusers' quantized LoRA examples (``BitsAndBytesConfig`` NF4 base +
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)``, which upcasts the
  non-quantized weights to fp32).

The adapted modules and rank are the same as ours (the preset under test), so both sides train
the same LoRA; alpha = 2r on both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.parts import Parts, synthetic_images, synthetic_token_ids


class ReferenceStep:
    """One step of the diffusers example for ``parts.spec.arch`` (see the module doc)."""

    name = "reference"

    def __init__(self, parts: Parts, rank: int, batch: int = 1, seed: int = 0, grad_ckpt: bool = False):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from trainer.targets import resolve

        spec, device, denoiser = parts.spec, parts.device, parts.denoiser
        self.parts, self.spec, self.batch, self.ckpt = parts, spec, batch, grad_ckpt
        self.weight_dtype = parts.dtype
        if parts.precision == "nf4":
            from peft import prepare_model_for_kbit_training

            prepare_model_for_kbit_training(denoiser, use_gradient_checkpointing=False)
        if grad_ckpt:
            denoiser.enable_gradient_checkpointing()
        names = resolve(spec.arch, "style", [n for n, _ in denoiser.named_modules()])
        torch.manual_seed(seed)
        denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian", target_modules=names))
        if parts.precision == "fp16":
            cast_training_params(denoiser, dtype=torch.float32)
        self.params = [p for p in denoiser.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type) if parts.precision == "fp16" else None
        self.autocast = self.weight_dtype != torch.float32
        import diffusers

        if spec.arch == "flux":
            self.noise_scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(spec.sampler)
        else:
            self.noise_scheduler = diffusers.DDPMScheduler.from_config(spec.sampler)
        self.pixels = synthetic_images(spec, batch, seed)        # the dataloader's CPU batch
        self.token_ids = synthetic_token_ids(spec, batch, seed)
        denoiser.train()

    def describe(self) -> dict:
        return {"cache": False, "compile": False, "channels_last": False, "attn": "default",
                "grad_ckpt": "on (OOM without)" if self.ckpt else "off", "fused_adamw": False,
                "autocast": self.autocast, "offload_frozen": False,
                "vae_dtype": str(self.parts.vae.dtype).removeprefix("torch.")}

    @torch.no_grad()
    def _encode(self, device):
        vae, tes, spec = self.parts.vae, self.parts.text_encoders, self.spec
        pixels = self.pixels.to(device)
        ids = [t.to(device) for t in self.token_ids]
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample()
        if spec.arch == "flux":
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        else:
            latents = latents * vae.config.scaling_factor
        latents = latents.to(self.weight_dtype)
        if spec.arch == "sd15":
            return latents, {"encoder_hidden_states": tes[0](ids[0], return_dict=False)[0]}
        if spec.arch == "sdxl":  # the example's encode_prompt: penultimate hidden states, pooled from encoder 2
            out1 = tes[0](ids[0], output_hidden_states=True, return_dict=False)
            out2 = tes[1](ids[1], output_hidden_states=True, return_dict=False)
            embeds = torch.cat([out1[-1][-2], out2[-1][-2]], dim=-1)
            side = float(spec.resolution)
            time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]] * self.batch, device=device,
                                    dtype=self.weight_dtype)
            return latents, {"encoder_hidden_states": embeds, "text_embeds": out2[0], "time_ids": time_ids}
        pooled = tes[0](ids[0], output_hidden_states=False).pooler_output.to(self.weight_dtype)
        embeds = tes[1](ids[1], output_hidden_states=False)[0].to(self.weight_dtype)
        return latents, {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _predict(self, latents, cond, device):
        denoiser, bsz = self.parts.denoiser, latents.shape[0]
        noise = torch.randn_like(latents)
        if self.spec.arch != "flux":
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
            pred = denoiser(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added or None,
                            return_dict=False)[0]
            return pred, noise
        from diffusers import FluxPipeline

        sched = self.noise_scheduler
        _, channels, height, width = latents.shape
        indices = (torch.rand(bsz) * sched.config.num_train_timesteps).long()  # weighting_scheme "none"
        timesteps = sched.timesteps[indices].to(device)
        schedule = sched.timesteps.to(device)  # the example's get_sigmas: one .item() per sample
        steps = [(schedule == t).nonzero().item() for t in timesteps]
        sigmas = sched.sigmas.to(device, latents.dtype)[steps].flatten().view(bsz, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, self.weight_dtype)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=device, dtype=self.weight_dtype)
        guidance = torch.tensor([self.spec.guidance], device=device).expand(bsz)
        pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                        pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
                        txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = self.spec.vae_scale_factor
        pred = FluxPipeline._unpack_latents(pred, height * scale, width * scale, scale)
        return pred, noise - latents

    def __call__(self) -> float:
        device = self.parts.device
        latents, cond = self._encode(device)
        with torch.autocast(device.type, dtype=self.weight_dtype, enabled=self.autocast):
            pred, target = self._predict(latents, cond, device)
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        return loss.detach().item()
