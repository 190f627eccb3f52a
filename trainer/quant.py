"""NF4 (4-bit NormalFloat, double quantization) for the frozen base, as in QLoRA.

Every ``nn.Linear`` of the denoiser is replaced by a bitsandbytes ``Linear4bit``
holding the same weights; the LoRA adapters stay in fp32/bf16 on top (peft's
bnb LoRA layer). bitsandbytes >= 0.45 runs these kernels on CPU as well as CUDA,
so the same path is tested in CI and used on the GPU. The import is guarded:
without a working bitsandbytes the user gets one line saying so.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UnsupportedError


def _bnb():
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library
        raise UnsupportedError(
            f"precision nf4 needs bitsandbytes (`pip install bitsandbytes`), which failed to load: {err}; "
            f"use --precision bf16 or fp16 instead"
        ) from None
    return bnb


def nf4_supported() -> tuple[bool, str]:
    """Whether NF4 can run here, and why not (for the UI to explain a disabled option)."""
    try:
        bnb = _bnb()
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        layer.to("cuda" if torch.cuda.is_available() else "cpu")
        return True, ""
    except UnsupportedError as err:
        return False, str(err)
    except Exception as err:
        return False, f"this bitsandbytes build cannot run 4-bit kernels here ({type(err).__name__}: {err})"


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> int:
    """Swap every ``nn.Linear`` in ``model`` for an NF4 ``Linear4bit`` on ``device``, in place; returns how many.

    Layer by layer: each weight is copied to ``device``, quantized there, and its original module
    dropped before the next one, so the extra memory at any moment is one layer (not an fp32 copy
    of the model: ~48 GB of host RAM for FLUX). The rest of the model follows to ``device`` at the
    end. ``device`` defaults to where the model's weights are.
    """
    bnb = _bnb()
    if device is None:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    device = torch.device(device)
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]  # names only: no references
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, _nf4_linear(bnb, getattr(parent, child_name), compute_dtype, device))
    model.is_loaded_in_4bit = True  # peft reads this flag to wrap Linear4bit with its bnb LoRA layer
    model.to(device)
    return len(names)


def _nf4_linear(bnb, linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta")
    weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
    q.weight = weight.to(device)  # quantizes on ``device``; the full-precision copy there is freed at once
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    return q
