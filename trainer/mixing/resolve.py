"""Map a LoRA file's layers onto a base's modules, checking every name and shape first.

A file for another architecture is refused with the first key that does not fit, before
anything touches the pipeline: diffusers only warns about a wrong prefix and loads nothing,
and its FLUX loader even widens base layers to fit a mismatched file. Kohya names are
un-mangled through the base's own module table; sd-scripts' SGM block names (SDXL) and the
fused BFL FLUX names are mapped with the tables below. Layers aimed at a component diffusers
never loads (FLUX's T5 encoder) become *ignored* keys.
"""

from __future__ import annotations

import re

import torch

from trainer.errors import LoraFormatError
from trainer.mixing.index import ARCH_LABELS, ModelIndex, mangle
from trainer.mixing.layouts import LayerLora, Scan, detect_arch, family, layer_scale, scan

# BFL (fused) names -> diffusers modules of that block, in the fused rows' order
_BFL_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_proj": ("attn.to_out.0",), "txt_attn_proj": ("attn.to_add_out",),
    "img_mlp_0": ("ff.net.0.proj",), "img_mlp_2": ("ff.net.2",),
    "txt_mlp_0": ("ff_context.net.0.proj",), "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",), "txt_mod_lin": ("norm1_context.linear",),
}
_BFL_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
               "modulation_lin": ("norm.linear",)}
_SGM_INNER = (("in_layers_2", "conv1"), ("emb_layers_1", "time_emb_proj"), ("out_layers_3", "conv2"),
              ("skip_connection", "conv_shortcut"))


