"""Prompt following of a demo base, judged by :mod:`trainer.judge`, next to random weights.

    python benchmarks/demo_quality.py --arch sd15 [--prompts 32 --seeds 4] [--base demo:sd15] [--json outputs/q.json]

Generates ``eval_prompts(prompts)`` x ``seeds`` images (one prompt per colour x
shape pair, backgrounds drawn by the prompt seed) at the base's default steps
and guidance (``studio.json`` in the folder; override with --steps/--guidance),
judges background colour, object colour and shape, and does the same for
``demo-random:<arch>``. Prints one line per base and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generate(base, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 32):
    """One image per prompt; prompt i gets generator seed ``seed * 1000 + i``.

    ``guidance`` is the base's guidance strength (true CFG for a FLUX base without guidance embeds).
    """
    import torch

    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator("cpu").manual_seed(seed * 1000 + start + i) for i in range(len(chunk))]
        with torch.no_grad():
            out = base.pipe(prompt=chunk, num_inference_steps=steps, height=64, width=64, generator=gens,
                            **base.sampling_kwargs(guidance, batch=len(chunk)))
        images += out.images
    return images


def evaluate(base_name: str, n_prompts: int, seeds: int, steps: int | None = None, guidance: float | None = None,
             save_dir: Path | None = None) -> dict:
    """Judge scores of ``base_name`` over ``n_prompts`` x ``seeds`` generations."""
    from trainer.config import Precision
    from trainer.judge import eval_prompts, score
    from trainer.models import load_base

    t0 = time.time()
    base = load_base(base_name, Precision.FP32, "cpu")
    defaults = base.sampling_defaults()  # FLUX without guidance embeds: "guidance" is its true-CFG scale
    steps = steps or int(defaults.get("steps", 20))
    if guidance is None:
        guidance = float(defaults.get("guidance", 5.0))
    pairs = eval_prompts(n_prompts)
    judged = []
    for seed in range(seeds):
        images = generate(base, [p for p, _ in pairs], seed, steps, guidance)
        judged += [(image, spec) for image, (_, spec) in zip(images, pairs)]
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(save_dir / f"{base.arch}-s{seed}-{i:02d}.png")
    result = score(judged)
    true_cfg = "true_cfg_scale" in base.sampling_kwargs(guidance)
    result.update(base=base_name, steps=steps, guidance=1.0 if true_cfg else guidance, seconds=round(time.time() - t0, 1),
                  true_cfg_scale=guidance if true_cfg else None)
    return result


def write_default(base_name: str, arch: str, guidance: float) -> None:
    """Store ``guidance`` as the sampling default in the base folder's studio.json."""
    from trainer.bases import parse_base
    from trainer.models import demo_folder

    ref = parse_base(base_name)
    folder = Path(ref.value) if ref.kind == "folder" else demo_folder(ref)
    path = folder / "studio.json"
    studio = json.loads(path.read_text())
    studio["true_cfg_scale" if arch == "flux" and "true_cfg_scale" in studio else "guidance"] = guidance
    path.write_text(json.dumps(studio, indent=2) + "\n")
    print(f"default guidance {guidance} written to {path}")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl", "flux"), required=True)
    parser.add_argument("--base", help="base to judge (default demo:<arch>)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, help="default: the base's studio.json")
    parser.add_argument("--guidance", type=float, help="default: the base's studio.json")
    parser.add_argument("--sweep", help="comma-separated guidance values to try first (16 prompts x 1 seed each); "
                        "the best (background + object) is used for the full run")
    parser.add_argument("--write-default", action="store_true",
                        help="with --sweep: store the best guidance in the base folder's studio.json")
    parser.add_argument("--no-random", action="store_true", help="skip the demo-random:<arch> comparison")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--save-images", help="folder to write the generated images into")
    parser.add_argument("--json", help="output file (default outputs/demo_quality_<arch>.json)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    bases = [args.base or f"demo:{args.arch}"] + ([] if args.no_random else [f"demo-random:{args.arch}"])
    sweep = []
    if args.sweep:
        for value in (float(v) for v in args.sweep.split(",")):
            r = evaluate(bases[0], 16, 1, args.steps, value)
            sweep.append({"guidance": value, "background": r["background"], "object": r["object"], "shape": r["shape"]})
            print(f"sweep guidance {value}: background {r['background']:.1%} object {r['object']:.1%}")
        args.guidance = max(sweep, key=lambda r: r["background"] + r["object"])["guidance"]
        if args.write_default:
            write_default(bases[0], args.arch, args.guidance)
    results = []
    for name in bases:
        save = Path(args.save_images) / name.replace(":", "_").replace("/", "_") if args.save_images else None
        r = evaluate(name, args.prompts, args.seeds, args.steps, args.guidance if name == bases[0] else None, save)
        results.append(r)
        shape = "n/a" if r["shape"] is None else f"{r['shape']:.1%}"
        print(f"{name}: background {r['background']:.1%}  object {r['object']:.1%}  shape {shape}  "
              f"(n={r['n']}, {r['steps']} steps, guidance {r['guidance']}, {r['seconds']} s)")
    report = {"arch": args.arch, "prompts": args.prompts, "seeds": args.seeds, "device": "cpu",
              "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sweep": sweep, "results": results}
    out = Path(args.json or Path(__file__).resolve().parents[1] / "outputs" / f"demo_quality_{args.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
