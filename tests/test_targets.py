"""The exact set of adapted modules per architecture and target set."""

from __future__ import annotations

import pytest

from tests.conftest import ARCHS
from trainer.models import tiny
from trainer.targets import resolve


@pytest.fixture(scope="module")
def module_names():
    out = {}
    for arch in ARCHS:
        pipe = tiny.build(arch)
        denoiser = pipe.transformer if arch == "flux" else pipe.unet
        out[arch] = [n for n, _ in denoiser.named_modules()]
    return out


def _unet_cross_attn(prefixes, projections=("to_k", "to_v"), attn=("attn2",)):
    return sorted(f"{p}.{a}.{x}" for p in prefixes for a in attn for x in projections)


# tiny sd15: 2 cross-attn down blocks x 2 layers, mid block, 2 up blocks x 3 layers
SD15_BLOCKS = ([f"down_blocks.{b}.attentions.{i}.transformer_blocks.0" for b in range(2) for i in range(2)]
               + ["mid_block.attentions.0.transformer_blocks.0"]
               + [f"up_blocks.{b}.attentions.{i}.transformer_blocks.0" for b in range(2) for i in range(3)])
# tiny sdxl: attention only in down block 1 (2 layers, depth 2), mid (depth 2), up block 0 (3 layers, depth 2)
SDXL_BLOCKS = ([f"down_blocks.1.attentions.{i}.transformer_blocks.{t}" for i in range(2) for t in range(2)]
               + [f"mid_block.attentions.0.transformer_blocks.{t}" for t in range(2)]
               + [f"up_blocks.0.attentions.{i}.transformer_blocks.{t}" for i in range(3) for t in range(2)])
FLUX_STYLE = sorted(["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
                     "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
                     "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"])

EXPECTED = {
    ("sd15", "style"): _unet_cross_attn(SD15_BLOCKS),
    ("sd15", "attention"): _unet_cross_attn(SD15_BLOCKS, ("to_q", "to_k", "to_v", "to_out.0"), ("attn1", "attn2")),
    ("sd15", "late"): _unet_cross_attn([b for b in SD15_BLOCKS if b.startswith("up_blocks.1")]),
    ("sdxl", "style"): _unet_cross_attn(SDXL_BLOCKS),
    ("sdxl", "attention"): _unet_cross_attn(SDXL_BLOCKS, ("to_q", "to_k", "to_v", "to_out.0"), ("attn1", "attn2")),
    ("sdxl", "late"): _unet_cross_attn([b for b in SDXL_BLOCKS if b.startswith("up_blocks.0")]),
    ("flux", "style"): FLUX_STYLE,
    ("flux", "attention"): sorted(FLUX_STYLE + ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_out.0",
                                                "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
                                                "single_transformer_blocks.0.attn.to_q"]),
    ("flux", "late"): ["single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"],
}


@pytest.mark.parametrize("arch,target_set", sorted(EXPECTED))
def test_exact_adapted_modules(module_names, arch, target_set):
    assert resolve(arch, target_set, module_names[arch]) == EXPECTED[(arch, target_set)]


def test_style_never_touches_self_attention(module_names):
    for arch in ("sd15", "sdxl"):
        assert not any("attn1" in n for n in resolve(arch, "style", module_names[arch]))


def test_flux_late_picks_last_quarter_of_single_blocks():
    names = [f"single_transformer_blocks.{i}.attn.{p}" for i in range(38) for p in ("to_k", "to_v")]
    names += [f"transformer_blocks.{i}.attn.to_k" for i in range(19)]
    picked = resolve("flux", "late", names)
    assert sorted({int(n.split(".")[1]) for n in picked}) == list(range(29, 38))
