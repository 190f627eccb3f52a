"""Goals of issue 7 checked against measured rows, and the markdown tables of a results file."""

from __future__ import annotations

# (metric, arch, precision, comparison, target, what it means)
GOALS = (
    ("speedup", "sdxl@1024", "bf16", ">=", 2.0, "steps/s ours ÷ reference"),
    ("speedup", "flux@512", "bf16", ">=", 2.0, "steps/s ours ÷ reference"),
    ("mfu", "sdxl@1024", "bf16", ">=", 0.35, "MFU of ours (dense bf16 peak)"),
    ("mfu", "flux@512", "bf16", ">=", 0.35, "MFU of ours (dense bf16 peak)"),
    ("peak_gb", "flux@512", "nf4", "<=", 8.0, "peak VRAM of ours (max_memory_reserved)"),
    ("peak_gb", "sdxl@1024", "fp16", "<=", 10.0, "peak VRAM of ours (max_memory_reserved)"),
    ("peak_gb", "sd15@512", "fp16", "<=", 4.0, "peak VRAM of ours (max_memory_reserved)"),
    ("reweight_ms", "*", "bf16", "<", 50.0, "slider re-weight (set_adapters), median"),
    ("lora3_overhead_pct", "*", "bf16", "<=", 10.0, "3 unfused LoRAs over base sampling, %"),
)


def _measure(metric: str, arch: str, precision: str, rank, rows: list[dict], ratio_rows: list[dict]):
    """(value, variant) of the best measured "ours" variant for a goal; (None, None) when not measured."""
    if metric == "speedup":
        hits = [(r["speedup"], r.get("variant")) for r in ratio_rows
                if (r["arch"], r["precision"], r["rank"]) == (arch, precision, rank)]
        return max(hits, key=lambda h: h[0]) if hits else (None, None)
    if metric in ("mfu", "peak_gb"):
        hits = [r for r in rows if r["kind"] == "train" and r["loop"] == "ours" and r["status"] == "ok"
                and (r["arch"], r["precision"], r["rank"]) == (arch, precision, rank)]
        if metric == "mfu":
            hits = [(r["mfu"], r.get("variant")) for r in hits if r.get("mfu") is not None]
            return max(hits, key=lambda h: h[0]) if hits else (None, None)
        hits = [(r["peak_reserved_mb"] / 1024, r.get("variant")) for r in hits if r.get("peak_reserved_mb") is not None]
        return min(hits, key=lambda h: h[0]) if hits else (None, None)
    hits = [r for r in rows if r["kind"] == "inference" and r["status"] == "ok"
            and (r["arch"], r["precision"]) == (arch, precision)]
    return (hits[0].get(metric), None) if hits else (None, None)


def check_goals(results: dict) -> list[dict]:
    """One line per goal and rank/architecture: measured value, met or missed by how much, or owed."""
    from benchmarks.archs import FULL_SPECS

    rows, ratio_rows = results.get("rows", []), results.get("ratios", [])
    ranks = sorted({r["rank"] for r in rows if r["kind"] == "train"}) or [16, 32]
    out = []
    for metric, arch, precision, cmp, target, meaning in GOALS:
        archs = list(FULL_SPECS) if arch == "*" else [arch]
        for a in archs:
            for rank in (ranks if metric in ("speedup", "mfu", "peak_gb") else [None]):
                value, variant = _measure(metric, a, precision, rank, rows, ratio_rows)
                line = {"goal": f"{meaning} {cmp} {target:g}", "metric": metric, "arch": a, "precision": precision,
                        "rank": rank, "target": target, "value": value, "variant": variant}
                if value is None:
                    line["status"] = "owed (not measured)"
                else:
                    met = value >= target if cmp == ">=" else (value < target if cmp == "<" else value <= target)
                    gap = abs(value - target) / target * 100
                    line["status"] = "met" if met else f"missed by {gap:.0f}%"
                    if not met:
                        line["limits"] = what_limits(metric, a, precision, rank, variant, rows)
                out.append(line)
    return out


def what_limits(metric: str, arch: str, precision: str, rank, variant, rows: list[dict]) -> str:
    """For a missed goal, the measured reason in one phrase: where the time or the memory went."""
    def row(loop: str, variant_: str | None):
        return next((r for r in rows if r["kind"] == "train" and r["status"] == "ok" and r["loop"] == loop
                     and (r["arch"], r["precision"], r["rank"]) == (arch, precision, rank)
                     and (variant_ is None or r.get("variant", "default") == variant_)), None)

    if metric == "peak_gb":
        r = row("ours", variant)
        if r is None or r.get("resident_mb") is None:
            return ""
        resident, peak = r["resident_mb"] / 1024, r["peak_reserved_mb"] / 1024
        return (f"resident before the first step (weights, LoRA, cache) {resident:.1f} GiB; the step adds "
                f"{peak - resident:.1f} GiB (activations, gradients, optimizer state; allocator reserve); "
                f"gradient checkpointing {r.get('options', {}).get('grad_ckpt', '?')}")
    if metric in ("speedup", "mfu"):
        parts = []
        for loop in (("ours", "reference") if metric == "speedup" else ("ours",)):
            r = row(loop, variant if loop == "ours" else None)
            prof = (r or {}).get("profile")
            if prof:
                kinds = list(prof["categories_ms"].items())
                parts.append(f"{loop}: {prof['step_ms']:.0f} ms/step, GPU busy {_f(prof.get('busy_share'), 0, 100, '%')}"
                             f", {_shares(kinds, prof.get('busy_ms'), 3)}")
        return "; ".join(parts) or "not profiled: run the row with --profile 3"
    return ""


