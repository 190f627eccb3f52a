"""Architectures of the shipped demo bases: configs, word-level tokenizers, schedulers.

Everything here builds *untrained* modules; :mod:`trainer.pretrain.train` trains
them. The shapes are small enough to train on a CPU in tens of minutes and are
still the real diffusers classes, so a demo base is an ordinary diffusers folder.

Why these choices (measured on the CPU prototype, see docs/demo-bases.md):
- one 3-level autoencoder (64 px -> 16x16x4 latents) shared by all three
  architectures; FLUX packs 2x2 latent patches, so its transformer sees 16 channels;
- word-level tokenizers: every word of the scene grammar and a few trigger words
  ("zkstyle", "sks", "ohwx") are single tokens, so a trigger does not split into
  characters and swamp the caption; unknown words still split into letters, and
  pretraining inserts random junk words so the bases learn to ignore them;
- SD1.5/SDXL use v-prediction with a zero-terminal-SNR schedule: at 16x16x4
  latents the standard schedule leaves ~7 % of the signal at t=999, so sampling
  from pure noise drifts every background towards grey.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch

from trainer.demo_data import COLORS, POSITION_PHRASES, SHAPES, SIZES

RESOLUTION = 64
LATENT_CHANNELS = 4
TRIGGERS = ("zkstyle", "sks", "ohwx")  # single-token trigger words for style LoRAs
MAX_TOKENS = 32  # longest grammar caption is 24 tokens with BOS/EOS
HIDDEN = 64  # text hidden size (SDXL: 32 + 32, concatenated)


def grammar_words() -> list[str]:
    words = {"a", "an", "two", "and", "on", "background", ",", "."}
    words |= set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(SIZES)
    for phrase in POSITION_PHRASES.values():
        words |= set(phrase.split())
    return sorted(words) + list(TRIGGERS)


@lru_cache(maxsize=1)
def _bpe_tables() -> tuple[dict, list]:
    """Vocab and merges of a BPE that keeps every grammar word whole (trained on the word list)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|unk|>", end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<|startoftext|>", "<|endoftext|>", "<|unk|>"], end_of_word_suffix="</w>",
        min_frequency=1, initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789"), show_progress=False,
    )
    tok.train_from_iterator(grammar_words() * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    return dict(model["vocab"]), merges


def clip_tokenizer():
    """CLIPTokenizer whose grammar and trigger words are single tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_tables()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS,
                              unk_token="<|unk|>", pad_token="<|endoftext|>")
    bad = [w for w in grammar_words() if len(tokenizer(w).input_ids) != 3]
    if bad:  # a tokenizers upgrade changed the BPE: better to fail at build time than to train on split words
        raise RuntimeError(f"word-level tokenizer splits {bad}")
    return tokenizer


def t5_tokenizer():
    """T5 (unigram) tokenizer with one piece per grammar word; letters as fallback."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    pieces += [("▁" + w, -1.0) for w in grammar_words()]
    pieces += [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,."]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def clip_text_model(hidden: int = HIDDEN, projection: bool = False, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, vocab_size=len(clip_tokenizer()),
        max_position_embeddings=MAX_TOKENS, projection_dim=hidden, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_model(hidden: int = HIDDEN):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer()), d_model=hidden, d_kv=16, d_ff=2 * hidden, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))


def vae(scaling_factor: float = 1.0, shift_factor: float | None = None):
    """64 px <-> 16x16x4; no quant convs, no mid-block attention (not needed at this size).

    Trained as a near-deterministic autoencoder: the log-variance half of the
    encoder output starts at -30 (std ~ 3e-7), see :mod:`trainer.pretrain.vae`.
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 32), layers_per_block=1, norm_num_groups=4, sample_size=RESOLUTION,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False,
    )


def sd_scheduler_config() -> dict:
    """Training (DDPM) and sampling (DDIM, trailing) share this config."""
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd_unet(cross_attention_dim: int, sdxl: bool = False, pooled_dim: int = 0):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=RESOLUTION // 4, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    # SD1.5 has no pooled-text path: everything a prompt says reaches the UNet through cross-attention,
    # where a to_k/to_v style LoRA can act on it. (Stages 1-2 of the shipped sd15 base had one,
    # addition_embed_type="text", which learned colours faster but left a style LoRA only a weak,
    # leaky handle on them: docs/demo-bases.md.) SDXL's pooled text + size ids are the real design.
    if sdxl:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=8, use_linear_projection=True,
                      projection_class_embeddings_input_dim=6 * 8 + pooled_dim)
    return UNet2DConditionModel(**kwargs)


def flux_transformer():
    from diffusers import FluxTransformer2DModel

    # 2x2 packing of 4-channel latents: 64 tokens of 16 channels
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN, guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def build_pipeline(arch: str, vae_model):
    """An untrained pipeline of ``arch`` around an (already trained) autoencoder."""
    import diffusers

    if arch == "sd15":
        return diffusers.StableDiffusionPipeline(
            vae=vae_model, text_encoder=clip_text_model(), tokenizer=clip_tokenizer(),
            unet=sd_unet(HIDDEN), scheduler=diffusers.DDIMScheduler(**sd_scheduler_config()),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if arch == "sdxl":
        half = HIDDEN // 2
        return diffusers.StableDiffusionXLPipeline(
            vae=vae_model, text_encoder=clip_text_model(half), text_encoder_2=clip_text_model(half, projection=True),
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
            unet=sd_unet(HIDDEN, sdxl=True, pooled_dim=half),
            scheduler=diffusers.DDIMScheduler(**sd_scheduler_config()), force_zeros_for_empty_prompt=False,
        )
    if arch == "flux":
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae_model,
            text_encoder=clip_text_model(), tokenizer=clip_tokenizer(), text_encoder_2=t5_model(),
            tokenizer_2=t5_tokenizer(), transformer=flux_transformer(),
        )
    raise ValueError(f"unknown architecture {arch!r}")


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
