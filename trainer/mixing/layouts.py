"""Every LoRA layout we take, recognised from key names alone (no base needed).

:func:`scan` groups a file's keys per adapted layer, :func:`detect_arch` tells the architecture,
:func:`inspect_lora` reports it all from the header; :mod:`trainer.mixing.resolve` then maps the
layers onto a base.

| format | example key |
|---|---|
| ``kohya`` (A1111, kohya, ComfyUI) | ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; text encoders ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``; SDXL files from sd-scripts use SGM names (``lora_unet_input_blocks_4_1_…``) |
| ``flux-fused`` (BFL/kohya) | ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``lora_unet_single_blocks_0_linear1…`` |
| ``peft`` (diffusers) | ``unet.<module>.lora_A.weight`` / ``transformer.<module>.lora_B.weight``, alpha in ``lora_adapter_metadata`` |
| ``comfy`` (ComfyUI saves) | ``diffusion_model.<module>.lora_up.weight`` (SGM/BFL or diffusers module names) |
| ``diffusers-old`` | ``unet.<block>.attn2.processor.to_k_lora.down.weight`` |

Keys that are no LoRA weight (``dora_scale``, LyCORIS ``hada_*`` …) are listed as *ignored*,
never dropped quietly. Scales follow what diffusers, ComfyUI and kohya do: ``alpha / rank`` per
layer (``.alpha`` keys, or ``lora_adapter_metadata`` for PEFT files), 1 when no alpha is given.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import LoraFormatError
from trainer.paths import sha256_file
from trainer.mixing.index import ARCH_LABELS

# suffix -> role; checked in order, first match wins
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
)
_PEFT_NAMED = re.compile(r"(.+)\.lora_([AB])\.[\w-]+\.weight")  # peft's own keys carry the adapter name
_OLD_PROC = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PREFIXES = (  # stem prefix -> (component role, naming)
    ("lora_unet_", "denoiser", "kohya"), ("lora_te1_", "te1", "kohya"), ("lora_te2_", "te2", "kohya"),
    ("lora_te_", "te1", "kohya"), ("unet.", "denoiser", "dotted"), ("transformer.", "denoiser", "dotted"),
    ("text_encoder_2.", "te2", "dotted"), ("text_encoder.", "te1", "dotted"),
    ("diffusion_model.", "denoiser", "comfy"), ("base_model.model.", "denoiser", "dotted"),
)
_FLUX_STARTS = ("double_blocks", "single_blocks", "transformer_blocks", "single_transformer_blocks", "x_embedder",
                "context_embedder", "time_text_embed", "norm_out", "img_in", "txt_in", "time_in", "vector_in",
                "guidance_in", "final_layer")
_UNET_STARTS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block",
                "time_embed", "label_emb", "conv_in", "conv_out", "add_embedding", "out_2")


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA file is, as the mix tab and the CLI show it.

    ``rank``/``alpha`` are the largest layer rank and the most common alpha. :func:`inspect_lora`
    reports them as the file stores them; a :class:`~trainer.mixing.MixSession` reports the layers
    it resolved (a fused FLUX ``qkv`` LoRA of rank 2r with zero q rows is two rank-r layers there).
    """

    name: str
    path: str
    format: str  # kohya | flux-fused | peft | comfy | diffusers-old
    arch: str  # sd15 | sdxl | flux | unknown
    rank: int
    alpha: float
    targets: tuple[str, ...]  # module names (resolved on a base) or the file's own key stems
    metadata: dict[str, str]
    sha256: str
    ignored_keys: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return self.metadata.get("modelspec.title") or self.metadata.get("ss_output_name") or Path(self.path).stem

    @property
    def trigger(self) -> str:
        return self.metadata.get("modelspec.trigger_phrase", "")

    def summary(self) -> str:
        """One line for the UI/CLI: format, arch, rank/alpha, modules, trigger, ignored keys."""
        text = (f"{self.name}: {self.format}, {ARCH_LABELS.get(self.arch, self.arch)}, rank {self.rank}, "
                f"alpha {self.alpha:g}, {len(self.targets)} modules")
        if self.trigger:
            text += f", trigger {self.trigger!r}"
        if self.ignored_keys:
            text += f"; {len(self.ignored_keys)} keys ignored (first: {self.ignored_keys[0]})"
        return text


