"""Where a training step's time goes: a few steps under ``torch.profiler``, summed by kind of work.

The issue's rule: where a goal is missed, docs/benchmarks.md says what limits it. A row run with
``--profile N`` profiles N more steps after its timed ones (so the timing is not perturbed) and keeps
a summary, not the trace: milliseconds per step by category, the top operators, and on CUDA how much
of the step the GPU was busy (the rest is host overhead: Python, launches, syncs).

Time is each ATen operator's *self* time (on CUDA the device time of the kernels it launched, on CPU
its own CPU time), so a ``linear`` that calls ``addmm`` is counted once, under matmul. Compiled
regions show up as their Triton kernels (``triton_…``) and the ATen calls they still make.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# (category, substrings of the operator name); the first match wins, so attention precedes matmul
# (``_scaled_dot_product_flash_attention`` is attention, not a bmm) and NF4's ``gemm_4bit`` (dequantize, then
# multiply) is NF4's cost, not matmul; backward ops follow their forward.
CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention",
                   "xformers", "softmax")),
    ("nf4 (bitsandbytes)", ("bitsandbytes", "dequantize", "quantize_4bit", "matmul4bit")),
    ("matmul", ("addmm", "::mm", "bmm", "matmul", "baddbmm", "gemm", "linear")),
    ("convolution", ("conv",)),
    ("norm", ("layer_norm", "group_norm", "rms_norm", "batch_norm")),
    ("optimizer", ("_foreach_", "_fused_adam", "adamw", "optim")),
    ("copy / cast", ("copy_", "_to_copy", "contiguous", "clone", "memcpy", "aten::to", "aten::cat", "aten::stack")),
    ("compiled (triton)", ("triton_",)),
)
EXACT = {"aten::to", "aten::cat", "aten::stack"}
OTHER = "elementwise / other"
TOP = 8  # operators kept by name


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        # "aten::to"/"aten::cat"/"aten::stack" name one op each (not aten::topk, aten::scatter_add_)
        if any(lowered == n if n in EXACT else n in lowered for n in needles):
            return label
    return OTHER


def summarize(averages, steps: int, wall_s: float, cuda: bool) -> dict:
    """``averages``: ``prof.key_averages()``; ``wall_s``: the profiled steps' wall time, synced."""
    by_category: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for event in averages:
        if cuda and getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type):
            continue  # a kernel row: its time is already in the operator that launched it
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us <= 0 or event.key.startswith("ProfilerStep") or event.key.startswith("## "):
            continue
        by_category[category(event.key)] += self_us
        by_op[event.key] += self_us
    busy_ms = sum(by_category.values()) / 1000 / steps
    step_ms = wall_s * 1000 / steps
    top = sorted(by_op.items(), key=lambda kv: kv[1], reverse=True)[:TOP]
    return {"steps": steps, "step_ms": step_ms, "busy_ms": busy_ms,
            "busy_share": min(busy_ms / step_ms, 1.0) if step_ms > 0 else None,
            "clock": "device" if cuda else "cpu",
            "categories_ms": {k: v / 1000 / steps for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
            "top_ops_ms": [[name, us / 1000 / steps] for name, us in top]}


def profile_steps(step, device: torch.device, steps: int) -> dict:
    """Run ``step`` ``steps`` times under the profiler; the summary of :func:`summarize`."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from benchmarks.measure import sync

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_s = time.perf_counter() - t0
    return summarize(prof.key_averages(), steps, wall_s, cuda)
