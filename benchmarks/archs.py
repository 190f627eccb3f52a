"""Full-size SD1.5 / SDXL / FLUX.1-dev architectures with random weights, built without downloads.

Configs are the published ones (``unet/config.json``, ``vae/config.json``, text encoder
configs of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0 and
black-forest-labs/FLUX.1-dev) written out as dicts; ``--list`` checks they construct and
counts their parameters on the ``meta`` device. Building is memory-lean: parameters are
created on ``meta`` (buffers stay real, as ``accelerate.init_empty_weights(include_buffers=False)``
does, so e.g. CLIP's ``position_ids`` survive), then :func:`materialize` (``to_empty`` for the
meta tensors only) allocates them on the target device in the target dtype and an in-place init fills them: N(0, 0.02) for
matrices/kernels, 0 for biases, 1 for other vectors (norm scales). NF4 linears are made
one layer at a time from a fresh bf16 tensor, so no full-precision copy of the model exists.
The smoke specs take their configs from :mod:`trainer.models.tiny`, so tests run this
same code on the tiny test models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

_SD_BETAS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
_SD_SAMPLER = dict(_SD_BETAS, timestep_spacing="leading", steps_offset=1)
_FLUX_SAMPLER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
FLUX_VAE = dict(SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=2,
              pad_token_id=1)
CLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)


@dataclass(frozen=True)
class Component:
    """One model of a pipeline: class name (diffusers or transformers) and its config."""

    cls: str
    config: dict
    config_cls: str = ""  # transformers config class; empty for diffusers models

    def instantiate(self, meta_buffers: bool = False) -> torch.nn.Module:
        """The model with its parameters on ``meta`` (buffers too when ``meta_buffers``): nothing is allocated."""
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=meta_buffers):
            if self.config_cls:
                import transformers

                config = getattr(transformers, self.config_cls)(**self.config)
                return getattr(transformers, self.cls)(config)
            import diffusers

            return getattr(diffusers, self.cls).from_config(self.config)


@dataclass(frozen=True)
class ArchSpec:
    """What the harness needs to build and feed one architecture at one resolution."""

    key: str                     # row label, e.g. "flux@512"
    arch: str                    # sd15 | sdxl | flux (trainer/models handler name)
    resolution: int              # pixels (square; static shape)
    denoiser: Component
    vae: Component
    text_encoders: tuple[Component, ...]
    text_len: int                # tokens per caption (77 CLIP, 512 T5 for FLUX.1-dev)
    sample_steps: int            # the pipelines' usual step count for this model
    guidance: float
    sampler: dict = field(default_factory=dict)    # inference scheduler config
    tiny: bool = False

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return self.vae.config["latent_channels"], side, side

    def cond_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of the cached conditioning, as trainer/models' ``encode_text`` returns it."""
        c = self.denoiser.config
        if self.arch == "flux":
            return {"encoder_hidden_states": (self.text_len, c["joint_attention_dim"]),
                    "pooled_projections": (c["pooled_projection_dim"],)}
        shapes = {"encoder_hidden_states": (self.text_len, c["cross_attention_dim"])}
        if self.arch == "sdxl":
            shapes["text_embeds"] = (c["projection_class_embeddings_input_dim"] - 6 * c["addition_time_embed_dim"],)
            shapes["time_ids"] = (6,)
        return shapes


FULL_SPECS = {
    "sd15@512": ArchSpec("sd15@512", "sd15", 512, Component("UNet2DConditionModel", SD15_UNET),
                         Component("AutoencoderKL", SD_VAE), (Component("CLIPTextModel", CLIP_L, "CLIPTextConfig"),),
                         77, 30, 7.5, _SD_SAMPLER),
    "sdxl@1024": ArchSpec("sdxl@1024", "sdxl", 1024, Component("UNet2DConditionModel", SDXL_UNET),
                          Component("AutoencoderKL", SDXL_VAE),
                          (Component("CLIPTextModel", CLIP_L, "CLIPTextConfig"),
                           Component("CLIPTextModelWithProjection", CLIP_BIGG, "CLIPTextConfig")),
                          77, 30, 5.0, _SD_SAMPLER),
}
for _res in (512, 1024):
    FULL_SPECS[f"flux@{_res}"] = ArchSpec(
        f"flux@{_res}", "flux", _res, Component("FluxTransformer2DModel", FLUX_DEV), Component("AutoencoderKL", FLUX_VAE),
        (Component("CLIPTextModel", CLIP_L, "CLIPTextConfig"), Component("T5EncoderModel", T5_XXL, "T5Config")),
        512, 28, 3.5, _FLUX_SAMPLER)


