"""Write trained LoRAs in the layouts the ecosystem loads, with provenance metadata.

Two files per run (see DESIGN.md's loader table for why these layouts):
- ``lora.safetensors`` — the file an artist shares. SD1.5/SDXL: kohya keys
  (``lora_unet_<module path with _>.lora_down/lora_up/alpha``), taken by diffusers,
  ComfyUI, A1111/Forge and kohya. FLUX: the fused BFL/kohya layout
  (``lora_unet_double_blocks_N_img_attn_qkv`` ...) with zero rows for untrained
  projections, the only FLUX layout all three take. Exact: ΔW is unchanged.
- ``lora_diffusers.safetensors`` — PEFT keys (``unet.<module>.lora_A.weight``)
  plus ``lora_adapter_metadata`` so diffusers applies alpha/r (without it, it
  silently loads at scale 1).

All writes are atomic. Only ``.safetensors`` is ever read: pickles can run code.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trainer.atomic import atomic_path
from trainer.errors import LoraFormatError
from trainer.steps import EXPORT_INFO, FILE_NAMES, LR_HISTORY  # noqa: F401 (LR_HISTORY: the loop and reexport use it from here)

TOOL_NAME = "style-adapter-studio"
TOOL_VERSION = "0.1.0"
EDITABLE_METADATA = ("modelspec.title", "modelspec.trigger_phrase", "modelspec.license", "modelspec.description")

# FLUX fused layout: diffusers module (per block) -> (fused name, component index)
_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1), "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0), "attn.to_add_out": ("txt_attn_proj", 0),
}
_FLUX_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2)}


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA as plain tensors: module name -> (A: r×in, B: out×r), scale = alpha / rank."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    alpha: float


def from_peft_state_dict(state_dict: dict[str, torch.Tensor], rank: int, alpha: float) -> LoraWeights:
    """Group ``<module>.lora_A.weight`` / ``lora_B.weight`` pairs (peft's state dict, no adapter name)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", key)
        if not match:
            raise LoraFormatError(f"unexpected key {key!r} in a PEFT LoRA state dict")
        modules.setdefault(match.group(1), {})[match.group(2)] = value.detach().float().cpu().contiguous()
    return LoraWeights({m: (ab["A"], ab["B"]) for m, ab in sorted(modules.items())}, rank, float(alpha))


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def to_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """SD1.5/SDXL kohya layout with diffusers module names (loads in diffusers, ComfyUI and kohya)."""
    out = {}
    for module, (a, b) in weights.modules.items():
        name = kohya_name(module)
        out[f"{name}.lora_down.weight"] = a
        out[f"{name}.lora_up.weight"] = b
        out[f"{name}.alpha"] = torch.tensor(float(weights.alpha))
    return out


def _flux_group(module: str) -> tuple[str, int]:
    match = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
    table = _FLUX_SINGLE if match and match.group(1) == "single_transformer_blocks" else _FLUX_DOUBLE
    if not match or match.group(3) not in table:
        raise LoraFormatError(f"FLUX module {module!r} has no place in the fused (BFL/kohya) layout")
    fused, index = table[match.group(3)]
    kind = "single_blocks" if match.group(1) == "single_transformer_blocks" else "double_blocks"
    return f"lora_unet_{kind}_{match.group(2)}_{fused}", index


def to_flux_fused(weights: LoraWeights, inner_dim: int, mlp_dim: int) -> dict[str, torch.Tensor]:
    """FLUX fused layout: q/k/v adapters packed into one ``qkv``/``linear1`` LoRA, untrained rows zero.

    For n packed projections of rank r: down = [A_1; …; A_n] (n·r × in), up is block
    diagonal in the projections' rows (other rows zero), alpha' = n·alpha so that
    alpha'/rank' = alpha/r and every ΔW is reproduced exactly.
    """
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, ab in weights.modules.items():
        name, index = _flux_group(module)
        groups.setdefault(name, {})[index] = ab
    out = {}
    for name, parts in sorted(groups.items()):
        if name.endswith("_proj"):
            (a, b), = parts.values()
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
            out[f"{name}.alpha"] = torch.tensor(float(weights.alpha))
            continue
        row_sizes = [inner_dim] * 3 + ([mlp_dim] if name.endswith("linear1") else [])
        offsets = [sum(row_sizes[:i]) for i in range(len(row_sizes))]
        order = sorted(parts)
        down = torch.cat([parts[i][0] for i in order], dim=0)
        up = torch.zeros(sum(row_sizes), down.shape[0])
        col = 0
        for i in order:
            a, b = parts[i]
            up[offsets[i]:offsets[i] + b.shape[0], col:col + a.shape[0]] = b
            col += a.shape[0]
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down.contiguous(), up
        out[f"{name}.alpha"] = torch.tensor(float(weights.alpha) * len(order))
    return out


def to_diffusers(weights: LoraWeights, prefix: str) -> dict[str, torch.Tensor]:
    """PEFT keys (``<prefix>.<module>.lora_A/B.weight``) with alpha/rank folded into ``lora_B``: ComfyUI (and
    diffusers before ``lora_adapter_metadata``) read no alpha from such a file and apply B·A as it is, so an
    unfolded alpha = 2r file loaded there at half strength. With :func:`adapter_metadata`'s lora_alpha = r,
    diffusers applies the same ΔW."""
    scale = weights.alpha / weights.rank
    out = {}
    for module, (a, b) in weights.modules.items():
        out[f"{prefix}.{module}.lora_A.weight"] = a
        out[f"{prefix}.{module}.lora_B.weight"] = (b * scale).to(b.dtype) if scale != 1 else b
    return out


def adapter_metadata(weights: LoraWeights, prefix: str) -> str:
    """diffusers' ``lora_adapter_metadata``: the minimal LoraConfig fields, prefixed by component; lora_alpha is
    the rank, as :func:`to_diffusers` folds the scale into the weights."""
    config = {"r": weights.rank, "lora_alpha": weights.rank, "target_modules": sorted(weights.modules)}
    return json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)


