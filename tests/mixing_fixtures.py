"""LoRA files for the mixing tests, written from random tensors shaped to a tiny base's layers.

Faster than training and just as good for the mixing math: each helper writes one
:class:`~trainer.export.LoraWeights` in a chosen layout, so every layout of the same
weights must give the same ΔW and the same image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.export import LoraWeights, kohya_name, save_safetensors, to_flux_fused, to_kohya
from trainer.targets import resolve

PROMPT, SEED, STEPS, GUIDANCE = "a red circle on a blue square", 3, 2, 4.0
# kohya text-encoder LoRAs always carry out_proj too (diffusers' own kohya reader needs it to tell the layout)
TE_MODULES = {"sd15": {"text_encoder": ("encoder.layers.0.self_attn.k_proj", "encoder.layers.0.self_attn.out_proj")},
              "sdxl": {"text_encoder": ("encoder.layers.0.self_attn.k_proj", "encoder.layers.0.self_attn.out_proj"),
                       "text_encoder_2": ("text_model.encoder.layers.1.self_attn.v_proj",
                                          "text_model.encoder.layers.1.self_attn.out_proj")},
              "flux": {"text_encoder": ("encoder.layers.0.self_attn.k_proj", "encoder.layers.0.self_attn.out_proj")}}
KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # SD1.5: lora_te_


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's
    spinning threads make a 64 px render ~30x slower (0.2 s -> 5 s) when other jobs run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def style_weights(session, rank: int, alpha: float, seed: int, magnitude: float = 0.3) -> LoraWeights:
    """Random LoRA on the base's style targets (cross-attention k/v), B non-zero so it acts."""
    denoiser = session.loaded.denoiser
    names = resolve(session.arch, "style", [n for n, _ in denoiser.named_modules()])
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name in names:
        layer = denoiser.get_submodule(name)
        modules[name] = (torch.randn(rank, layer.in_features, generator=gen) * magnitude,
                         torch.randn(layer.out_features, rank, generator=gen) * magnitude)
    return LoraWeights(modules, rank, float(alpha))


