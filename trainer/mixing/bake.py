"""Bake a weighted mix into one shareable LoRA file.

Per layer the mix is ΔW = Σᵢ wᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ. It is written either

- exactly, by concatenating along the rank: A = [A₁; A₂; …], B = [w₁s₁B₁ | w₂s₂B₂ | …]
  (rank Σ rᵢ, alpha = rank so the file's scale is 1), or
- compressed to rank k by a truncated SVD of ΔW — computed from the factors (QR of B and Aᵀ,
  SVD of the small core), never by forming or averaging A and B separately — and reporting the
  relative Frobenius error ‖ΔW − ΔWₖ‖ / ‖ΔW‖ over all layers.

The layout is the one our exports share (trainer/export.py writers): kohya for SD1.5/SDXL,
the fused BFL/kohya layout for FLUX (PEFT ``transformer.`` keys when a layer has no place in
the fused layout). The metadata records every source file, its sha256 and its weight.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from trainer.errors import LoraFormatError, UserError
from trainer.export import (ExportInfo, LoraWeights, adapter_metadata, build_metadata, save_safetensors,
                            to_diffusers, to_flux_fused, to_kohya)
from trainer.mixing.index import ModelIndex
from trainer.mixing.layouts import LayerLora, LoraInfo
from trainer.mixing.resolve import resolve
from trainer.mixing.session import MixSession, layer_info, read_lora_once, sanitize
from trainer.steps import lora_label

TE_PREFIXES = {"sd15": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
               "flux": {"text_encoder": "lora_te1_"}}


@dataclass(frozen=True)
class BakeReport:
    path: str
    rank: int  # the file's rank (largest layer rank; Σ rᵢ for an exact bake)
    relative_error: float  # ‖ΔW − ΔW_file‖_F / ‖ΔW‖_F over all layers; 0 for an exact bake
    method: str = "concat"  # concat | svd
    layout: str = "kohya"  # kohya | flux-fused | peft
    layers: int = 0
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Source:
    info: LoraInfo
    layers: dict[str, LayerLora]
    weight: float


def _factors(parts: list[tuple[LayerLora, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank concatenation, weights and alpha/r folded into B (float64, flattened)."""
    down = torch.cat([layer.down.flatten(1).double() for layer, _ in parts], dim=0)
    up = torch.cat([(w * layer.scale) * layer.up.flatten(1).double() for layer, w in parts], dim=1)
    return down, up