def diffusers_metadata(metadata: dict[str, str], weights: LoraWeights, prefix: str) -> dict[str, str]:
    """The PEFT file's header: its LoraConfig, and ``ss_network_alpha`` = the rank, since :func:`to_diffusers`
    folded alpha/rank into its weights (a tool that scales by the ss_* keys would apply it twice);
    ``studio.alpha`` keeps the alpha the run trained with."""
    return {**metadata, "lora_adapter_metadata": adapter_metadata(weights, prefix), "ss_network_alpha": f"{weights.rank}"}


@dataclass(frozen=True)
class ExportInfo:
    """What the metadata records about a run (all strings in the file header)."""

    arch: str
    modelspec_architecture: str
    base_model_version: str
    base: str
    base_sha256: str = ""
    steps: int = 0
    resolution: int = 512
    output_name: str = "lora"
    title: str = ""
    trigger: str = ""
    license: str = ""
    description: str = ""
    targets: str = "style"
    started_at: float = 0.0
    image_count: int = 0
    data_sha256: str = ""
    tag_frequency: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # kohya's ss_* record of the settings: see training_record




def save_export_info(run_dir: str | Path, info: ExportInfo) -> Path:
    """Keep what a run's exports record (data hash, tags, base fingerprint …) next to its checkpoints, so that
    ``python -m trainer export --step N`` writes full metadata before the run has files of its own."""
    from trainer.atomic import write_text

    path = Path(run_dir) / EXPORT_INFO
    write_text(path, json.dumps(dataclasses.asdict(info), ensure_ascii=False, indent=1))
    return path


