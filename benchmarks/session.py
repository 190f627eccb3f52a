"""One call on the GPU machine: the benchmark slices in order of importance, inside a deadline.

A lent GPU gives a session about 15 minutes of device time (start-up included) and 10 minutes per
command, so the matrix is run as slices, most important first, in one call::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu-wheels/*.whl && export PYTHONPATH=/tmp/site && python3 -m benchmarks.session --out $OUT --seconds 480

Each slice is its own ``python -m`` process (a crash or a hung kernel costs that slice, not the
session) writing its own results file in a work folder (the harness saves after every row, so a slice
cut at the deadline keeps the rows it finished). A ``preflight`` smoke run on CUDA comes first; if it
fails, the rest is not started. Only three files come back from the GPU machine (it returns at most
eight), rewritten after every slice:

- ``results.json``: the rows of every slice merged, with each slice's command, date and environment;
- ``checks.json``: the preflight's smoke rows (never rendered into the docs);
- ``session.json``: what happened to each slice (done, cut, failed, owed), its time and its log's tail.

Back on the CPU machine::

    python -m trainer bench --render <files_at>/results.json --out docs/benchmarks.json --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.atomic import write_text


@dataclass(frozen=True)
class Slice:
    """A named piece of the work: ``argv`` follows ``python -m``.

    ``results``: which merged file the command's rows go to, written through its own ``--out`` in the work
    folder (``slices``: results.json, rows for docs/benchmarks.md; ``checks``: checks.json, smoke rows never
    rendered into the docs; empty: the command takes no ``--out``).
    ``gate``: when it fails, nothing after it is started (the same breakage would fail them all).
    """

    name: str
    argv: tuple[str, ...]
    why: str
    results: str = "slices"
    gate: bool = False


def bench(*args: str) -> tuple[str, ...]:
    return ("benchmarks", "--device", "cuda", *args)


# A quick check that this machine's libraries run the engine on CUDA at all, then in order of importance:
# the speed goals, the memory goals, sampling, the GPU-only tests, then each knob's A/B, then the rest.
SLICES = (
    Slice("preflight", ("benchmarks", "--smoke", "--device", "cuda", "--precisions", "bf16,nf4", "--ranks", "16",
                         "--inference-precisions", "bf16"),
          "tiny models on CUDA, every loop and precision path: imports, NF4 kernels, fused AdamW, offload",
          results="checks", gate=True),
    Slice("speed", bench("--archs", "sdxl@1024,flux@512", "--precisions", "bf16", "--ranks", "16", "--no-inference",
                         "--profile", "3"),
          "ours vs reference steps/s and MFU (goal: 2x, 35 %), and where each loop's step time goes"),
    Slice("flux-nf4", bench("--archs", "flux@512", "--precisions", "nf4", "--ranks", "16", "--loops", "ours",
                            "--vram-budget-gb", "8", "--no-inference"), "FLUX@512 NF4 peak (goal: 8 GiB)"),
    Slice("sdxl-fp16", bench("--archs", "sdxl@1024", "--precisions", "fp16", "--ranks", "16", "--loops", "ours",
                             "--vram-budget-gb", "10", "--no-inference"), "SDXL@1024 fp16 peak (goal: 10 GiB)"),
    Slice("sd15-fp16", bench("--archs", "sd15@512", "--precisions", "fp16", "--ranks", "16", "--loops", "ours",
                             "--vram-budget-gb", "4", "--no-inference"), "SD1.5@512 fp16 peak (goal: 4 GiB)"),
    Slice("inference", bench("--no-train", "--archs", "sd15@512,sdxl@1024,flux@512", "--sample-repeats", "2"),
          "sampling with 0/1/3 LoRAs, fused, re-weight (goals: 50 ms, 10 %), cold load"),
    Slice("gpu-tests", ("pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu_training.py",
                        "tests/test_captioning_models.py"),
          "the tests marked gpu (skipped on CPU machines): training per precision, captioning in half precision",
          results=""),
    Slice("compile", bench("--archs", "sdxl@1024,flux@512", "--precisions", "bf16", "--ranks", "16", "--loops", "ours",
                           "--compile", "--no-inference"), "regional torch.compile against the speed slice"),
    Slice("buckets", bench("--archs", "sdxl@1024,flux@512", "--precisions", "bf16", "--ranks", "16", "--loops", "ours",
                           "--buckets", "3", "--no-inference"), "three aspect buckets, eager: the shape changes alone"),
    Slice("compile-buckets", bench("--archs", "sdxl@1024,flux@512", "--precisions", "bf16", "--ranks", "16",
                                   "--loops", "ours", "--compile", "--buckets", "3", "--no-inference"),
          "three aspect buckets with regional compile: the recompiles (warm-up) and the steady state"),
    Slice("channels-last", bench("--archs", "sd15@512,sdxl@1024", "--precisions", "bf16", "--ranks", "16",
                                 "--loops", "ours", "--channels-last", "--no-inference"), "UNet channels_last A/B"),
    Slice("flash", bench("--archs", "sdxl@1024,flux@512", "--precisions", "bf16", "--ranks", "16", "--loops", "ours",
                         "--attn", "flash", "--no-inference"), "PyTorch's FlashAttention kernel forced, against sdpa"),
    Slice("keep-encoders", bench("--archs", "flux@512", "--precisions", "bf16", "--ranks", "16", "--loops", "ours",
                                 "--keep-encoders", "--no-inference"), "what offloading the frozen encoders saves"),
    Slice("rest", bench("--archs", "flux@1024,sd15@512", "--precisions", "bf16", "--ranks", "16", "--no-inference"),
          "the remaining bf16 rows"),
)


LOG_TAIL = 60  # lines of each slice's output kept in session.json


def run_session(slices: tuple[Slice, ...], out: Path, seconds: float, floor_s: float = 60.0,
                python: str = sys.executable, work: Path | None = None, log=print) -> dict:
    """Run ``slices`` in order until ``seconds`` have passed; a slice needs ``floor_s`` left to start.

    Slices write into ``work`` (a temporary folder by default); ``out`` gets results.json, checks.json
    and session.json after every slice. Returns the session summary.
    """
    deadline = time.monotonic() + seconds
    work = Path(work or tempfile.mkdtemp(prefix="bench-session-"))
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seconds": seconds, "slices": []}
    gate_failed = ""
    for piece in slices:
        results, log_path = work / (piece.results or "other") / f"{piece.name}.json", work / f"{piece.name}.log"
        results.parent.mkdir(parents=True, exist_ok=True)
        command = [python, "-m", *piece.argv, *(("--out", str(results)) if piece.results else ())]
        entry = {"name": piece.name, "why": piece.why, "command": command[1:]}
        left = deadline - time.monotonic()
        if gate_failed:
            entry.update(status="owed", reason=f"the {gate_failed} slice failed (its log_tail says why)")
        elif left < floor_s:
            entry.update(status="owed", reason=f"{left:.0f} s left, under the {floor_s:.0f} s a slice needs to start")
        else:
            started = time.monotonic()
            with open(log_path, "w", encoding="utf-8") as sink:
                rc = _run_until(command, sink, left)
            if rc is None:
                entry.update(status="cut", reason="the session's deadline came first; finished rows are kept")
            else:
                entry.update(status="done" if rc == 0 else "failed", returncode=rc)
            entry.update(seconds=round(time.monotonic() - started, 1), rows=_row_count(results),
                         log_tail=_tail(log_path, LOG_TAIL))
            if piece.gate and entry["status"] != "done":
                gate_failed = piece.name
        summary["slices"].append(entry)
        _write_back(work, out, summary)
        log(f"{piece.name}: {entry['status']}" + (f" in {entry['seconds']:.0f} s, {entry['rows']} rows"
                                                  if "seconds" in entry else f" ({entry['reason']})"))
    return summary


def _write_back(work: Path, out: Path, summary: dict) -> None:
    """The files that come back: each results folder merged into one JSON, and the summary."""
    from benchmarks.harness import merge_results

    for folder, name in (("slices", "results.json"), ("checks", "checks.json")):
        files = sorted((work / folder).glob("*.json"))
        if files:  # the commands name the temporary work folder; "<work>" reads better in the docs
            text = json.dumps(merge_results(files), indent=1, default=str)
            write_text(out / name, text.replace(json.dumps(str(work))[1:-1], "<work>"))
    write_text(out / "session.json", json.dumps(summary, indent=1))


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _run_until(command: list[str], sink, seconds: float) -> int | None:
    """Exit code of ``command``, or None when it is still running after ``seconds`` (then its whole process
    group is killed: inductor's compile workers must not outlive the slice)."""
    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def _row_count(results: Path) -> int:
    try:
        return len(json.loads(results.read_text(encoding="utf-8")).get("rows", []))
    except (OSError, ValueError):
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for results.json, checks.json and session.json ($OUT on the GPU machine)")
    parser.add_argument("--seconds", type=float, default=480,
                        help="deadline for the whole session (a device command may run 600 s, the install included)")
    parser.add_argument("--only", help=f"comma list of slices to run, in this order; all: {','.join(s.name for s in SLICES)}")
    args = parser.parse_args(argv)
    chosen = SLICES
    if args.only:  # checked before CUDA, so a typo shows on any machine, not after a GPU start-up
        by_name = {s.name: s for s in SLICES}
        unknown = [n for n in args.only.split(",") if n not in by_name]
        if unknown:
            print(f"error: no slice {unknown[0]!r}; there are {', '.join(by_name)}", file=sys.stderr)
            return 2
        chosen = tuple(by_name[n] for n in args.only.split(","))
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU here: the session's slices are full-size; on CPU run python -m benchmarks --smoke",
              file=sys.stderr)
        return 2
    summary = run_session(chosen, Path(args.out), args.seconds)
    owed = [s["name"] for s in summary["slices"] if s["status"] != "done"]
    print("all slices done" if not owed else f"not done (still owed): {', '.join(owed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