# A knob becomes a default where it is this much faster (or leaner) and not worse on the other axis.
WIN = 1.05
LEAN = 0.90


def knob_verdicts(rows: list[dict]) -> list[dict]:
    """Each measured ours variant against the ours default of the same arch, precision and rank.

    ``verdict``: ``faster`` (≥ 5 % more steps/s, ≤ 5 % more peak memory), ``leaner`` (≥ 10 % less peak
    memory, ≤ 5 % slower), ``no gain``, or ``worse`` (slower by more than 5 %, or more memory for nothing).
    ``warmup_ratio`` (the untimed warm-up steps, first step included) shows what compiling, and
    recompiling for each new bucket shape, costs up front.
    """
    ok = [r for r in rows if r["kind"] == "train" and r["loop"] == "ours" and r["status"] == "ok"]
    defaults = {(r["arch"], r["precision"], r["rank"]): r for r in ok if r.get("variant", "default") == "default"}
    out = []
    for r in ok:
        base = defaults.get((r["arch"], r["precision"], r["rank"]))
        if base is None or r is base:
            continue
        speed = r["steps_per_s"] / base["steps_per_s"]
        peak_key = "peak_reserved_mb" if base.get("peak_reserved_mb") else "peak_rss_mb"
        memory = r[peak_key] / base[peak_key] if base.get(peak_key) and r.get(peak_key) else None
        if speed >= WIN and (memory is None or memory <= WIN):
            verdict = "faster"
        elif memory is not None and memory <= LEAN and speed >= 1 / WIN:
            verdict = "leaner"
        elif speed < 1 / WIN or (memory is not None and memory > WIN):
            verdict = "worse"
        else:
            verdict = "no gain"
        warmup = r["warmup_s"] / base["warmup_s"] if r.get("warmup_s") and base.get("warmup_s") else None
        out.append({"arch": r["arch"], "precision": r["precision"], "rank": r["rank"], "variant": r["variant"],
                    "speed_ratio": speed, "memory_ratio": memory, "warmup_ratio": warmup, "verdict": verdict})
    return sorted(out, key=lambda v: (v["variant"], v["arch"], v["precision"], v["rank"]))


def _f(value, digits=2, scale=1.0, suffix=""):
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}{suffix}"


def _g(value):
    return "–" if value is None else f"{value:.3g}"


def _shares(parts: list[tuple[str, float]], whole: float, most: int) -> str:
    if not whole:
        return "–"
    return " · ".join(f"{name} {ms / whole:.0%}" for name, ms in parts[:most])


def profile_table(train_rows: list[dict], cuda: bool) -> list[str]:
    """Where each profiled row's step time goes (``--profile``): the answer to "what limits it"."""
    profiled = [r for r in train_rows if r.get("profile")]
    if not profiled:
        return []
    clock = "GPU" if cuda else "CPU"
    lines = ["", f"Where the time goes (`--profile`: {clock} time of each operator's own work, summed by kind; "
             + ("busy = share of the step the GPU was working, the rest is host overhead: Python, launches, syncs"
                if cuda else "busy = share of the step inside operators, the rest is Python and framework overhead")
             + "):", "",
             "| arch | precision | rank | loop (variant) | ms/step | busy | by kind (share of busy time) | top operators |",
             "|" + "---|" * 8]
    for r in profiled:
        prof = r["profile"]
        kinds = list(prof["categories_ms"].items())
        top = ", ".join(f"`{name.removeprefix('aten::')}` {ms:.1f} ms" for name, ms in prof["top_ops_ms"][:3])
        lines.append(f"| {r['arch']} | {r['precision']} | {r['rank']} | {r['loop']} ({r.get('variant', '–')}) | "
                     f"{_f(prof.get('step_ms'), 1)} | {_f(prof.get('busy_share'), 0, 100, '%')} | "
                     f"{_shares(kinds, prof.get('busy_ms'), 4)} | {top} |")
    return lines