def load_export_info(run_dir: str | Path) -> ExportInfo | None:
    """The run's saved :class:`ExportInfo`; None when there is none or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / EXPORT_INFO).read_text(encoding="utf-8"))
        return ExportInfo(**{f.name: data[f.name] for f in dataclasses.fields(ExportInfo) if f.name in data})
    except (OSError, ValueError, TypeError):
        return None


# how kohya's scripts name the optimizer classes (``ss_optimizer``)
_OPTIMIZER_CLASSES = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                      "paged_adamw8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit"}


def learning_rates(history: str, trained_at: float, now: float, step: int) -> str:
    """``history`` (of earlier resumes) extended by a resume at ``step`` from peak ``trained_at`` to ``now``:
    "0.003 for steps 1-20, 0.0015 from step 21"; unchanged while the rate stays."""
    if trained_at == now:
        return history
    return f"{history or f'{trained_at:g} for steps 1-{step}'}, {now:g} from step {step + 1}"


def rates_until(history: str, step: int) -> str:
    """The part of a :func:`learning_rates` history that a LoRA of ``step`` trained with; "" when that was one
    rate (its ``ss_learning_rate`` says it)."""
    parts = history.split(", ") if history else []
    kept = parts[:1] + [p for p in parts[1:] if int(re.search(r"from step (\d+)$", p).group(1)) <= step]
    return ", ".join(kept) if len(kept) > 1 else ""


def training_record(config, processes: int | None = None) -> dict[str, str]:
    """How a run trained, under the ``ss_*`` keys kohya's scripts write (a ``TrainConfig``; all strings).

    The A1111/Forge metadata viewer and model sites show these, so an artist sharing a LoRA shares its
    recipe; a mix baked from several LoRAs has no one recipe and leaves them out. ``processes``: how many
    trained together (the total batch), when known.
    """
    record = {
        "ss_learning_rate": f"{config.lr:g}",
        "ss_unet_lr": f"{config.lr:g}",
        "ss_text_encoder_lr": "0",  # the text encoders stay frozen
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_max_train_steps": str(config.steps),
        "ss_optimizer": f"{_OPTIMIZER_CLASSES.get(config.optimizer, config.optimizer)}"
                        f"(weight_decay={config.weight_decay:g})",
        "ss_max_grad_norm": f"{config.max_grad_norm:g}",
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_gradient_accumulation_steps": str(config.grad_accum),
        "ss_caption_dropout_rate": f"{config.caption_dropout:g}",
        "ss_flip_aug": str(config.flip),
        "ss_noise_offset": f"{config.noise_offset:g}",
        "ss_min_snr_gamma": f"{config.snr_gamma:g}",
        "ss_seed": str(config.seed),
    }
    if config.timestep_sampling == "logit_normal":  # kohya's FLUX scripts call sigmoid(N(0, scale²)) "sigmoid"
        record.update(ss_timestep_sampling="sigmoid", ss_sigmoid_scale="1.0")
    if processes is not None:
        record["ss_total_batch_size"] = str(config.batch_size * config.grad_accum * processes)
    return record


def build_metadata(info: ExportInfo, weights: LoraWeights) -> dict[str, str]:
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "ss_network_module": "networks.lora_flux" if info.arch == "flux" else "networks.lora",  # as sd-scripts names them
        "ss_network_dim": str(weights.rank),
        "ss_network_alpha": f"{weights.alpha:g}",
        "ss_base_model_version": info.base_model_version,
        "ss_training_started_at": f"{info.started_at:.0f}",
        "ss_steps": str(info.steps),
        "ss_resolution": f"({info.resolution}, {info.resolution})",
        "ss_num_train_images": str(info.image_count),
        "ss_tag_frequency": json.dumps(info.tag_frequency, ensure_ascii=False),
        "ss_output_name": info.output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": info.modelspec_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": info.title or info.output_name,
        "modelspec.date": now,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.trigger_phrase": info.trigger,
        "modelspec.license": info.license,
        "modelspec.description": info.description,
        "studio.base_model": info.base,
        "studio.base_model_sha256": info.base_sha256,
        "studio.arch": info.arch,
        "studio.rank": str(weights.rank),
        "studio.alpha": f"{weights.alpha:g}",
        "studio.targets": info.targets,
        "studio.target_modules": json.dumps(sorted(weights.modules)),
        "studio.data_sha256": info.data_sha256,
        "studio.image_count": str(info.image_count),
        "studio.tool": f"{TOOL_NAME} {TOOL_VERSION}",
        **info.training,
    }


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Atomically write ``tensors`` with string ``metadata`` (temp file + rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt", **metadata})
    return path


def export_lora(out_dir: str | Path, weights: LoraWeights, info: ExportInfo, peft_prefix: str,
                flux_dims: tuple[int, int] | None = None) -> tuple[Path, Path]:
    """Write ``lora.safetensors`` (shareable) and ``lora_diffusers.safetensors`` into ``out_dir``."""
    out_dir = Path(out_dir)
    metadata = build_metadata(info, weights)
    shared = to_flux_fused(weights, *flux_dims) if info.arch == "flux" else to_kohya(weights)
    kohya_path = save_safetensors(out_dir / FILE_NAMES["kohya"], shared, metadata)
    diffusers_meta = diffusers_metadata(metadata, weights, peft_prefix)
    diffusers_path = save_safetensors(out_dir / FILE_NAMES["diffusers"], to_diffusers(weights, peft_prefix), diffusers_meta)
    return kohya_path, diffusers_path


def _check_safetensors(path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path.name}: only .safetensors LoRA files are accepted (pickled .pt/.ckpt/.bin files can run code)")
    if not path.is_file():
        raise LoraFormatError(f"LoRA file {path} does not exist")


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and header metadata of a ``.safetensors`` LoRA.

    Raises:
        LoraFormatError: not a .safetensors file, missing, or unreadable.
    """
    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise LoraFormatError(f"{path.name} is not a readable .safetensors file ({err})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise LoraFormatError(f"{path.name} is not a readable .safetensors file ({err})") from None


def rewrite_metadata(src: str | Path, dst: str | Path, updates: dict[str, str]) -> Path:
    """Copy a LoRA with edited metadata (title, trigger phrase, license, description); tensors untouched."""
    unknown = [k for k in updates if k not in EDITABLE_METADATA]
    if unknown:
        raise LoraFormatError(f"metadata keys {unknown} cannot be edited (editable: {', '.join(EDITABLE_METADATA)})")
    tensors, metadata = read_lora(src)
    metadata.update({k: str(v) for k, v in updates.items()})
    metadata.pop("format", None)
    return save_safetensors(dst, tensors, metadata)


def _split_fused(file_name: str, stem: str, down: torch.Tensor, up: torch.Tensor, parts: list[tuple[int, str]],
                 made_with: str = "", dims: tuple[int, int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Undo :func:`to_flux_fused` for one group: the file's own row blocks say which projections it adapts.

    ``parts``: (index in the group, module) of the projections this run adapts. They must be the file's: a
    style file (k, v) read for the attention targets (q, k, v) would otherwise be cut into wrong pieces.
    ``dims``: the model's (attention width, MLP width) (:func:`trainer.loop.flux_dims`); without them, FLUX.1's
    MLP ratio of 4.
    """
    if stem.endswith("_proj"):
        (_, module), = parts
        return {module: (down, up)}
    rows = up.shape[0]
    single = stem.endswith("linear1")  # q, k, v, then the MLP rows
    inner = dims[0] if dims else (rows // 7 if single else rows // 3)
    if dims and rows != 3 * inner + (dims[1] if single else 0):
        raise LoraFormatError(f"{file_name}: {stem} has {rows} rows, which do not fit this model (attention width "
                              f"{dims[0]}, MLP width {dims[1]}): it was made for another model")
    sizes = [inner] * 3 + ([rows - 3 * inner] if stem.endswith("linear1") else [])
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    in_file = [i for i in range(len(sizes)) if up[offsets[i]:offsets[i] + sizes[i]].abs().sum() > 0]
    wanted = [index for index, _ in parts]
    if in_file and in_file != wanted:
        names = ("q", "k", "v", "mlp")
        fix = f"--targets {made_with}" if made_with else "the targets the file was made with"
        raise LoraFormatError(f"{file_name}: {stem} adapts {'/'.join(names[i] for i in in_file)}, but this run's "
                              f"targets adapt {'/'.join(names[i] for i in wanted)}; train with {fix}")
    if down.shape[0] % len(parts):
        raise LoraFormatError(f"{file_name}: {stem} has rank {down.shape[0]}, not a multiple of its {len(parts)} parts")
    r = down.shape[0] // len(parts)
    return {module: (down[j * r:(j + 1) * r], up[offsets[index]:offsets[index] + sizes[index], j * r:(j + 1) * r])
            for j, (index, module) in enumerate(parts)}


def weights_from_file(path: str | Path, module_names: list[str], dims: tuple[int, int] | None = None) -> LoraWeights:
    """Read one of our own exports (PEFT/diffusers, kohya or FLUX fused) back as :class:`LoraWeights`.

    ``module_names`` are the adapted modules of the model it should fit; used to
    undo the kohya ``.``→``_`` mangling and to split fused FLUX groups (``dims``: a FLUX model's attention and
    MLP widths, which say where a single block's q/k/v rows end and its MLP rows begin).

    Raises:
        LoraFormatError: unknown layout, modules that do not fit, or mixed ranks.
    """
    tensors, metadata = read_lora(path)
    name = Path(path).name
    peft_keys = [k for k in tensors if ".lora_A." in k or ".lora_B." in k]
    if peft_keys:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        prefix = peft_keys[0].split(".", 1)[0] if peft_keys[0].split(".", 1)[0] in ("unet", "transformer") else ""
        stripped = {k[len(prefix) + 1:] if prefix else k: v for k, v in tensors.items() if k in peft_keys}
        rank = int(config.get(f"{prefix}.r", next(v for k, v in stripped.items() if ".lora_A." in k).shape[0]))
        alpha = float(config.get(f"{prefix}.lora_alpha", rank))
        weights = from_peft_state_dict(stripped, rank, alpha)
    else:
        by_kohya = {kohya_name(m): m for m in module_names}
        modules, ranks, alphas = {}, set(), set()
        fused: dict[str, list[tuple[int, str]]] = {}
        for m in module_names:
            try:
                group, index = _flux_group(m)
                fused.setdefault(group, []).append((index, m))
            except LoraFormatError:
                pass
        for key in tensors:
            if not key.endswith(".lora_down.weight"):
                continue
            stem = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[f"{stem}.lora_up.weight"].float()
            alpha = float(tensors.get(f"{stem}.alpha", torch.tensor(down.shape[0])))
            if stem in by_kohya:
                modules[by_kohya[stem]] = (down, up)
                ranks.add(down.shape[0])
                alphas.add(alpha)
            elif stem in fused:
                split = _split_fused(name, stem, down, up, sorted(fused[stem]), metadata.get("studio.targets", ""),
                                     dims)
                for module, ab in split.items():
                    modules[module] = ab
                    ranks.add(ab[0].shape[0])
                alphas.add(alpha / len(fused[stem]))
            else:
                raise LoraFormatError(f"{name}: key {key!r} does not match any adapted module of this model")
        if not modules:
            raise LoraFormatError(f"{name}: no LoRA weights found (expected kohya lora_down/lora_up or PEFT lora_A/lora_B keys)")
        if len(ranks) != 1 or len(alphas) != 1:
            raise LoraFormatError(f"{name}: modules have different ranks/alphas ({sorted(ranks)}, {sorted(alphas)})")
        weights = LoraWeights(dict(sorted(modules.items())), ranks.pop(), alphas.pop())
    missing = [m for m in weights.modules if m not in module_names]
    if missing:
        raise LoraFormatError(f"{name}: module {missing[0]!r} is not adapted by this model/target set")
    return weights
