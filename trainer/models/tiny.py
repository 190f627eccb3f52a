"""Tiny SD1.5-, SDXL- and FLUX-architecture pipelines built from configs.

They are real diffusers pipelines with the real module names (``attn2.to_k``,
``transformer_blocks.0.attn.add_k_proj`` ...), small enough to train a step in
well under a second on a laptop CPU. Saved with ``save_pretrained`` they are
ordinary diffusers folders, so the normal loading code is what tests exercise.
Weights are random; the tokenizers are character-level and built offline.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from trainer.bases import ARCHS, DEMO_RESOLUTION

_CHARS = string.ascii_lowercase + string.digits + ",.'-!?:;()"
RESOLUTION = DEMO_RESOLUTION  # pixel side of the tiny models' native size


def clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges), written offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer():
    """A character-level unigram T5 tokenizer, written offline."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.5)]
    pieces += [("▁" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=32)


def _clip_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, vocab_size=len(clip_tokenizer()),
        max_position_embeddings=77, projection_dim=32 if projection else 512, hidden_act="gelu",
    )


def _vae(latent_channels: int, flux: bool):
    from diffusers import AutoencoderKL

    # 3 levels: 64 px -> 16x16 latents, the SD-family factor 8 would leave 8x8 (too coarse to learn shapes)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=RESOLUTION, scaling_factor=1.0 if not flux else 0.5, shift_factor=0.0 if flux else None,
        use_quant_conv=not flux, use_post_quant_conv=not flux,
    )


def build_sd15():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8,
    )
    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = EulerDiscreteScheduler.from_config(train_sched.config, steps_offset=1, timestep_spacing="leading")
    return StableDiffusionPipeline(
        vae=_vae(4, flux=False), text_encoder=CLIPTextModel(_clip_config(False)), tokenizer=clip_tokenizer(),
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sdxl():
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=8,  # 64 = the two text encoders' hidden sizes
    )
    train_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return StableDiffusionXLPipeline(
        vae=_vae(4, flux=False), text_encoder=CLIPTextModel(_clip_config(False)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(True)), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler.from_config(train_sched.config, steps_offset=1, timestep_spacing="leading"),
        force_zeros_for_empty_prompt=False,
    )


def build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer()), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=_vae(4, flux=True),
        text_encoder=CLIPTextModel(_clip_config(False)), tokenizer=clip_tokenizer(),
        text_encoder_2=t5, tokenizer_2=t5_tokenizer(), transformer=transformer,
    )


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl, "flux": build_flux}


def build(arch: str, seed: int = 0):
    """A tiny random-weight pipeline for ``arch`` (deterministic for a seed)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; use one of {', '.join(ARCHS)}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BUILDERS[arch]()


def save(arch: str, out: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny pipeline as an ordinary diffusers folder."""
    out = Path(out)
    build(arch, seed).save_pretrained(out, safe_serialization=True)
    return out
