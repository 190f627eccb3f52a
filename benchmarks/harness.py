"""Run the benchmark matrix: training rows (ours vs reference), inference rows, goals; write JSON.

Each training row builds its models fresh (random weights, :mod:`benchmarks.archs`), runs
``warmup`` untimed steps, then ``steps`` timed ones, each bracketed by ``torch.cuda.synchronize()``
on CUDA. Peak memory: on CUDA ``max_memory_allocated``/``max_memory_reserved`` from just before
the warm-up (so the resident weights are in, build transients are not); on CPU the process's peak
RSS over the same span (sampled every 5 ms; a host figure, not comparable with VRAM). A row that
fails records its error and the run goes on; a CUDA OOM with ``grad_ckpt auto`` (ours) or on the
reference retries once with gradient checkpointing and says so. Results are written after every
row, so a run cut short keeps what it measured; ``append`` merges into an existing file, so the
matrix can be run in slices (the GPU machine allows 10 minutes per command). ``profile_steps``
adds a per-row summary of where a step's time goes (:mod:`benchmarks.profile`).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.archs import ArchSpec, get_spec
from benchmarks.inference import run_inference
from benchmarks.measure import MemoryProbe, environment, time_steps
from benchmarks.ours import Options, OursStep
from benchmarks.parts import build_parts, free_memory
from benchmarks.profile import profile_steps
from benchmarks.reference import ReferenceStep


@dataclass(frozen=True)
class Plan:
    """What to run; ``smoke`` = the tiny models on CPU (a harness check, never a speed figure)."""

    archs: tuple[str, ...]
    precisions: tuple[str, ...]
    ranks: tuple[int, ...] = (16, 32)
    loops: tuple[str, ...] = ("ours", "reference")
    device: str = "cuda"
    warmup: int = 5
    steps: int = 20
    batch: int = 1
    options: Options = field(default_factory=Options)
    vram_budget_gb: float | None = None
    inference: bool = True
    inference_precisions: tuple[str, ...] = ("bf16",)
    sample_steps: int | None = None  # None: each model's usual count
    sample_repeats: int = 3
    smoke: bool = False
    profile_steps: int = 0  # >0: profile that many more steps after the timed ones (benchmarks/profile.py)


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def train_row(plan: Plan, spec: ArchSpec, precision: str, rank: int, loop: str, flops: dict | None,
              peak_tflops: float | None) -> dict:
    device = torch.device(plan.device)
    row = {"kind": "train", "arch": spec.key, "resolution": spec.resolution, "precision": precision, "rank": rank,
           "alpha": 2 * rank, "targets": "style", "loop": loop, "batch": plan.batch, "warmup": plan.warmup,
           "steps": plan.steps, "variant": plan.options.variant(spec.arch) if loop == "ours" else "example"}
    ckpt = plan.options.resolved_ckpt(device) if loop == "ours" else False
    for attempt in range(2):
        parts = step = None
        try:
            vae_dtype = torch.float32 if (loop == "reference" and spec.arch == "sdxl") else None  # the SDXL example's VAE
            encoders = loop == "reference" or not plan.options.offload_frozen
            parts = build_parts(spec, precision, device, vae=encoders, text_encoders=encoders, vae_dtype=vae_dtype)
            if loop == "ours":
                step = OursStep(parts, rank, plan.options, plan.batch, grad_ckpt=ckpt)
            else:
                step = ReferenceStep(parts, rank, plan.batch, grad_ckpt=ckpt)
            with MemoryProbe(device) as probe:
                timing = time_steps(step, device, plan.warmup, plan.steps)
            row.update(timing, **probe.report(), options=step.describe(), status="ok")
            if plan.profile_steps:  # after the timed steps and outside the memory probe: neither is perturbed
                row["profile"] = profile_steps(step, device, plan.profile_steps)
            budget = plan.vram_budget_gb
            if (loop == "ours" and not ckpt and plan.options.grad_ckpt == "auto" and budget and device.type == "cuda"
                    and row["peak_reserved_mb"] > budget * 1024 and attempt == 0):
                ckpt = True  # over the budget: the auto rule turns checkpointing on and measures again
                row["ckpt_reason"] = f"peak {row['peak_reserved_mb'] / 1024:.1f} GiB without, over {budget:g} GiB"
                continue
            break
        except Exception as err:  # a row that fails must not end the run (the GPU slot is short)
            oom = _is_oom(err)
            row.update(status="oom" if oom else f"error: {type(err).__name__}: {err}"[:500])
            if not oom:
                row["traceback"] = traceback.format_exc(limit=6)
            retry = oom and not ckpt and attempt == 0 and (loop == "reference" or plan.options.grad_ckpt == "auto")
            if not retry:
                break
            ckpt = True
            row["ckpt_reason"] = "out of memory without"
        finally:
            del step
            if parts is not None:
                parts.release()
            if loop == "ours" and plan.options.compile:
                torch._dynamo.reset()  # compiled graphs keep the old model's tensors alive
            free_memory(device)
    if row.get("status") == "ok":
        row["images_per_s"] = row["steps_per_s"] * plan.batch
        if flops:
            row["train_flops_per_step"] = flops["train"]  # already for plan.batch samples
            row["achieved_tflops"] = row["train_flops_per_step"] * row["steps_per_s"] / 1e12
            row["mfu"] = row["achieved_tflops"] / peak_tflops if peak_tflops else None
    return row


def inference_row(plan: Plan, spec: ArchSpec, precision: str, folder: Path) -> dict:
    import logging

    device = torch.device(plan.device)
    row = {"kind": "inference", "arch": spec.key, "resolution": spec.resolution, "precision": precision}
    parts = None
    quiet = logging.getLogger("diffusers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No LoRA keys associated to NoneType (text encoder)": none exist here
    try:
        parts = build_parts(spec, precision, device, vae=True)  # prompt embeddings are precomputed: no text encoders
        steps = plan.sample_steps or spec.sample_steps
        with MemoryProbe(device) as probe:
            row.update(run_inference(parts, plan.ranks[0], folder / f"{spec.key}-{precision}", steps, plan.sample_repeats))
        row.update(probe.report(), status="ok")
    except Exception as err:
        row.update(status="oom" if _is_oom(err) else f"error: {type(err).__name__}: {err}"[:500],
                   traceback=traceback.format_exc(limit=6))
    finally:
        quiet.setLevel(level)
        if parts is not None:
            parts.release()
        free_memory(device)
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """ours ÷ reference steps/s (and peak memory) for every ours variant measured next to a reference row."""
    ok = [r for r in rows if r["kind"] == "train" and r["status"] == "ok"]
    refs = {(r["arch"], r["precision"], r["rank"]): r for r in ok if r["loop"] == "reference"}
    out = []
    for ours in (r for r in ok if r["loop"] == "ours"):
        ref = refs.get((ours["arch"], ours["precision"], ours["rank"]))
        if ref is None:
            continue
        peak_ref = ref.get("peak_reserved_mb", ref.get("peak_rss_mb"))
        peak_ours = ours.get("peak_reserved_mb", ours.get("peak_rss_mb"))
        out.append({"arch": ours["arch"], "precision": ours["precision"], "rank": ours["rank"],
                    "variant": ours.get("variant", "default"), "speedup": ours["steps_per_s"] / ref["steps_per_s"],
                    "memory_ratio": peak_ours / peak_ref if peak_ref else None})
    return out


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_results(paths: list[Path]) -> dict:
    """Several results files (slices of one matrix) as one; the environment and command of each are kept."""
    from benchmarks.report import check_goals

    merged: dict = {"rows": [], "runs": []}
    for path in paths:
        part = load_results(path)
        merged["rows"] = merge_rows(merged["rows"], part.get("rows", []))
        merged["runs"].append({k: part.get(k) for k in ("command", "date", "environment", "mode")})
        merged.update({k: part.get(k) for k in ("mode", "environment", "command", "date")})
    if len(paths) > 1:
        merged["command"] = " ; ".join(str(r["command"]) for r in merged["runs"])
    merged["ratios"] = ratios(merged["rows"])
    if merged.get("mode") != "smoke":
        merged["goals"] = check_goals(merged)
    return merged


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """New rows replace old rows with the same identity (arch, precision, rank, loop / inference)."""
    def key(r):
        return (r["kind"], r["arch"], r["precision"], r.get("rank"), r.get("loop"), r.get("variant"))

    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in new})
    return list(merged.values())


def run_plan(plan: Plan, out: Path, markdown_path: Path | None = None, append: bool = False, command: str = "",
             log=print, specs: dict[str, ArchSpec] | None = None) -> dict:
    """Run ``plan``; write ``out`` (JSON) after every row and the markdown tables at the end.

    ``specs``: architectures by key that are not among the named ones (benchmarks/fullwidth.py's).
    """
    import datetime as dt
    import tempfile

    from benchmarks.dryrun import step_flops
    from benchmarks.report import check_goals, markdown
    from trainer.atomic import write_text

    results = load_results(out) if append else {}
    env = environment(plan.device)
    results.update(mode="smoke" if plan.smoke else "full", command=command, environment=env,
                   date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    rows: list[dict] = list(results.get("rows", []))

    def save(row: dict) -> None:
        rows[:] = merge_rows(rows, [row])
        results["rows"], results["ratios"] = rows, ratios(rows)
        if not plan.smoke:
            results["goals"] = check_goals(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(results, indent=1, default=str))

    folder = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    for key in plan.archs:
        spec = (specs or {}).get(key) or get_spec(key)
        flops = {rank: step_flops(spec, rank, plan.batch) for rank in plan.ranks} if plan.precisions else {}
        for precision in plan.precisions:
            for rank in plan.ranks:
                for loop in plan.loops:
                    t0 = time.perf_counter()
                    row = train_row(plan, spec, precision, rank, loop, flops[rank], env["peak_bf16_tflops"])
                    save(row)
                    log(f"{key} {precision} r{rank} {loop}: {row['status']}"
                        + (f", {row['steps_per_s']:.3f} steps/s" if row["status"] == "ok" else "")
                        + f" [{time.perf_counter() - t0:.0f} s]")
        if plan.inference:
            for precision in plan.inference_precisions:
                t0 = time.perf_counter()
                row = inference_row(plan, spec, precision, folder)
                save(row)
                log(f"{key} {precision} inference: {row['status']} [{time.perf_counter() - t0:.0f} s]")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(markdown_path, markdown(results))
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    return results