def markdown(results: dict) -> str:
    env, rows = results.get("environment", {}), results.get("rows", [])
    smoke = results.get("mode") == "smoke"
    cuda = str(env.get("device", "")).startswith("cuda")
    mem = "peak VRAM alloc / reserved (GiB)" if cuda else "peak host RSS (GiB, whole process)"
    lines = [f"Mode: **{results.get('mode')}**{' (tiny models on CPU: checks the harness, not speed)' if smoke else ''}; "
             f"device: **{env.get('device_name')}**; "
             + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v) + f"; python {env.get('python')}.",
             "", f"Command: `{results.get('command')}`", ""]
    lines += ["| arch | precision | rank | loop (variant) | steps/s (median) | steps/s (p95) | images/s | " + mem +
              " | TFLOP/s | MFU | grad ckpt | status |", "|" + "---|" * 12]
    train = sorted((r for r in rows if r["kind"] == "train"),
                   key=lambda r: (r["arch"], r["precision"], r["rank"], r["loop"], r.get("variant", "")))
    for r in train:
        if cuda:
            peak = f"{_f(r.get('peak_allocated_mb'), 2, 1 / 1024)} / {_f(r.get('peak_reserved_mb'), 2, 1 / 1024)}"
        else:
            peak = _f(r.get("peak_rss_mb"), 2, 1 / 1024)
        ckpt = str(r.get("options", {}).get("grad_ckpt", "–"))
        lines.append(f"| {r['arch']} | {r['precision']} | {r['rank']} | {r['loop']} ({r.get('variant', '–')}) | "
                     f"{_f(r.get('steps_per_s'), 3)} | "
                     f"{_f(r.get('steps_per_s_p95'), 3)} | {_f(r.get('images_per_s'), 3)} | {peak} | "
                     f"{_g(r.get('achieved_tflops'))} | {_f(r.get('mfu'), 1, 100, '%')} | {ckpt} | {r['status']} |")
    if results.get("ratios"):
        lines += ["", "| arch | precision | rank | ours variant | speedup ours ÷ reference | "
                  "peak memory ours ÷ reference |",
                  "|---|---|---|---|---|---|"]
        for q in results["ratios"]:
            lines.append(f"| {q['arch']} | {q['precision']} | {q['rank']} | {q.get('variant', '–')} | "
                         f"{_f(q['speedup'], 2, 1, '×')} | "
                         f"{_f(q.get('memory_ratio'), 2, 1, '×')} |")
    verdicts = knob_verdicts(rows)
    if verdicts:
        lines += ["", "Knobs against the engine's defaults (ours rows only; a knob becomes a default where it is "
                  f"faster by ≥ {WIN - 1:.0%} or leaner by ≥ {1 - LEAN:.0%} without losing on the other):", "",
                  "| variant | arch | precision | rank | steps/s ÷ default | peak memory ÷ default | "
                  "warm-up ÷ default | verdict |", "|" + "---|" * 8]
        for v in verdicts:
            lines.append(f"| {v['variant']} | {v['arch']} | {v['precision']} | {v['rank']} | "
                         f"{_f(v['speed_ratio'], 2, 1, '×')} | {_f(v['memory_ratio'], 2, 1, '×')} | "
                         f"{_f(v['warmup_ratio'], 1, 1, '×')} | {v['verdict']} |")
    lines += profile_table(train, cuda)
    inf = [r for r in rows if r["kind"] == "inference"]
    if inf:
        lines += ["", "| arch | precision | steps | base s/img | 1 LoRA | 3 LoRAs | fused mix | 3-LoRA overhead | "
                  "re-weight ms (median / max) | load s (first / mean) | fuse s | status |", "|" + "---|" * 12]
        for r in sorted(inf, key=lambda r: (r["arch"], r["precision"])):
            lines.append(f"| {r['arch']} | {r['precision']} | {r.get('sample_steps', '–')} | {_f(r.get('base_s'), 3)} | "
                         f"{_f(r.get('lora1_s'), 3)} | {_f(r.get('lora3_s'), 3)} | {_f(r.get('fused_s'), 3)} | "
                         f"{_f(r.get('lora3_overhead_pct'), 1, 1, '%')} | {_f(r.get('reweight_ms'), 2)} / "
                         f"{_f(r.get('reweight_max_ms'), 2)} | {_f(r.get('load_first_s'), 3)} / "
                         f"{_f(r.get('load_mean_s'), 3)} | "
                         f"{_f(r.get('fuse_s'), 3)} | {r['status']} |")
    if not smoke:
        lines += ["", "| goal | arch | precision | rank | measured (best variant) | status | what limits it (measured) |",
                  "|---|---|---|---|---|---|---|"]
        for g in check_goals(results):
            best = f" ({g['variant']})" if g.get("variant") else ""
            lines.append(f"| {g['goal']} | {g['arch']} | {g['precision']} | {g['rank'] or '–'} | "
                         f"{_f(g['value'], 3)}{best} | {g['status']} | {g.get('limits') or '–'} |")
    return "\n".join(lines) + "\n"