def te_weights(session, rank: int, alpha: float, seed: int) -> dict[str, LoraWeights]:
    """A small text-encoder LoRA per text encoder of the base (SD archs)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component, modules in TE_MODULES[session.arch].items():
        layers = {m: getattr(session.pipe, component).get_submodule(m) for m in modules}
        out[component] = LoraWeights({m: (torch.randn(rank, layer.in_features, generator=gen) * 0.3,
                                          torch.randn(layer.out_features, rank, generator=gen) * 0.3)
                                      for m, layer in layers.items()}, rank, alpha)
    return out


def sgm_name(module: str) -> str:
    """diffusers UNet module -> SGM (sd-scripts SDXL) name, from DESIGN.md's block table (layers_per_block 2)."""
    module = re.sub(r"^down_blocks\.(\d+)\.attentions\.(\d+)", lambda m: f"input_blocks.{1 + 3 * int(m[1]) + int(m[2])}.1", module)
    module = re.sub(r"^mid_block\.attentions\.0", "middle_block.1", module)
    return re.sub(r"^up_blocks\.(\d+)\.attentions\.(\d+)", lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1", module)


def layout_tensors(weights: LoraWeights, layout: str, arch: str, flux_dims=None,
                   te: dict[str, LoraWeights] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``weights`` written in ``layout``.

    kohya / comfy (SD: kohya keys with .alpha, what ComfyUI loads) / sgm (SDXL sd-scripts names) /
    peft (with lora_adapter_metadata) / comfy-dm, comfy-sgm (``diffusion_model.`` + diffusers or SGM names) /
    fused (FLUX BFL layout).
    """
    te = te or {}
    prefix = "transformer" if arch == "flux" else "unet"
    meta: dict[str, str] = {}
    if layout in ("kohya", "comfy"):
        tensors = to_kohya(weights)
    elif layout == "sgm":
        tensors = {k.replace(kohya_name(m), kohya_name(sgm_name(m))): v for m in weights.modules
                   for k, v in to_kohya(LoraWeights({m: weights.modules[m]}, weights.rank, weights.alpha)).items()}
    elif layout == "fused":
        tensors = to_flux_fused(weights, *flux_dims)
    elif layout == "comfy-bfl":  # ComfyUI's FLUX saves: diffusion_model.double_blocks.0.img_attn.qkv
        tensors = {}
        for key, value in to_flux_fused(weights, *flux_dims).items():
            stem, suffix = key.split(".", 1)
            kind, index, tail = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(\w+)", stem).groups()
            tail = re.sub(r"_(qkv|proj)$", r".\1", tail)
            tensors[f"diffusion_model.{kind}_blocks.{index}.{tail}.{suffix}"] = value
    elif layout == "diffusers-old":  # 2023 attention-processor keys, still found on the hub
        tensors = {}
        for module, (a, b) in weights.modules.items():
            block, proj = module.rsplit(".", 1)
            tensors[f"{prefix}.{block}.processor.{proj}_lora.down.weight"] = a * (weights.alpha / weights.rank)
            tensors[f"{prefix}.{block}.processor.{proj}_lora.up.weight"] = b  # no alpha in this layout: folded
        return tensors, meta
    elif layout == "peft":  # as diffusers' save_lora_weights writes it: alpha only in lora_adapter_metadata
        tensors, config = {}, {}
        for component, w in {prefix: weights, **te}.items():
            for module, (a, b) in w.modules.items():
                tensors[f"{component}.{module}.lora_A.weight"] = a
                tensors[f"{component}.{module}.lora_B.weight"] = b
            config.update({f"{component}.r": w.rank, f"{component}.lora_alpha": w.alpha,
                           f"{component}.target_modules": sorted(w.modules)})
        meta["lora_adapter_metadata"] = json.dumps(config)
        return tensors, meta
    elif layout in ("comfy-dm", "comfy-sgm"):  # ComfyUI's own saves: diffusion_model.<module>
        tensors = {}
        for module, (a, b) in weights.modules.items():
            name = "diffusion_model." + (sgm_name(module) if layout == "comfy-sgm" else module)
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = b, a
            tensors[f"{name}.alpha"] = torch.tensor(weights.alpha)
        return tensors, meta
    else:
        raise ValueError(layout)
    for component, w in te.items():  # kohya text-encoder keys
        for module, (a, b) in w.modules.items():
            te_prefix = "lora_te_" if arch == "sd15" else KOHYA_TE[component]
            name = te_prefix + ("" if module.startswith("text_model.") else "text_model_") + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = torch.tensor(w.alpha)
    return tensors, meta


def write_lora(path: Path, weights: LoraWeights, layout: str, arch: str, flux_dims=None, te=None,
               metadata: dict[str, str] | None = None) -> Path:
    tensors, meta = layout_tensors(weights, layout, arch, flux_dims, te)
    return save_safetensors(path, tensors, {**meta, **(metadata or {})})


def kohya_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / rank) · up @ down for every module of a kohya-layout file (alpha defaults to rank)."""
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[f"{name}.lora_up.weight"].float()
            alpha = float(tensors.get(f"{name}.alpha", torch.tensor(down.shape[0])))
            deltas[name] = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
    return deltas


def peft_deltas(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """ΔW = (α/r)·B·A per module of trained weights, keyed by module."""
    scale = weights.alpha / weights.rank
    return {m: scale * (b @ a) for m, (a, b) in weights.modules.items()}


def expected_deltas(weights: LoraWeights, component: str) -> dict[str, torch.Tensor]:
    """ΔW = (α/r)·B·A per module, keyed ``<component>.<module>`` (computed here, not by the code under test)."""
    scale = weights.alpha / weights.rank
    return {f"{component}.{m}": scale * (b.double() @ a.double()) for m, (a, b) in weights.modules.items()}


def pipeline_deltas(session, adapter: str) -> dict[str, torch.Tensor]:
    """The ΔW peft applies for ``adapter`` at its current weight, per ``<component>.<module>``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for component in session.index.shapes:
        for name, module in getattr(session.pipe, component).named_modules():
            if isinstance(module, BaseTunerLayer) and adapter in module.lora_A:
                out[f"{component}.{name}"] = module.get_delta_weight(adapter).double()
    return out


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)
