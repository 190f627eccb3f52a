"""``python -m trainer bench``: speed and memory of training and sampling (docs/benchmarks.md).

    python -m trainer bench --list                        # full-size configs on meta: params, FLOPs (no GPU)
    python -m trainer bench --device cuda --out docs/benchmarks.json --markdown docs/benchmarks-table.md
    python -m trainer bench --smoke --out results.json --markdown table.md   # tiny models on CPU
    python -m trainer bench --render a.json b.json --out docs/benchmarks.json --docs docs/benchmarks.md

The matrix can be run in slices (``--archs flux@512 --precisions nf4 --append``) and merged.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from trainer.errors import UserError

FULL_ARCHS = ("sd15@512", "sdxl@1024", "flux@512", "flux@1024")
TINY_ARCHS = ("sd15@tiny", "sdxl@tiny", "flux@tiny")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny models on CPU: keeps the harness working (no speed claims)")
    mode.add_argument("--list", action="store_true", help="build the full-size models on meta; print params and FLOPs")
    mode.add_argument("--render", metavar="JSON", nargs="+",
                      help="no run: merge results files (slices) into --out (optional) and write --markdown")
    p.add_argument("--device", default=None, help="cuda (default for full runs) or cpu (smoke)")
    p.add_argument("--archs", type=_csv, help=f"comma list; full: {','.join(FULL_ARCHS)}; smoke: {','.join(TINY_ARCHS)}")
    p.add_argument("--precisions", type=_csv,
                   help="comma list of fp32,bf16,fp16,nf4 (default bf16,fp16,nf4; smoke fp32,bf16,nf4)")
    p.add_argument("--ranks", type=_csv, default=("16", "32"), help="LoRA ranks of the style preset (alpha = 2r)")
    p.add_argument("--loops", type=_csv, default=("ours", "reference"), help="ours,reference")
    p.add_argument("--warmup", type=int, help="untimed steps (default 5; smoke 2)")
    p.add_argument("--steps", type=int, help="timed steps (default 20; smoke 2)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="ours: regional torch.compile of the repeated blocks")
    p.add_argument("--channels-last", action="store_true", help="ours: UNet in channels_last")
    p.add_argument("--grad-ckpt", choices=("auto", "on", "off"), default="auto",
                   help="ours: gradient checkpointing (auto: the engine's rule, off until out of memory)")
    p.add_argument("--attn", default="sdpa", help="ours: the engine's attention: sdpa, flash (PyTorch's FlashAttention "
                                                  "kernel) or xformers")
    p.add_argument("--keep-encoders", action="store_true",
                   help="ours: keep VAE/text encoders resident (the engine's offload_frozen: false)")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw8bit"), default="adamw",
                   help="ours: AdamW (fused on CUDA) or bitsandbytes 8-bit / paged (CUDA only)")
    p.add_argument("--buckets", type=int, default=1,
                   help="ours: cycle the steps through N aspect-ratio buckets of about the same area (mixed shapes)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, profile N more and record where a step's time goes (by kind of work)")
    p.add_argument("--vram-budget-gb", type=float, help="ours, grad-ckpt auto: turn checkpointing on above this peak (GiB, reserved)")
    p.add_argument("--no-train", action="store_true", help="skip the training rows")
    p.add_argument("--no-inference", action="store_true", help="skip the sampling rows")
    p.add_argument("--inference-precisions", type=_csv, help="default bf16 (smoke fp32)")
    p.add_argument("--sample-steps", type=int, help="denoising steps per image (default: 30 SD, 28 FLUX; smoke 2)")
    p.add_argument("--sample-repeats", type=int, help="timed images per setting (default 3; smoke 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (smoke default 1: tiny ops gain nothing from more, "
                   "and on a shared CPU spinning threads slow them down 5-10x)")
    p.add_argument("--smoke-resolution", type=int, default=32, help="pixel side for --smoke (tiny models)")
    p.add_argument("--out", help="results JSON (default docs/benchmarks.json; smoke outputs/bench-smoke.json)")
    p.add_argument("--markdown", help="write the tables to this file")
    p.add_argument("--docs", help="put the tables between the results markers of this page (docs/benchmarks.md)")
    p.add_argument("--append", action="store_true", help="merge into an existing --out instead of replacing it")


def _plan(args: argparse.Namespace):
    import torch

    from benchmarks.archs import get_spec
    from benchmarks.harness import Plan
    from benchmarks.ours import ATTENTION, Options
    from benchmarks.parts import PRECISIONS, bucket_shapes

    smoke = args.smoke
    device = args.device or ("cpu" if smoke else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here: full-size benchmarks need one; use --smoke (tiny models on CPU) or --list")
    archs = args.archs or (TINY_ARCHS if smoke else FULL_ARCHS)
    for flag, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--batch", args.batch, 1),
                               ("--sample-steps", args.sample_steps, 1), ("--sample-repeats", args.sample_repeats, 1)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: at least {least}")
    if args.profile < 0:
        raise UserError(f"--profile {args.profile}: the number of steps to profile, 0 (off) or more")
    if args.buckets < 1:
        raise UserError(f"--buckets {args.buckets}: at least 1 (one square shape)")
    for key in archs:
        try:
            spec = get_spec(key)
        except KeyError as err:
            raise UserError(str(err).strip("'\"")) from None
        if not key.endswith("@tiny") and not device.startswith("cuda"):
            raise UserError(f"{key} is full size: it needs --device cuda (on CPU use --smoke or --list)")
        try:
            bucket_shapes(spec, args.buckets)
        except ValueError as err:
            raise UserError(f"--buckets: {err}; use fewer buckets") from None
    precisions = args.precisions or (("fp32", "bf16", "nf4") if smoke else ("bf16", "fp16", "nf4"))
    inference_precisions = args.inference_precisions or (("fp32",) if smoke else ("bf16",))
    bad = [p for p in (*precisions, *inference_precisions) if p not in PRECISIONS]
    if bad:
        raise UserError(f"unknown precision {bad[0]!r}; use {', '.join(PRECISIONS)}")
    if args.optimizer != "adamw" and not device.startswith("cuda"):
        raise UserError(f"--optimizer {args.optimizer} needs CUDA (bitsandbytes' 8-bit optimizers); use adamw on CPU")
    if args.attn not in ATTENTION:
        raise UserError(f"--attn {args.attn!r}: use one of {', '.join(ATTENTION)}")
    try:
        ranks = tuple(int(r) for r in args.ranks)
    except ValueError:
        raise UserError(f"--ranks {','.join(args.ranks)!r}: comma-separated integers, e.g. 16,32") from None
    if any(loop not in ("ours", "reference") for loop in args.loops):
        raise UserError("--loops: ours, reference or both")
    options = Options(compile=args.compile, channels_last=args.channels_last, grad_ckpt=args.grad_ckpt, attn=args.attn,
                      offload_frozen=not args.keep_encoders, optimizer=args.optimizer, buckets=args.buckets)
    plan = Plan(archs=tuple(archs), precisions=() if args.no_train else tuple(precisions), ranks=ranks,
                loops=tuple(args.loops), device=device,
                warmup=args.warmup if args.warmup is not None else (2 if smoke else 5),
                steps=args.steps if args.steps is not None else (2 if smoke else 20), batch=args.batch, options=options,
                vram_budget_gb=args.vram_budget_gb, inference=not args.no_inference,
                inference_precisions=tuple(inference_precisions),
                sample_steps=args.sample_steps if args.sample_steps is not None else (2 if smoke else None),
                sample_repeats=args.sample_repeats if args.sample_repeats is not None else (1 if smoke else 3), smoke=smoke,
                profile_steps=args.profile)
    return plan


def _resize_tiny(resolution: int) -> None:
    """Smoke runs the tiny specs at ``resolution`` px (fewer FLOPs; the code path is the same)."""
    from benchmarks import archs

    if resolution % 32:
        raise UserError(f"--smoke-resolution {resolution}: must be a multiple of 32")
    specs = archs.tiny_specs()
    for key, spec in list(specs.items()):
        specs[key] = replace(spec, resolution=resolution)


def _list(args: argparse.Namespace) -> int:
    from benchmarks.archs import get_spec
    from benchmarks.dryrun import describe, format_listing

    ranks = tuple(int(r) for r in args.ranks)
    for key in args.archs or FULL_ARCHS:
        try:
            spec = get_spec(key)
        except KeyError as err:
            raise UserError(str(err).strip("'\"")) from None
        print(format_listing(describe(spec, ranks)), flush=True)
    return 0


DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:results -->", "<!-- /bench:results -->"


def update_page(page: Path, tables: str) -> None:
    """Replace what lies between the BEGIN/END markers of ``page`` with ``tables``."""
    text = page.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise UserError(f"{page} has no {BEGIN} … {END} markers to put the tables between")
    head, rest = text.split(BEGIN, 1)
    page.write_text(f"{head}{BEGIN}\n{tables}{END}{rest.split(END, 1)[1]}", encoding="utf-8")


def _render(args: argparse.Namespace) -> int:
    from benchmarks.harness import merge_results
    from benchmarks.report import markdown

    sources = [Path(p) for p in args.render]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise UserError(f"--render: no results file {missing[0]}")
    if not (args.markdown or args.out or args.docs):
        raise UserError("--render writes --out (merged JSON), --markdown (tables) and/or --docs (page section)")
    merged = merge_results(sources)
    written = []
    if args.out:
        Path(args.out).write_text(json.dumps(merged, indent=1, default=str), encoding="utf-8")
        written.append(args.out)
    if args.markdown:
        Path(args.markdown).write_text(markdown(merged), encoding="utf-8")
        written.append(args.markdown)
    if args.docs:
        update_page(Path(args.docs), markdown(merged))
        written.append(args.docs)
    print("wrote " + ", ".join(written))
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    if args.markdown and Path(args.markdown).resolve() == DOCS_PAGE:
        raise UserError("--markdown would overwrite docs/benchmarks.md; use --docs docs/benchmarks.md to fill its "
                        "results section, or write the table elsewhere")
    if args.docs and args.smoke:
        raise UserError("--docs is for real runs: smoke numbers (tiny models, CPU) do not belong in the results section")
    if args.list:
        return _list(args)
    if args.render:
        return _render(args)
    if args.smoke:
        _resize_tiny(args.smoke_resolution)
    plan = _plan(args)
    from benchmarks.harness import run_plan

    threads = args.threads or (1 if args.smoke else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out or ("outputs/bench-smoke.json" if args.smoke else "docs/benchmarks.json"))
    argv = getattr(args, "argv", None) or (sys.argv[2:] if sys.argv[1:2] == ["bench"] else None)
    prefix = getattr(args, "command_prefix", "python -m trainer bench")
    command = f"{prefix} " + " ".join(shlex.quote(a) for a in argv) if argv is not None else "(in-process call)"
    try:
        results = run_plan(plan, out, Path(args.markdown) if args.markdown else None, args.append, command,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(previous_threads)
    if args.docs:
        from benchmarks.report import markdown

        update_page(Path(args.docs), markdown(results))
    failed = [r for r in results["rows"] if r["status"] not in ("ok", "oom")]
    print(f"wrote {out}" + (f" and {args.markdown}" if args.markdown else "")
          + (f"; {len(failed)} row(s) failed: see 'status' in the JSON" if failed else ""))
    return 1 if failed else 0
