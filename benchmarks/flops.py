"""Analytic FLOPs of a LoRA training step, and the device peaks MFU is measured against.

Counted from the shapes of one forward pass (on the ``meta`` device for full-size models, so
nothing is allocated), per operation, with multiply-add = 2 FLOPs:

- linear ``x[T, in] @ W[in, out]``: forward ``2·T·in·out``; backward adds ``2·T·in·out`` for the
  input gradient when ``x`` requires grad (a trainable LoRA lies upstream, so the gradient has
  to flow back through this layer) and ``2·T·in·out`` for the weight gradient only when ``W`` is
  trainable (the LoRA A/B matrices; the frozen base has no weight gradient);
- conv2d: the same with ``T·in·out`` replaced by ``outputs·(C_in/groups)·k_h·k_w``;
- attention core (``scaled_dot_product_attention``, q·kᵀ and p·v): forward ``4·B·H·L_q·L_k·d``;
  backward ``2·B·H·L_q·L_k·d`` for dP plus the same for each of dQ, dK, dV that needs a gradient
  (so 2× forward when all do: attention has no frozen weight to skip).

Not counted: elementwise ops, norms, softmax, the optimizer (LoRA-sized), gradient-checkpoint
recompute (MFU counts *model* FLOPs, as PaLM's definition does; recompute would be HFU).
For a frozen base with LoRA this gives ≈ 2× the forward linear/conv FLOPs + 3× the attention
FLOPs; for FLUX it reduces to the closed form of :func:`flux_closed_form`, which tests check.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOPS from the vendors' datasheets (sparse figure / 2);
# fp16 is the same on these parts, NF4 computes in bf16 after dequantizing. First match on the CUDA name wins.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2),
)


def device_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak for a CUDA device name; None (MFU omitted) for CPUs and unknown devices."""
    for needle, peak in PEAK_BF16_TFLOPS:
        if needle.lower() in device_name.lower():
            return peak
    return None


@dataclass
class FlopCount:
    forward: float = 0.0
    backward: float = 0.0
    by_kind: dict[str, float] = field(default_factory=dict)  # forward FLOPs per kind (linear, conv, attention)
    train_by_kind: dict[str, float] = field(default_factory=dict)  # forward + backward per kind

    @property
    def train(self) -> float:
        return self.forward + self.backward

    def add(self, kind: str, fwd: float, bwd: float) -> None:
        self.forward += fwd
        self.backward += bwd
        self.by_kind[kind] = self.by_kind.get(kind, 0.0) + fwd
        self.train_by_kind[kind] = self.train_by_kind.get(kind, 0.0) + fwd + bwd


def _needs(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()


@contextlib.contextmanager
def counting(model: torch.nn.Module):
    """Count the FLOPs of everything ``model`` runs inside the block (see the module doc)."""
    count = FlopCount()
    handles = []

    def linear_hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        macs = (x.numel() // x.shape[-1]) * module.in_features * module.out_features
        weight_grad = module.weight.requires_grad and torch.is_grad_enabled()
        count.add("linear", 2.0 * macs, 2.0 * macs * (_needs(x) + weight_grad))

    def conv_hook(module, args, output):
        macs = output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        weight_grad = module.weight.requires_grad and torch.is_grad_enabled()
        count.add("conv", 2.0 * macs, 2.0 * macs * (_needs(args[0]) + weight_grad))

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):  # includes bitsandbytes Linear4bit and peft's lora_A/lora_B
            handles.append(module.register_forward_pre_hook(linear_hook, with_kwargs=True))
        elif isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))

    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, *args, **kwargs):
        batch = query.numel() // (query.shape[-2] * query.shape[-1])
        lq, lk, d, dv = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
        qk, pv = 2.0 * batch * lq * lk * d, 2.0 * batch * lq * lk * dv
        any_grad = _needs(query) or _needs(key) or _needs(value)
        count.add("attention", qk + pv, any_grad * pv + _needs(value) * pv + _needs(query) * qk + _needs(key) * qk)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield count
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def flux_closed_form(resolution: int, text_len: int = 512, batch: int = 1, dim: int = 3072, double: int = 19,
                     single: int = 38, mlp_ratio: float = 4.0) -> dict[str, float]:
    """FLUX training-step FLOPs in closed form (LoRA on a frozen base; embedders and LoRA terms left out).

    Image tokens ``T_i = (resolution/16)²`` (VAE /8, 2×2 packing), ``T = T_i + text_len``, width ``D``.
    Per token, a double block applies ``(4 + 2·mlp_ratio)·D²`` multiply-adds of *token* linears in each
    stream (q, k, v, out + the MLP); a single block ``(3 + mlp_ratio + 1 + mlp_ratio)·D²`` (qkv, MLP in,
    and the fused output projection from ``(1 + mlp_ratio)·D``). The adaLN modulation linears (≈ 3.2 B of
    the 11.9 B parameters) act on one vector per sample, not per token: only ≈ 6.5 B parameters touch every
    token, so a parameter-count estimate (``4·N_params·T`` for a frozen base) overcounts by ~1.8×.
    Attention core: ``4·T²·D`` forward per block.
    Training = 2 × linear forward (input gradients only) + 3 × attention forward.
    """
    t_img = (resolution // 16) ** 2
    tokens = t_img + text_len
    per_double = (4 + 2 * mlp_ratio) * dim * dim * tokens  # both streams: img on T_i tokens + txt on text_len
    per_single = (3 + mlp_ratio + 1 + mlp_ratio) * dim * dim * tokens
    linear_fwd = 2.0 * batch * (double * per_double + single * per_single)
    attention_fwd = 4.0 * batch * (double + single) * tokens * tokens * dim
    return {"tokens": tokens, "linear_forward": linear_fwd, "attention_forward": attention_fwd,
            "forward": linear_fwd + attention_fwd, "train": 2 * linear_fwd + 3 * attention_fwd}
