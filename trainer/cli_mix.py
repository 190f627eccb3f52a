"""``python -m trainer mix``: render a weighted mix of LoRAs, bake it to one file, draw a comparison grid.

    python -m trainer mix --base demo:sd15 --lora A.safetensors:0.7 --lora B.safetensors:0.3 \\
        --prompt "a red circle" --seed 1 --out mix.png [--bake mix.safetensors [--bake-rank 8]] \\
        [--grid 0,0.25,0.5,0.75,1 [--grid-second 0,1] [--grid-out grid.png]]
    python -m trainer mix --base demo:sd15 --lora run-step000200.safetensors --lora run-step000400.safetensors \
        --grid-each --grid-prompt "zkstyle, a cat" --grid-prompt "zkstyle, a house" --grid-out steps.png

Every input is checked before the base is loaded; user errors end in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from trainer.atomic import save_image
from trainer.errors import UserError
from trainer.mix_weights import WEIGHT_RANGE, outside_range, parse_weight, parse_weights
from trainer.steps import lora_label

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


@dataclass(frozen=True)
class LoraArg:
    path: Path
    weight: float


def parse_lora(text: str) -> LoraArg:
    """``PATH[:WEIGHT]`` (weight 1 when left out; a Windows drive letter is not a weight)."""
    path, weight = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail and "\\" not in tail:
        path, weight = head, parse_weight(tail, f"--lora {text}: the weight after ':'")
    return LoraArg(Path(path), weight)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="demo:sd15|demo:sdxl|demo:flux, a diffusers folder, a .safetensors "
                   "checkpoint or a hub id: the model the LoRAs were made for")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a .safetensors LoRA and its weight (default 1); repeat for a mix")
    p.add_argument("--prompt", default="", help="text prompt (add the LoRAs' trigger words yourself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: the base's studio.json, else 8 on demo bases, 25 elsewhere)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the base's studio.json, else 3.5 for FLUX, 5 elsewhere)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the base's native size)")
    p.add_argument("--out", help="write the rendered mix here (.png/.jpg/.webp)")
    p.add_argument("--bake", "--merge-to", dest="bake", metavar="FILE.safetensors",
                   help="also write the mix as one LoRA file (exact unless --bake-rank)")
    p.add_argument("--bake-rank", type=int, default=None, help="compress the baked LoRA to this rank by SVD")
    p.add_argument("--grid", metavar="W1,W2,...", help="comparison grid over these weights of the first LoRA")
    p.add_argument("--grid-second", metavar="W1,W2,...", help="rows of the grid: weights of the second LoRA")
    p.add_argument("--grid-out", help="grid image path (default: <out>_grid.png)")
    p.add_argument("--grid-each", action="store_true",
                   help="instead of --grid: the base, then each --lora alone at its weight, side by side (e.g. the "
                        "steps of one run)")
    p.add_argument("--grid-prompt", action="append", default=[], metavar="PROMPT",
                   help="a row of the --grid-each grid; repeat for more (default: --prompt)")
    p.add_argument("--fuse", action="store_true", help="fuse the mix into the base weights before sampling (faster)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


@dataclass(frozen=True)
class _Plan:
    loras: list[LoraArg]
    grid: list[float] | None
    grid_second: list[float] | None
    grid_out: Path | None
    grid_each: bool = False


def _plan(args: argparse.Namespace) -> _Plan:
    """Check every flag up front and report all problems at once."""
    problems = []
    loras = []
    for text in args.lora:
        try:
            lora = parse_lora(text)
        except UserError as err:
            problems.append(str(err))
            continue
        if lora.path.is_dir():
            own = lora.path / "lora.safetensors"  # a run folder
            problems.append(f"--lora {lora.path}: a folder; give its LoRA file" +
                            (f", e.g. --lora {own}" if own.is_file() else " (.safetensors)"))
        elif ".safetensors:" in lora.path.name.lower():
            problems.append(f"--lora {text}: one weight after the file name, as FILE.safetensors:0.7")
        elif lora.path.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"--lora {lora.path}: only .safetensors LoRA files are accepted (pickled "
                            f"{lora.path.suffix} files can run code when loaded)")
        elif lora.path.suffix.lower() != ".safetensors":
            problems.append(f"--lora {lora.path}: not a .safetensors file (a LoRA file ends in .safetensors)")
        elif not lora.path.is_file():
            problems.append(f"--lora {lora.path}: file not found")
        loras.append(lora)
    grid = grid_second = grid_out = None
    try:
        grid = parse_weights(args.grid, "--grid") if args.grid else None
        grid_second = parse_weights(args.grid_second, "--grid-second") if args.grid_second else None
    except UserError as err:
        problems.append(str(err))
    if (grid or grid_second) and not loras:
        problems.append("--grid needs at least one --lora")
    if grid_second and len(loras) < 2:
        problems.append("--grid-second needs a second --lora (its weights are the grid's rows)")
    if grid_second and not grid:
        problems.append("--grid-second needs --grid (the first LoRA's weights are the columns)")
    for flag, value in (("--out", args.out), ("--grid-out", args.grid_out)):
        if value and (Path(value).suffix.lower() not in IMAGE_SUFFIXES or value.endswith(("/", "\\"))
                      or Path(value).is_dir()):
            problems.append(f"{flag} {value}: use an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    if args.bake and Path(args.bake).suffix.lower() != ".safetensors":
        problems.append(f"--bake {args.bake}: the baked LoRA must end in .safetensors")
    if args.bake and not loras:
        problems.append("--bake needs at least one --lora")
    if args.bake_rank is not None and args.bake_rank < 1:
        problems.append(f"--bake-rank {args.bake_rank}: must be at least 1")
    if args.bake_rank is not None and not args.bake:
        problems.append("--bake-rank needs --bake FILE.safetensors")
    if args.steps is not None and args.steps < 1:
        problems.append(f"--steps {args.steps}: must be at least 1")
    if args.grid_each and grid:
        problems.append("--grid-each and --grid are two kinds of grid: give one")
    if args.grid_each and not loras:
        problems.append("--grid-each needs at least one --lora")
    if args.grid_prompt and not args.grid_each:
        problems.append("--grid-prompt is a row of --grid-each: add --grid-each")
    if grid or args.grid_each:
        grid_out = Path(args.grid_out) if args.grid_out else (
            Path(args.out).with_name(Path(args.out).stem + "_grid.png") if args.out else None)
        if grid_out is None:
            problems.append(f"{'--grid' if grid else '--grid-each'} needs --grid-out or --out (the grid goes next to it)")
    if not (args.out or args.bake or grid or args.grid_each):
        problems.append("nothing to do: give --out (render), --bake (write the mix) and/or --grid / --grid-each")
    if problems:
        raise UserError("; ".join(problems))
    return _Plan(loras, grid, grid_second, grid_out, args.grid_each)


def run(args: argparse.Namespace) -> int:
    from trainer.bases import base_sampling_defaults
    from trainer.mixing import Column, MixSession, bake, comparison_grid, side_by_side

    plan = _plan(args)
    if outside := outside_range([lora.weight for lora in plan.loras] + (plan.grid or []) + (plan.grid_second or [])):
        low, high = WEIGHT_RANGE  # allowed here, for the curious; a typo is said before minutes of rendering
        print(f"warning: weight {outside[0]:g} is outside {low:g} to {high:g} (the Mix tab's range): a style LoRA "
              "turns the picture to noise far past it", file=sys.stderr)
    session = MixSession(args.base, device=args.device)
    demo = args.base.strip().startswith("demo")
    tuned = base_sampling_defaults(args.base)  # a demo base's own steps/guidance (studio.json)
    steps = args.steps or tuned.get("steps", 8 if demo else 25)
    if args.guidance is not None:
        guidance = args.guidance
    else:
        guidance = tuned.get("guidance", 3.5 if session.arch == "flux" else 5.0)
    weights = {}
    columns = [Column("base", None, 0.0)]  # --grid-each: the base, then each file alone
    for lora in plan.loras:
        info = session.add_lora(lora.path)
        weights[info.name] = weights.get(info.name, 0.0) + lora.weight
        label = lora_label(lora.path)
        columns.append(Column(f"{label} x{lora.weight:g}", info.name, lora.weight))
        print(info.summary())
        if info.ignored_keys:
            print(f"warning: {info.name}: ignored keys: {', '.join(info.ignored_keys)}", file=sys.stderr)
    session.set_weights(weights)
    names = [i.name for i in session.loras]
    if args.out:
        if args.fuse:
            session.fuse()
        image = session.render(args.prompt, args.seed, steps, guidance, size=args.size)
        save_image(image, args.out)
        print(f"wrote {args.out} ({image.width}x{image.height}, seed {args.seed}, {steps} steps)")
    if plan.grid:
        second = (names[1], plan.grid_second) if plan.grid_second else None
        grid = comparison_grid(session, names[0], plan.grid, args.prompt, args.seed, steps, guidance, second=second)
        save_image(grid, plan.grid_out)
        print(f"wrote {plan.grid_out} ({len(plan.grid)} x {len(plan.grid_second or [0])} renders)")
    if plan.grid_each:
        prompts = args.grid_prompt or [args.prompt]
        grid = side_by_side(session, columns, prompts, args.seed, steps, guidance)
        save_image(grid, plan.grid_out)
        print(f"wrote {plan.grid_out} ({len(columns)} columns x {len(prompts)} prompts)")
    if args.bake:
        Path(args.bake).parent.mkdir(parents=True, exist_ok=True)
        report = bake(session, weights, args.bake, rank=args.bake_rank)
        how = "exact" if report.method == "concat" else f"SVD, relative error {report.relative_error:.4f}"
        print(f"wrote {report.path} ({report.layout} layout, rank {report.rank}, {report.layers} layers, {how})")
    return 0