@dataclass(frozen=True)
class LayerLora:
    """One adapted layer: ΔW = scale · up @ down (conv: flattened)."""

    down: torch.Tensor  # r × in (conv: r × in × kh × kw)
    up: torch.Tensor  # out × r (conv: out × r × 1 × 1)
    scale: float
    key: str  # the file key it came from, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class Scan:
    """A file's keys grouped per adapted layer (stem), before any base is involved."""

    groups: dict[str, dict[str, str]]  # stem -> {"down"|"up"|"alpha": key}
    located: dict[str, tuple[str, str, str]]  # stem -> (role: denoiser|te1|te2, naming, rest of the name)
    ignored: tuple[str, ...]
    format: str


def _stem_role(key: str) -> tuple[str, str] | None:
    match = _OLD_PROC.fullmatch(key)
    if match:
        module = match.group(2) if match.group(2) != "to_out" else "to_out.0"
        return f"{match.group(1)}.{module}", match.group(3)
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    match = _PEFT_NAMED.fullmatch(key)
    if match:
        return match.group(1), "down" if match.group(2) == "A" else "up"
    return None


def _locate(stem: str) -> tuple[str, str, str]:
    for prefix, role, naming in _PREFIXES:
        if stem.startswith(prefix):
            return role, naming, stem[len(prefix):]
    return "denoiser", "dotted", stem  # bare module names: peft's own state dict of the denoiser


def scan(keys: list[str], file_name: str) -> Scan:
    """Group ``keys`` per layer; keys that are no LoRA weight end up in ``ignored``.

    Raises:
        LoraFormatError: no LoRA weights at all (e.g. a LyCORIS LoHa/LoKr file), or a layer without its up/down half.
    """
    groups: dict[str, dict[str, str]] = {}
    ignored = []
    old = False
    for key in keys:
        found = _stem_role(key)
        if found is None:
            ignored.append(key)
            continue
        old = old or ".processor." in key or ".lora_linear_layer." in key or ".lora.down." in key or ".lora.up." in key
        groups.setdefault(found[0], {})[found[1]] = key
    for stem, roles in list(groups.items()):
        if roles.keys() == {"alpha"}:  # an alpha without weights (or a non-LoRA ".alpha" parameter)
            ignored.append(roles["alpha"])
            del groups[stem]
        elif "down" not in roles or "up" not in roles:
            have, missing = ("up", "down") if "up" in roles else ("down", "up")
            raise LoraFormatError(f"{file_name}: key {roles[have]!r} has no matching {missing} weight; the file is "
                                  f"incomplete or damaged (re-download or re-export it)")
    if not groups:
        example = ignored[0] if ignored else "(none)"
        kind = " (LyCORIS LoHa/LoKr weights are not plain LoRA)" if any("hada_" in k or "lokr_" in k for k in ignored) else ""
        raise LoraFormatError(f"{file_name}: no LoRA weights found{kind}; expected kohya lora_down/lora_up or PEFT "
                              f"lora_A/lora_B keys, first key is {example!r}")
    located = {stem: _locate(stem) for stem in groups}
    namings = Counter(n for _, n, _ in located.values())
    if namings.get("kohya") and any(r.startswith(("double_blocks", "single_blocks")) for _, n, r in located.values()
                                    if n == "kohya"):
        fmt = "flux-fused"
    elif old:
        fmt = "diffusers-old"
    else:
        fmt = {"kohya": "kohya", "dotted": "peft", "comfy": "comfy"}[namings.most_common(1)[0][0]]
    return Scan(groups=groups, located=located, ignored=tuple(sorted(ignored)), format=fmt)


def family(located: dict[str, tuple[str, str, str]]) -> str | None:
    """``flux`` or ``unet`` from the denoiser key names; None for a text-encoder-only file."""
    for stem, (role, naming, rest) in sorted(located.items()):
        if role != "denoiser":
            continue
        if stem.startswith("transformer.") or rest.startswith(_FLUX_STARTS):
            return "flux"
        if stem.startswith("unet.") or rest.startswith(_UNET_STARTS):
            return "unet"
    return None


