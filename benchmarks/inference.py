"""Inference side: sampling time per image with 0, 1 and 3 unfused LoRAs and with the mix fused,
a slider re-weight, and loading a LoRA file.

The real diffusers pipeline runs (``StableDiffusionPipeline`` / ``…XLPipeline`` / ``FluxPipeline``)
on the random-weight denoiser and VAE, fed precomputed prompt embeddings (the text encoders are
not part of the timed loop; with CFG the negative embeddings are passed too). Sampling includes
the VAE decode and the conversion to a PIL image, as the app renders it.

LoRA files are the PEFT layout the trainer writes as ``lora_diffusers.safetensors`` (random
A/B of the preset's rank on the ``style`` targets, ``lora_adapter_metadata`` included), loaded
with ``pipe.load_lora_weights(path, adapter_name=…)`` as named adapters; a slider move is
``pipe.set_adapters(names, weights)`` (no reload, DESIGN "Mixing math"); the bake is
``pipe.fuse_lora`` + ``unload_lora_weights`` (fused weights stay).
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path

import torch

from benchmarks.measure import timed
from benchmarks.parts import Parts, sampling_scheduler, synthetic_cache


def make_pipeline(parts: Parts):
    import diffusers

    spec, scheduler = parts.spec, sampling_scheduler(parts.spec)
    if spec.arch == "sd15":
        pipe = diffusers.StableDiffusionPipeline(vae=parts.vae, text_encoder=None, tokenizer=None, unet=parts.denoiser,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    elif spec.arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(vae=parts.vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                                   tokenizer_2=None, unet=parts.denoiser, scheduler=scheduler)
    else:
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=parts.vae, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=parts.denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_kwargs(parts: Parts) -> dict:
    """Precomputed embeddings for one prompt (and the negative one where the model uses CFG)."""
    _, cond = synthetic_cache(parts.spec, 1, parts.dtype, seed=1)
    _, neg = synthetic_cache(parts.spec, 1, parts.dtype, seed=2)
    dev = parts.device
    if parts.spec.arch == "flux":
        return {"prompt_embeds": cond["encoder_hidden_states"].to(dev),
                "pooled_prompt_embeds": cond["pooled_projections"].to(dev)}
    kwargs = {"prompt_embeds": cond["encoder_hidden_states"].to(dev),
              "negative_prompt_embeds": neg["encoder_hidden_states"].to(dev)}
    if parts.spec.arch == "sdxl":
        kwargs["pooled_prompt_embeds"] = cond["text_embeds"].to(dev)
        kwargs["negative_pooled_prompt_embeds"] = neg["text_embeds"].to(dev)
    return kwargs


def write_lora_files(parts: Parts, rank: int, folder: Path, count: int = 3) -> list[Path]:
    """``count`` random LoRAs in the trainer's PEFT export layout (``lora_diffusers.safetensors``)."""
    from trainer.export import LoraWeights, adapter_metadata, save_safetensors, to_diffusers
    from trainer.models import ARCH_HANDLERS
    from trainer.targets import resolve

    prefix = ARCH_HANDLERS[parts.spec.arch].peft_prefix
    denoiser = parts.denoiser
    names = resolve(parts.spec.arch, "style", [n for n, _ in denoiser.named_modules()])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        modules = {}
        for name in names:
            layer = denoiser.get_submodule(name)
            a = torch.randn((rank, layer.in_features), generator=g) / layer.in_features ** 0.5
            b = torch.randn((layer.out_features, rank), generator=g) * 0.02
            modules[name] = (a, b)
        weights = LoraWeights(modules, rank, 2.0 * rank)
        path = folder / f"lora{i}.safetensors"
        save_safetensors(path, to_diffusers(weights, prefix), {"lora_adapter_metadata": adapter_metadata(weights, prefix)})
        paths.append(path)
    return paths


def _median(values: list[float]) -> float:
    return statistics.median(values)


def run_inference(parts: Parts, rank: int, folder: Path, sample_steps: int, repeats: int = 3, reweights: int = 20) -> dict:
    """Times for one architecture × precision (see the module doc); seconds unless named ``_ms``."""
    from trainer.models import ARCH_HANDLERS

    device, spec = parts.device, parts.spec
    pipe = make_pipeline(parts)
    kwargs = dict(prompt_kwargs(parts), num_inference_steps=sample_steps, height=spec.resolution, width=spec.resolution,
                  guidance_scale=spec.guidance, output_type="pil")
    if spec.arch == "flux":
        kwargs["max_sequence_length"] = spec.text_len

    def sample() -> float:
        return timed(lambda: pipe(generator=torch.Generator("cpu").manual_seed(0), **kwargs), device)

    def sample_median() -> float:
        return _median([sample() for _ in range(repeats)])

    paths = write_lora_files(parts, rank, folder)
    result = {"sample_steps": sample_steps, "repeats": repeats, "lora_rank": rank}
    result["warmup_s"] = sample()
    result["base_s"] = sample_median()
    names = [f"lora{i}" for i in range(len(paths))]
    with warnings.catch_warnings():  # peft: "Already found a peft_config attribute": a second adapter is the point
        warnings.simplefilter("ignore", UserWarning)
        loads = [timed(lambda p=p, n=n: pipe.load_lora_weights(str(p), adapter_name=n), device)
                 for p, n in zip(paths, names)]
    result["load_first_s"], result["load_mean_s"] = loads[0], sum(loads) / len(loads)
    pipe.set_adapters(names[:1], [0.8])
    sample()  # a new adapter set is a new graph for any cache; one untimed pass
    result["lora1_s"] = sample_median()
    pipe.set_adapters(names, [0.5, 0.3, 0.2])
    sample()
    result["lora3_s"] = sample_median()
    moves = []
    for i in range(reweights):
        w = 0.1 + 0.8 * (i % 10) / 10
        moves.append(timed(lambda w=w: pipe.set_adapters(names, [w, 1.0 - w, 0.25]), device) * 1000.0)
    result["reweight_ms"], result["reweight_max_ms"] = _median(moves), max(moves)
    denoiser_attr = ARCH_HANDLERS[spec.arch].denoiser_attr
    result["fuse_s"] = timed(lambda: (pipe.fuse_lora(components=[denoiser_attr], adapter_names=names),
                                      pipe.unload_lora_weights()), device)
    sample()
    result["fused_s"] = sample_median()
    result["lora3_overhead_pct"] = 100.0 * (result["lora3_s"] / result["base_s"] - 1.0)
    result["fused_overhead_pct"] = 100.0 * (result["fused_s"] / result["base_s"] - 1.0)
    return result
