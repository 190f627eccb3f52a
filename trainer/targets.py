"""Which modules get LoRA adapters, per architecture and target set, as data.

A *target set* is a list of module-name regexes (full match, as peft uses them)
plus an optional "late" restriction to the last blocks. :func:`resolve` turns a
set into the exact module names of a loaded denoiser — the UI shows that list
before training starts (peft's ``inspect_matched_modules`` idea).

- ``style`` (default): cross-attention keys/values only. For SD1.5/SDXL that is
  the UNet's ``attn2.to_k``/``attn2.to_v`` (the projections of the text
  embedding). FLUX has joint attention, so the text stream's ``add_k_proj``/
  ``add_v_proj`` and the image stream's ``to_k``/``to_v`` of the double blocks
  and the single blocks' ``to_k``/``to_v`` play that role.
- ``attention``: q/k/v/out of every attention layer.
- ``late``: the ``style`` modules of the last blocks only (cf. Late-Stage LoRA):
  the final UNet up block with attention, or the last quarter of FLUX single blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from trainer.errors import ConfigError


@dataclass(frozen=True)
class TargetSet:
    patterns: tuple[str, ...]
    late_only: bool = False


_UNET_STYLE = (r".*attn2\.(to_k|to_v)",)
_UNET_ATTENTION = (r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",)
_FLUX_STYLE = (
    r"transformer_blocks\.\d+\.attn\.(to_k|to_v|add_k_proj|add_v_proj)",
    r"single_transformer_blocks\.\d+\.attn\.(to_k|to_v)",
)
_FLUX_ATTENTION = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)",
)

TARGETS: dict[str, dict[str, TargetSet]] = {
    "sd15": {"style": TargetSet(_UNET_STYLE), "attention": TargetSet(_UNET_ATTENTION), "late": TargetSet(_UNET_STYLE, True)},
    "sdxl": {"style": TargetSet(_UNET_STYLE), "attention": TargetSet(_UNET_ATTENTION), "late": TargetSet(_UNET_STYLE, True)},
    "flux": {"style": TargetSet(_FLUX_STYLE), "attention": TargetSet(_FLUX_ATTENTION), "late": TargetSet(_FLUX_STYLE, True)},
}


def _late_filter(arch: str, names: list[str]) -> list[str]:
    """Keep the modules of the last blocks: last UNet up block with attention / last quarter of FLUX single blocks."""
    if arch == "flux":
        index = {n: int(re.match(r"single_transformer_blocks\.(\d+)\.", n).group(1))
                 for n in names if n.startswith("single_transformer_blocks.")}
        if not index:
            return []
        n_blocks = max(index.values()) + 1
        first = n_blocks - max(1, n_blocks // 4)
        return [n for n in names if n in index and index[n] >= first]
    up = {n: int(re.match(r"up_blocks\.(\d+)\.", n).group(1)) for n in names if n.startswith("up_blocks.")}
    if not up:
        return []
    last = max(up.values())
    return [n for n in names if up.get(n) == last]


def resolve(arch: str, target_set: str, module_names: Iterable[str]) -> list[str]:
    """Exact names of the modules that ``target_set`` adapts in a model with ``module_names``.

    Raises:
        ConfigError: unknown architecture/target set, or nothing matched.
    """
    if arch not in TARGETS:
        raise ConfigError([f"architecture {arch!r} has no LoRA targets (known: {', '.join(TARGETS)})"])
    if target_set not in TARGETS[arch]:
        raise ConfigError([f"targets={target_set!r}: must be one of {', '.join(TARGETS[arch])}"])
    spec = TARGETS[arch][target_set]
    compiled = [re.compile(p) for p in spec.patterns]
    names = sorted(n for n in module_names if any(c.fullmatch(n) for c in compiled))
    if spec.late_only:
        names = _late_filter(arch, names)
    if not names:
        raise ConfigError([f"targets={target_set!r} matched no modules of this {arch} model"])
    return names