def detect_arch(sc: Scan, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], hint: str | None) -> str:
    """Architecture a file was made for: key names, then cross-attention widths, then metadata, then ``hint``."""
    fam = family(sc.located)
    if fam == "flux":
        return "flux"
    stems = sc.located.items()
    if any(role == "te2" for _, (role, _, _) in stems):
        return "sdxl"
    if any(("add_embedding" in rest or "label_emb" in rest or (naming == "kohya" and "input_blocks" in rest)
            or re.search(r"transformer_blocks[._][1-9]", rest)) for _, (_, naming, rest) in stems):
        return "sdxl"
    widths = {shapes[g["down"]][1] for stem, g in sc.groups.items()
              if re.search(r"attn2[._]to_[kv]$", stem) and len(shapes[g["down"]]) == 2}
    if widths & {2048}:
        return "sdxl"
    if widths & {768}:
        return "sd15"
    meta = " ".join(metadata.get(k, "") for k in ("studio.arch", "modelspec.architecture", "ss_base_model_version"))
    for needle, arch in (("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("flux", "flux"), ("sd15", "sd15"),
                         ("sd_v1", "sd15"), ("stable-diffusion-v1", "sd15")):
        if needle in meta.lower() and not (fam == "unet" and arch == "flux"):
            return arch
    if hint and (fam is None or (fam == "unet") == (hint != "flux")):
        return hint
    return "unknown"


def _pattern_value(patterns: dict, module: str):
    """peft's rank_pattern/alpha_pattern lookup: a key matches the module's full name or a dotted suffix of it."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern.lstrip('^')})", module):
            return value
    return None


def peft_config(metadata: dict[str, str], prefix: str) -> dict | None:
    """The LoraConfig fields diffusers stores in ``lora_adapter_metadata`` for component ``prefix``."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    scoped = {k[len(prefix) + 1:]: v for k, v in config.items() if prefix and k.startswith(prefix + ".")}
    return scoped or {k: v for k, v in config.items() if "." not in k} or None


def layer_scale(stem: str, roles: dict[str, str], naming: str, rank: int, alpha: float | None,
                metadata: dict[str, str], file_name: str) -> float:
    """alpha / rank as the ecosystem's loaders apply it (1 when the file gives no alpha)."""
    if alpha is not None:
        return alpha / rank
    if ".lora_A." in roles["down"]:
        prefix = stem.split(".", 1)[0] if stem.split(".", 1)[0] in ("unet", "transformer", "text_encoder",
                                                                     "text_encoder_2") else ""
        config = peft_config(metadata, prefix)
        if config:
            module = stem[len(prefix) + 1:] if prefix else stem
            if config.get("use_dora"):
                raise LoraFormatError(f"{file_name}: {stem} is a DoRA adapter (use_dora in lora_adapter_metadata); "
                                      f"only plain LoRA can be mixed")
            r = _pattern_value(config.get("rank_pattern"), module) or config.get("r", 8)
            a = _pattern_value(config.get("alpha_pattern"), module) or config.get("lora_alpha", 8)
            if int(r) != rank:
                raise LoraFormatError(f"{file_name}: key {roles['down']!r} has rank {rank} but its "
                                      f"lora_adapter_metadata says r={r}; the metadata does not match the weights")
            return float(a) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return 1.0


def representative(values: list[float]) -> float:
    """The most common value (a file's alpha when its layers disagree)."""
    return Counter(values).most_common(1)[0][0] if values else 0.0


def inspect_lora(path: str | Path, arch: str | None = None, name: str | None = None) -> LoraInfo:
    """Format, architecture, rank/alpha, targets and metadata of a LoRA file, from its header.

    Reads the safetensors header, tensor shapes and the scalar ``.alpha`` tensors (plus one pass to
    hash the file); no base is needed (``arch`` is a hint for files whose keys and widths do not
    tell, e.g. tiny models).

    Raises:
        LoraFormatError: not ``.safetensors`` (pickles are refused), unreadable, or no LoRA weights.
    """
    from safetensors import safe_open

    from trainer.export import read_metadata

    path = Path(path)
    metadata = read_metadata(path)  # refuses non-.safetensors and missing files
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        sc = scan(keys, path.name)
        alphas = {stem: float(f.get_tensor(g["alpha"])) for stem, g in sc.groups.items() if "alpha" in g}
    ranks, scales = [], []
    for stem, roles in sc.groups.items():
        rank = shapes[roles["down"]][0]
        ranks.append(rank)
        scales.append(layer_scale(stem, roles, sc.located[stem][1], rank, alphas.get(stem), metadata, path.name) * rank)
    metadata.pop("format", None)
    return LoraInfo(name=name or path.stem, path=str(path), format=sc.format,
                    arch=detect_arch(sc, shapes, metadata, arch), rank=max(ranks), alpha=representative(scales),
                    targets=tuple(sorted(sc.groups)), metadata=metadata, sha256=sha256_file(path),
                    ignored_keys=sc.ignored)