def _truncate(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` factors of up @ down: (down_k, up_k, squared error, squared norm)."""
    qb, rb = torch.linalg.qr(up)  # up = Qb Rb
    qa, ra = torch.linalg.qr(down.T)  # down = Raᵀ Qaᵀ, so ΔW = Qb (Rb Raᵀ) Qaᵀ
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    return root[:, None] * (vh[:k] @ qa.T), (qb @ u[:, :k]) * root, float((s[k:] ** 2).sum()), float((s ** 2).sum())


def mix_layers(sources: list[_Source], rank: int | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Per layer (A, B) with scale 1 whose product is the weighted mix; plus the relative error."""
    by_layer: dict[str, list[tuple[LayerLora, float]]] = {}
    for source in sources:
        for key, layer in source.layers.items():
            by_layer.setdefault(key, []).append((layer, source.weight))
    out, err2, norm2 = {}, 0.0, 0.0
    for key, parts in sorted(by_layer.items()):
        down, up = _factors(parts)
        if rank is not None:
            down, up, e2, n2 = _truncate(down, up, rank)
            err2, norm2 = err2 + e2, norm2 + n2
        shape = parts[0][0].down.shape
        out[key] = (down.reshape(down.shape[0], *shape[1:]).float(),
                    up.reshape(*parts[0][0].up.shape[:1], up.shape[1], *parts[0][0].up.shape[2:]).float())
    return out, (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0


def _te_kohya_name(prefix: str, module: str) -> str:
    if not module.startswith("text_model.") and module != "text_projection":
        module = "text_model." + module  # what A1111/kohya call CLIP's layers
    return prefix + module.replace(".", "_")


def _pad(modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Zero rank components up to ``rank``: ΔW unchanged, one rank for the whole (fused) file."""
    out = {}
    for name, (a, b) in modules.items():
        extra = rank - a.shape[0]
        out[name] = (torch.cat([a, a.new_zeros(extra, *a.shape[1:])]),
                     torch.cat([b, b.new_zeros(b.shape[0], extra, *b.shape[2:])], dim=1))
    return out


def _kohya_text_encoders(by_component: dict[str, dict], arch: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for component, modules in by_component.items():
        for module, (a, b) in modules.items():
            name = _te_kohya_name(TE_PREFIXES[arch][component], module)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = torch.tensor(float(a.shape[0]))  # alpha = rank: scale 1
    return tensors


def _peft(by_component: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, config = {}, {}
    for component, modules in by_component.items():
        rank = max(a.shape[0] for a, _ in modules.values())
        weights = LoraWeights(_pad(modules, rank), rank, float(rank))
        tensors.update(to_diffusers(weights, component))
        config.update(json.loads(adapter_metadata(weights, component)))
    return tensors, {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


def write_layers(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], index: ModelIndex) -> tuple[dict, str, dict]:
    """Tensors in our shareable layout: (tensors, layout name, extra metadata). Every layer's scale is 1."""
    by_component: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, ab in layers.items():
        component, module = key.split(".", 1)
        by_component.setdefault(component, {})[module] = ab
    denoiser = by_component.pop(index.denoiser, {})
    if index.arch != "flux":
        tensors = _kohya_text_encoders(by_component, index.arch)
        for module, (a, b) in denoiser.items():  # alpha = the layer's own rank: per-layer ranks stay as they are
            tensors.update(to_kohya(LoraWeights({module: (a, b)}, a.shape[0], float(a.shape[0]))))
        return tensors, "kohya", {}
    rank = max((a.shape[0] for a, _ in denoiser.values()), default=1)
    try:  # fused groups pack several layers into one LoRA: one rank for all of them
        tensors = to_flux_fused(LoraWeights(_pad(denoiser, rank), rank, float(rank)), *index.flux_dims())
    except LoraFormatError:  # a layer with no place in the fused layout: diffusers and ComfyUI take PEFT keys
        tensors, extra = _peft({index.denoiser: denoiser, **by_component})
        return tensors, "peft", extra
    tensors.update(_kohya_text_encoders(by_component, "flux"))
    return tensors, "flux-fused", {}


def _sources_from_session(session: MixSession, weights: Mapping[str, float]) -> list[_Source]:
    for name in weights:
        session.info(name)  # unknown names are an error
    return [_Source(info, session.layers(info.name), float(weights.get(info.name, 0.0))) for info in session.loras]


def _sources_from_files(paths: Sequence[str | Path], weights, index: ModelIndex) -> list[_Source]:
    if isinstance(weights, Mapping):
        def weight_of(path: Path, name: str) -> float:
            for key in (str(path), path.name, path.stem, name):
                if key in weights:
                    return float(weights[key])
            return 0.0
    else:
        weights = list(weights)
        if len(weights) != len(paths):
            raise UserError(f"{len(paths)} LoRA files but {len(weights)} weights; give one weight per file")
    sources, names = [], set()
    for i, raw in enumerate(paths):
        path = Path(raw)
        tensors, metadata, sha256 = read_lora_once(path)
        layers, sc, detected, ignored = resolve(tensors, metadata, index, path.name)
        name = sanitize(lora_label(path))  # as MixSession names it: a run's own file by its run
        name = next(f"{name}_{n}" for n in range(2, len(names) + 3) if f"{name}_{n}" not in names) if name in names else name
        names.add(name)
        info = layer_info(name, path, layers, sc.format, detected, metadata, sha256, ignored)
        w = weight_of(path, name) if isinstance(weights, Mapping) else float(weights[i])
        sources.append(_Source(info, layers, w))
    return sources


def bake(session_or_sources, weights, out_path: str | Path, rank: int | None = None, *, base: str | None = None,
         title: str | None = None) -> BakeReport:
    """Write the weighted mix as one LoRA file.

    Args:
        session_or_sources: a :class:`MixSession` (weights by adapter name), or LoRA file paths
            together with ``base`` (only the base's configs are read, no weights).
        weights: ``{name: w}`` (missing = 0; None = the session's current weights); for file paths also
            keyed by path/file name, or one weight per file.
        out_path: the ``.safetensors`` to write (atomically).
        rank: None for the exact bake (rank Σ rᵢ); an int to compress by truncated SVD.
        title: ``modelspec.title`` of the result (default: the mix, e.g. ``ink×0.7 + paper×0.3``).

    Raises:
        UserError: no LoRA with a non-zero weight, a bad rank or output name, unknown names.
        LoraFormatError: a source file that does not fit the base.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".safetensors":
        raise UserError(f"bake output {out_path.name}: must end in .safetensors")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise UserError(f"bake rank must be a positive integer, got {rank!r}")
    if isinstance(session_or_sources, MixSession):
        session = session_or_sources
        index, base_name, arch = session.index, session.base, session.arch
        sources = _sources_from_session(session, session.weights if weights is None else weights)
        resolution = session.native_size
    else:
        if base is None:
            raise UserError("baking LoRA files without a session needs base=... (the model they were made for)")
        index = ModelIndex.from_base(base)
        base_name, arch = base, index.arch
        sources = _sources_from_files(list(session_or_sources), weights, index)
        resolution = 64 if base.startswith("demo") else {"sd15": 512}.get(arch, 1024)
    active = [s for s in sources if s.weight != 0.0]
    if not active:
        raise UserError("nothing to bake: every LoRA has weight 0")
    layers, error = mix_layers(active, rank)
    tensors, layout, extra = write_layers(layers, index)
    from trainer.models import ARCH_HANDLERS

    handler = ARCH_HANDLERS[arch]
    mix_text = " + ".join(f"{s.info.title}×{s.weight:g}" for s in active)
    triggers = list(dict.fromkeys(s.info.trigger for s in active if s.info.trigger))
    file_rank = max(a.shape[0] for a, _ in layers.values())
    info = ExportInfo(arch=arch, modelspec_architecture=handler.modelspec_architecture,
                      base_model_version=handler.base_model_version, base=base_name, resolution=resolution,
                      output_name=out_path.stem, title=title or mix_text, trigger=", ".join(triggers),
                      description=f"baked mix: {mix_text}", targets="mix")
    metadata = build_metadata(info, LoraWeights(layers, file_rank, float(file_rank)))
    metadata.update(extra)
    metadata["studio.mix.method"] = "svd" if rank is not None else "concat"
    metadata["studio.mix.relative_error"] = f"{error:.6g}"
    metadata["studio.mix.sources"] = json.dumps([
        {"name": s.info.name, "file": Path(s.info.path).name, "sha256": s.info.sha256, "weight": s.weight,
         "format": s.info.format, "rank": s.info.rank, "alpha": s.info.alpha, "title": s.info.title}
        for s in active], ensure_ascii=False)
    save_safetensors(out_path, tensors, metadata)
    return BakeReport(path=str(out_path), rank=file_rank, relative_error=error,
                      method=metadata["studio.mix.method"], layout=layout, layers=len(layers),
                      sources=tuple(s.info.name for s in active))
