"""The full-size models' code paths on CPU, before a GPU session spends its minutes on them.

The tiny smoke models share the code but not the dimensions (FLUX's 3072-wide fused LoRA layout,
SDXL's two text encoders at full width, T5-XXL's 4096). This runs the real full-size specs at
128 px through both training loops and the sampling rows; FLUX keeps its full width but only one
double and one single block, and T5 one layer, so it fits a laptop's memory. Path check, not speed::

    python -m benchmarks.fullwidth --arch flux --precisions bf16,nf4 --out outputs/fullwidth-flux.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from benchmarks import archs

RESOLUTION = 128


def fullwidth_spec(arch: str) -> archs.ArchSpec:
    """The full-size spec of ``arch`` at 128 px (FLUX: 1 + 1 blocks, T5 with 1 layer, 64 tokens)."""
    full = archs.FULL_SPECS[{"sd15": "sd15@512", "sdxl": "sdxl@1024", "flux": "flux@512"}[arch]]
    spec = replace(full, key=f"{arch}@{RESOLUTION}-fullwidth", resolution=RESOLUTION)
    if arch != "flux":
        return spec
    denoiser = replace(spec.denoiser, config={**spec.denoiser.config, "num_layers": 1, "num_single_layers": 1})
    clip, t5 = spec.text_encoders
    t5 = replace(t5, config={**t5.config, "num_layers": 1, "num_decoder_layers": 1})
    return replace(spec, denoiser=denoiser, text_encoders=(clip, t5), text_len=64)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness import Plan, run_plan

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fullwidth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("sd15", "sdxl", "flux"), required=True)
    parser.add_argument("--precisions", default="bf16", help="comma list of fp32,bf16,fp16,nf4")
    parser.add_argument("--out", required=True, help="results JSON")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    spec = fullwidth_spec(args.arch)
    plan = Plan(archs=(spec.key,), precisions=tuple(args.precisions.split(",")), ranks=(16,), device="cpu",
                warmup=1, steps=1, inference_precisions=("bf16",), sample_steps=2, sample_repeats=1, smoke=True)
    results = run_plan(plan, Path(args.out), command="python -m benchmarks.fullwidth " + " ".join(argv),
                       log=lambda line: print(line, file=sys.stderr, flush=True), specs={spec.key: spec})
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    for row in failed:
        print(f"{row['kind']} {row.get('precision')} {row.get('loop', '')}: {row['status']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
