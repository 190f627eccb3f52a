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


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Swap every ``nn.Linear`` in ``model`` for an NF4 ``Linear4bit`` in place; returns how many.

    The weights are quantized when the module is next moved to a device (``.to()``).
    """
    bnb = _bnb()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float32).contiguous(), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, q)
            swapped += 1
    model.is_loaded_in_4bit = True  # peft reads this flag to wrap Linear4bit with its bnb LoRA layer
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    model.to(device)
    return swapped
