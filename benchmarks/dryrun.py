"""``--list``: build every full-size architecture on the ``meta`` device and report, without allocating,
parameter counts, adapted modules and LoRA sizes, analytic FLOPs per training step and weight memory.

The FLOPs come from running the trainer's own loss (``handler.loss``, the call ours times) on meta
tensors with :func:`benchmarks.flops.counting`; the reference step's extra work (VAE encode +
text encoders, every step) is counted the same way and reported apart.
"""

from __future__ import annotations

import torch

from benchmarks.archs import ArchSpec, param_count
from benchmarks.flops import counting, flux_closed_form
from benchmarks.parts import synthetic_cache, synthetic_images, synthetic_token_ids

META = torch.device("meta")


def _meta_base(spec: ArchSpec, denoiser: torch.nn.Module):
    from types import SimpleNamespace

    from trainer.bases import BaseRef
    from trainer.config import Precision
    from trainer.models import ARCH_HANDLERS, LoadedBase

    from benchmarks.parts import sampling_scheduler

    attr = ARCH_HANDLERS[spec.arch].denoiser_attr
    pipe = SimpleNamespace(**{attr: denoiser}, scheduler=sampling_scheduler(spec), vae_scale_factor=spec.vae_scale_factor)
    return LoadedBase(ref=BaseRef(kind="demo-random", value=spec.key, arch=spec.arch), arch=spec.arch, pipe=pipe,
                      precision=Precision.FP32, device=META)


def step_flops(spec: ArchSpec, rank: int = 16, batch: int = 1) -> dict:
    """Analytic FLOPs of one training step of ours (LoRA ``rank`` on the style targets), on meta."""
    from trainer.config import TrainConfig
    from trainer.loop import inject_lora

    denoiser = spec.denoiser.instantiate(meta_buffers=True)
    total = param_count(denoiser)
    base = _meta_base(spec, denoiser)
    names = inject_lora(base, TrainConfig(rank=rank, alpha=2.0 * rank, targets="style"))
    lora = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    latents, cond = synthetic_cache(spec, batch, torch.float32)
    latents, cond = latents.to(META), {k: v.to(META) for k, v in cond.items()}
    handler = base.handler
    denoiser.train()
    with counting(denoiser) as count, torch.enable_grad():
        handler.loss(base.pipe, denoiser, handler.training_scheduler(base.pipe), latents, cond, torch.Generator())
    return {"params": total, "lora_params": lora, "adapted_modules": len(names), "forward": count.forward,
            "backward": count.backward, "train": count.train, "by_kind": count.by_kind}


@torch.no_grad()
def encode_flops(spec: ArchSpec, batch: int = 1) -> float:
    """Forward FLOPs of the reference step's per-step encoding (VAE encoder + every text encoder)."""
    flops = 0.0
    vae = spec.vae.instantiate(meta_buffers=True)
    with counting(vae) as count:
        vae.encode(synthetic_images(spec, batch).to(META))
    flops += count.forward
    for comp, ids in zip(spec.text_encoders, synthetic_token_ids(spec, batch)):
        te = comp.instantiate(meta_buffers=True)
        with counting(te) as count:
            te(ids.to(META), output_hidden_states=True)
        flops += count.forward
    return flops


def weight_bytes(model: torch.nn.Module, precision: str) -> float:
    """Bytes of the frozen weights: 2 (bf16/fp16), 4 (fp32), or NF4 linears at 0.5 B + double-quant stats."""
    if precision != "nf4":
        return param_count(model) * (4 if precision == "fp32" else 2)
    linear = sum(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear)
    # 4-bit codes + one 8-bit absmax per 64 weights + an fp32 second-level scale per 256 absmax
    return linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (param_count(model) - linear) * 2


def describe(spec: ArchSpec, ranks=(16, 32), with_encoders: bool = True) -> dict:
    """Everything ``--list`` prints for one spec (nothing allocated)."""
    denoiser = spec.denoiser.instantiate(meta_buffers=True)
    info = {"arch": spec.key, "resolution": spec.resolution, "latents": list(spec.latent_shape),
            "denoiser": spec.denoiser.cls, "denoiser_params": param_count(denoiser),
            "weights_gib": {p: weight_bytes(denoiser, p) / 1024 ** 3 for p in ("bf16", "fp32", "nf4")},
            "ranks": {}}
    for rank in ranks:
        info["ranks"][rank] = step_flops(spec, rank)
    if spec.arch == "flux":
        info["flux_closed_form_train"] = flux_closed_form(spec.resolution, spec.text_len)["train"]
    if with_encoders:
        info["encoders"] = {c.cls: param_count(c.instantiate(meta_buffers=True)) for c in (spec.vae, *spec.text_encoders)}
        info["reference_encode_flops"] = encode_flops(spec)
    return info


def format_listing(info: dict) -> str:
    gib = info["weights_gib"]
    lines = [f"{info['arch']}: {info['denoiser']} {info['denoiser_params'] / 1e9:.3f} B params, "
             f"latents {info['latents']}, weights bf16 {gib['bf16']:.2f} GiB / nf4 {gib['nf4']:.2f} GiB"]
    for rank, f in info["ranks"].items():
        lines.append(f"  style r{rank}: {f['adapted_modules']} modules, {f['lora_params'] / 1e6:.2f} M LoRA params, "
                     f"train {f['train'] / 1e12:.2f} TFLOP/step (fwd {f['forward'] / 1e12:.2f}, "
                     f"attention fwd {f['by_kind'].get('attention', 0) / 1e12:.2f})")
    if "flux_closed_form_train" in info:
        lines.append(f"  FLUX closed form: train {info['flux_closed_form_train'] / 1e12:.2f} TFLOP/step")
    if "encoders" in info:
        enc = ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in info["encoders"].items())
        lines.append(f"  encoders: {enc}; reference's per-step encode {info['reference_encode_flops'] / 1e12:.2f} TFLOP")
    return "\n".join(lines)
