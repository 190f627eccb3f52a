"""Command line: ``python -m trainer {train,demo-model,demo-data,caption,export,mix,bench}``.

User errors print one line on stderr and exit with code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _quiet_libraries() -> None:
    """Library chatter (deprecations, 'no LoRA keys for text encoder') is not for artists."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


def _demo_model(args: argparse.Namespace) -> int:
    from trainer.models import tiny

    out = tiny.save(args.arch, args.out, seed=args.seed)
    print(f"wrote a tiny {args.arch} base (random weights) to {out}; train on it with --base {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.reexport import reexport

    for path in reexport(args.run, args.format):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from trainer import cli_train

    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train, mix and export style LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)

    cli_train.add_arguments(sub.add_parser("train", help="train a LoRA"))

    demo = sub.add_parser("demo-model", help="write a tiny base model as a diffusers folder")
    demo.add_argument("--arch", choices=("sd15", "sdxl", "flux"), required=True)
    demo.add_argument("--out", required=True)
    demo.add_argument("--seed", type=int, default=0)

    export = sub.add_parser("export", help="re-export a run's latest checkpoint in another layout")
    export.add_argument("--run", required=True, help="run folder (outputs/<run>)")
    export.add_argument("--format", choices=("kohya", "diffusers", "comfy"), default="kohya")

    try:
        from captioning import cli as caption_cli

        caption_cli.add_arguments(sub.add_parser("caption", help="write <image>.txt captions"))
    except ImportError:
        caption_cli = None
    from trainer import demo_data

    demo_data.add_arguments(sub.add_parser("demo-data", help="write a captioned demo style set"))
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    from trainer.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"demo-model": _demo_model, "export": _export}
    try:
        if args.command == "train":
            from trainer import cli_train

            return cli_train.run(args)
        if args.command == "caption":
            from captioning import cli as caption_cli

            return caption_cli.run(args)
        if args.command == "demo-data":
            from trainer import demo_data

            return demo_data.run(args)
        return handlers[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