def _sgm_prefixes(config: dict) -> list[tuple[str, str]]:
    """SGM (original SD/SDXL) block names, kohya-mangled -> diffusers module prefix; longest first."""
    lpb = config["layers_per_block"]
    lpb = lpb if isinstance(lpb, int) else lpb[0]
    n_down, n_up = len(config["down_block_types"]), len(config["up_block_types"])
    out = {"input_blocks_0_0": "conv_in", "time_embed_0": "time_embedding.linear_1",
           "time_embed_2": "time_embedding.linear_2", "label_emb_0_0": "add_embedding.linear_1",
           "label_emb_0_2": "add_embedding.linear_2", "out_2": "conv_out", "middle_block_0": "mid_block.resnets.0",
           "middle_block_1": "mid_block.attentions.0", "middle_block_2": "mid_block.resnets.1"}
    for i in range(n_down):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            out[f"input_blocks_{k}_0"] = f"down_blocks.{i}.resnets.{j}"
            out[f"input_blocks_{k}_1"] = f"down_blocks.{i}.attentions.{j}"
        if i < n_down - 1:
            out[f"input_blocks_{1 + i * (lpb + 1) + lpb}_0_op"] = f"down_blocks.{i}.downsamplers.0.conv"
    for i in range(n_up):
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            out[f"output_blocks_{k}_0"] = f"up_blocks.{i}.resnets.{j}"
            out[f"output_blocks_{k}_1"] = f"up_blocks.{i}.attentions.{j}"
        if i < n_up - 1:
            k = i * (lpb + 1) + lpb
            out[f"output_blocks_{k}_1_conv"] = out[f"output_blocks_{k}_2_conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return sorted(out.items(), key=lambda kv: -len(kv[0]))


def _from_sgm(rest: str, index: ModelIndex) -> str | None:
    if not index.unet_config:
        return None
    for sgm, prefix in _sgm_prefixes(index.unet_config):
        if rest == sgm or rest.startswith(sgm + "_"):
            inner = rest[len(sgm) + 1:]
            for old, new in _SGM_INNER:
                inner = inner.replace(old, new)
            return index.kohya_table("unet").get(mangle(prefix) + ("_" + inner if inner else ""))
    return None


def _from_bfl(rest: str, index: ModelIndex) -> list[str] | None:
    match = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", rest)
    if not match:
        return None
    table, block = (_BFL_DOUBLE, "transformer_blocks") if match.group(1) == "double" else (_BFL_SINGLE, "single_transformer_blocks")
    parts = table.get(match.group(3))
    return [f"{block}.{match.group(2)}.{p}" for p in parts] if parts else None


def targets_of(role: str, naming: str, rest: str, index: ModelIndex) -> tuple[str, list[str] | None]:
    """(component, module names) a stem adapts on this base; several names for a fused FLUX layer; None: no fit."""
    component = index.denoiser if role == "denoiser" else "text_encoder" if role == "te1" else "text_encoder_2"
    if component not in index.shapes:
        return component, None
    if naming in ("dotted", "comfy"):
        found = index.find(component, rest)
        if found:
            return component, [found]
        rest = mangle(rest)
    if index.arch == "flux" and role == "denoiser":
        fused = _from_bfl(rest, index)
        if fused:
            return component, fused
    table = index.kohya_table(component)
    if rest in table:
        return component, [table[rest]]
    if component == "unet":
        found = _from_sgm(rest, index)
        if found:
            return component, [found]
    return component, None


def _misfit(file_name: str, key: str, problem: str, index: ModelIndex, detected: str) -> LoraFormatError:
    if detected not in ("unknown", index.arch):
        label = ARCH_LABELS.get(detected, detected)
        article = "an" if label in ("SDXL", "SD1.5") else "a"  # read letter by letter; FLUX is read as a word
        advice = f"it looks like {article} {label} LoRA: load it with {article} {label} base"
    else:
        advice = f"use a LoRA made for this {index.label} base"
    return LoraFormatError(f"{file_name}: key {key!r} does not fit the {index.label} base: {problem}; {advice}")


def resolve(tensors: dict[str, torch.Tensor], metadata: dict[str, str], index: ModelIndex, file_name: str,
            hint_arch: str | None = None) -> tuple[dict[str, LayerLora], Scan, str, list[str]]:
    """Map a file's tensors onto ``index``'s layers: ``{"<component>.<module>": LayerLora}``.

    Returns (layers, scan, detected arch, ignored keys).

    Raises:
        LoraFormatError: naming the first key whose module is missing from the base or whose shape does not fit.
    """
    sc = scan(list(tensors), file_name)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    detected = detect_arch(sc, shapes, metadata, hint_arch or index.arch)
    fam = family(sc.located)
    if fam is not None and (fam == "flux") != (index.arch == "flux"):
        key = next(g["down"] for s, g in sorted(sc.groups.items()) if sc.located[s][0] == "denoiser")
        raise _misfit(file_name, key, f"its layer names belong to a {'FLUX' if fam == 'flux' else 'UNet (SD1.5/SDXL)'} "
                      f"model", index, "flux" if fam == "flux" else detected)
    layers: dict[str, LayerLora] = {}
    ignored = list(sc.ignored)
    for stem in sorted(sc.groups, key=lambda s: sc.groups[s]["down"]):
        roles = sc.groups[stem]
        role, naming, rest = sc.located[stem]
        down, up = tensors[roles["down"]].float(), tensors[roles["up"]].float()
        component, modules = targets_of(role, naming, rest, index)
        if modules is None and component not in index.shapes:
            if index.arch == "flux" and role == "te2":  # diffusers never loads LoRAs into FLUX's T5 encoder
                ignored.extend(roles.values())
                continue
            raise _misfit(file_name, roles["down"], f"it adapts {component}, which this base does not have", index, detected)
        if modules is None:
            raise _misfit(file_name, roles["down"], f"the {component} has no layer {rest!r}", index, detected)
        base_shapes = [index.shapes[component][m] for m in modules]
        rows = sum(s[0] for s in base_shapes)
        want_down = (down.shape[0], *base_shapes[0][1:])
        if down.ndim < 2 or tuple(down.shape) != want_down:
            raise _misfit(file_name, roles["down"], f"its shape is {tuple(down.shape)} but {component}.{modules[0]} "
                          f"needs {want_down} (weight {base_shapes[0]})", index, detected)
        want_up = (rows, down.shape[0], *([1, 1] if len(base_shapes[0]) == 4 else []))
        if tuple(up.shape) != want_up:
            raise _misfit(file_name, roles["up"], f"its shape is {tuple(up.shape)} but needs {want_up}", index, detected)
        alpha = float(tensors[roles["alpha"]]) if "alpha" in roles else None
        scale = layer_scale(stem, roles, naming, down.shape[0], alpha, metadata, file_name)
        if len(modules) == 1:
            layers[f"{component}.{modules[0]}"] = LayerLora(down, up, scale, roles["down"])
            continue
        offset = 0
        for module, shape in zip(modules, base_shapes):  # fused FLUX layer: one LoRA per row block
            part = up[offset:offset + shape[0]]
            offset += shape[0]
            keep = (part.abs().sum(0) > 0) & (down.flatten(1).abs().sum(1) > 0)  # the zero blocks of a fused export
            if keep.any():
                layers[f"{component}.{module}"] = LayerLora(down[keep].contiguous(), part[:, keep].contiguous(), scale,
                                                            roles["down"])
    if {detected, index.arch} <= {"sd15", "sdxl"} and detected != index.arch:
        # names and shapes can coincide (the demo bases share their widths): what the file says it is decides
        label = ARCH_LABELS.get(detected, detected)
        article = "an" if label in ("SDXL", "SD1.5") else "a"
        raise LoraFormatError(f"{file_name} was made for {label} (its metadata says so), not for the {index.label} "
                              f"base; load it with {article} {label} base")
    return layers, sc, detected, ignored
