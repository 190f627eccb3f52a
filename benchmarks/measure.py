"""Timing and memory measurement, and a description of the machine a result came from."""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.flops import device_peak_tflops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class MemoryProbe:
    """Peak memory over a span: CUDA allocator peaks, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_rss, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_rss = max(self.peak_rss, self._rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident = torch.cuda.memory_allocated(self.device)
        else:
            self.resident = self.peak_rss = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type != "cuda":
            self._stop.set()
            self._thread.join()
            self.peak_rss = max(self.peak_rss, self._rss())

    def report(self) -> dict:
        mb = 1024.0 ** 2
        if self.device.type == "cuda":
            return {"resident_mb": self.resident / mb,
                    "peak_allocated_mb": torch.cuda.max_memory_allocated(self.device) / mb,
                    "peak_reserved_mb": torch.cuda.max_memory_reserved(self.device) / mb}
        return {"resident_rss_mb": self.resident / mb, "peak_rss_mb": self.peak_rss / mb}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def time_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    first, started = None, time.perf_counter()
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        sync(device)
        first = time.perf_counter() - t0 if i == 0 else first
    warmup_s = time.perf_counter() - started
    times, losses = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"first_step_s": first, "warmup_s": warmup_s, "step_s_median": median, "step_s_p95": percentile(times, 0.95),
            "steps_per_s": 1.0 / median, "steps_per_s_p95": 1.0 / percentile(times, 0.95),
            "loss_finite": all(math.isfinite(x) for x in losses)}


def environment(device: str) -> dict:
    import platform
    import sys
    from importlib import metadata

    versions = {}
    for pkg in ("torch", "diffusers", "peft", "transformers", "accelerate", "bitsandbytes", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        extra = {"cuda": torch.version.cuda, "device_memory_gib": total / 1024 ** 3}
    else:
        name = _cpu_name()
        extra = {"cpu_threads": torch.get_num_threads()}
    peak = device_peak_tflops(name) if device.startswith("cuda") else None
    return {"device": device, "device_name": name, "peak_bf16_tflops": peak,
            "python": sys.version.split()[0], "platform": platform.platform(), "versions": versions, **extra}


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "CPU"