def _plain(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def tiny_specs() -> dict[str, ArchSpec]:
    """Specs of the tiny test models (configs read from trainer.models.tiny's builders)."""
    from trainer.models import tiny

    specs = {}
    for arch in ("sd15", "sdxl", "flux"):
        pipe = tiny.build(arch)
        encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
        tes = tuple(Component(type(te).__name__, {k: v for k, v in te.config.to_dict().items()
                                                  if k not in ("transformers_version", "architectures", "model_type")},
                              type(te.config).__name__) for te in encoders)
        text_len = pipe.tokenizer_2.model_max_length if arch == "flux" else pipe.tokenizer.model_max_length
        denoiser = pipe.transformer if arch == "flux" else pipe.unet
        specs[f"{arch}@tiny"] = ArchSpec(
            f"{arch}@tiny", arch, tiny.RESOLUTION, Component(type(denoiser).__name__, _plain(denoiser.config)),
            Component("AutoencoderKL", _plain(pipe.vae.config)), tes, int(text_len), 2, 3.5 if arch == "flux" else 5.0,
            _plain(pipe.scheduler.config), tiny=True)
    return specs


def get_spec(key: str) -> ArchSpec:
    specs = {**FULL_SPECS, **tiny_specs()} if key.endswith("@tiny") else FULL_SPECS
    if key not in specs:
        raise KeyError(f"unknown architecture {key!r}; known: {', '.join(FULL_SPECS)} (full) and sd15|sdxl|flux@tiny")
    return specs[key]


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _init_(name: str, p: torch.Tensor, std: float) -> None:
    if p.ndim >= 2:
        p.normal_(0.0, std)
    elif name.endswith("bias"):
        p.zero_()
    else:
        p.fill_(1.0)


def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0,
                std: float = 0.02) -> torch.nn.Module:
    """Allocate the ``meta`` tensors of ``model`` on ``device`` in ``dtype`` and fill them in place.

    This is ``Module.to_empty`` restricted to meta tensors (so already-built NF4 layers are kept)
    with shared parameters kept shared (T5's tied embeddings); real buffers are moved along.
    """
    made: dict[int, torch.nn.Parameter] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                if id(p) not in made:
                    fresh = torch.empty(p.shape, device=device, dtype=dtype if p.is_floating_point() else p.dtype)
                    _init_(name, fresh, std)
                    made[id(p)] = torch.nn.Parameter(fresh, requires_grad=False)
                module._parameters[name] = made[id(p)]
            for name, b in list(module._buffers.items()):
                if b is None:
                    continue
                target = dtype if b.is_floating_point() else b.dtype
                module._buffers[name] = (torch.zeros(b.shape, device=device, dtype=target) if b.device.type == "meta"
                                         else b.to(device, target))
    model.requires_grad_(False)
    return model


def materialize_nf4(model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype, seed: int = 0,
                    std: float = 0.02) -> torch.nn.Module:
    """Like :func:`materialize`, with every ``nn.Linear`` an NF4 double-quant ``Linear4bit`` (as trainer/quant.py).

    Each layer is quantized as soon as its random bf16 weight exists, so peak memory stays at the
    4-bit model plus one layer.
    """
    from trainer.quant import _bnb

    bnb = _bnb()
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                weight = torch.empty(child.out_features, child.in_features, device=gen_device,
                                     dtype=torch.float32 if device.type == "cpu" else torch.bfloat16).normal_(0.0, std)
                q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                             quant_type="nf4").to(device)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(torch.zeros(child.out_features, device=device, dtype=compute_dtype),
                                                requires_grad=False)
                setattr(parent, name, q)
    materialize(model, device, compute_dtype, seed, std)
    model.is_loaded_in_4bit = True  # peft wraps Linear4bit with its bnb LoRA layer when it sees this flag
    return model
