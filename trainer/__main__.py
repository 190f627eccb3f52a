"""Command line: ``python -m trainer COMMAND``: train, demo-model, demo-data, check-data, caption, export, mix,
bench, queue, pretrain-demo.

User errors print one line on stderr and exit with code 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from trainer.errors import UserError


def _quiet_libraries() -> None:
    """Library chatter (deprecations, 'no LoRA keys for text encoder') is not for artists."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # "Failed to load CPU gemm_4bit_forward from kernels-community" on every run: an optional faster CPU kernel
    # package; NF4 works without it, and nothing else bitsandbytes says at WARNING is for artists
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _quiet_progress_bars() -> None:
    """Download and loading bars; imports diffusers (seconds), so only for commands that load models."""
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass


def _demo_model(args: argparse.Namespace) -> int:
    from trainer.models import tiny

    target = Path(args.out)
    if target.is_file() or (target.is_dir() and any(target.iterdir())):
        raise UserError(f"{target} is {'a file' if target.is_file() else 'not empty'}: a model folder needs a new or "
                        "empty --out")
    try:
        out = tiny.save(args.arch, args.out, seed=args.seed)
    except OSError as err:
        raise UserError(f"cannot write the model to {target} ({err.strerror or err}); pick a writable --out") from None
    print(f"wrote a tiny {args.arch} base (random weights) to {out}; train on it with --base {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.reexport import reexport

    for path in reexport(args.run, args.format, args.step):
        print(path)
        if args.format == "a1111" and not _has_preview(path):
            print("note: its card has no preview picture: the run rendered no sample near that step (train with "
                  "--sample-every N to have them)", file=sys.stderr)
    return 0


def _has_preview(bundle: Path) -> bool:
    import zipfile

    with zipfile.ZipFile(bundle) as archive:
        return any(name.endswith(".preview.png") for name in archive.namelist())


# subcommand -> (module with add_arguments/run, help); modules are imported only when used
COMMANDS = {
    "train": ("trainer.cli_train", "train a LoRA"),
    "caption": ("captioning.cli", "write <image>.txt captions"),
    "mix": ("trainer.cli_mix", "preview, bake or grid a weighted mix of LoRAs"),
    "demo-data": ("trainer.demo_data", "write a captioned demo style set"),
    "check-data": ("trainer.cli_check", "look a data folder over: duplicates, small or cropped pictures"),
    "queue": ("trainer.cli_queue", "queue training runs: add, list, cancel, resume, run"),
    "pretrain-demo": ("trainer.pretrain.cli", "train a tiny demo base from scratch (demo_models/)"),
    "bench": ("trainer.cli_bench", "speed and memory benchmarks (CPU smoke mode, or full size on a GPU)"),
}

LIGHT_COMMANDS = {"check-data", "demo-data"}  # answer in a second: no torch, no diffusers


class OneLineParser(argparse.ArgumentParser):
    """A wrong or missing flag is one ``error:`` line and exit code 2, as every other user error (argparse prints
    the whole usage first); ``--help`` still shows it all. Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(prog="python -m trainer", description="Train, mix and export style LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))
        except ImportError as err:  # a package missing: said in one line when the command is used
            why = f"`python -m trainer {name}` cannot start ({err}); install the requirements: pip install -r requirements.txt"
            sub.add_parser(name, help=f"(unavailable: {err})").set_defaults(unavailable=why)

    demo = sub.add_parser("demo-model", help="write a tiny base model as a diffusers folder")
    demo.add_argument("--arch", choices=("sd15", "sdxl", "flux"), required=True)
    demo.add_argument("--out", required=True)
    demo.add_argument("--seed", type=int, default=0)

    export = sub.add_parser("export", help="re-export a run's latest (or a chosen) checkpoint in another layout")
    export.add_argument("--run", required=True, help="run folder (outputs/<run>)")
    export.add_argument("--format", choices=("kohya", "diffusers", "comfy", "a1111"), default="kohya",
                        help="a1111: the kohya file zipped with its A1111/Forge card (preview image, trigger word) "
                             "as <run>/<run>_a1111.zip (with --step: <run>/export/<run>-step<N>_a1111.zip), to "
                             "unpack into models/Lora")
    export.add_argument("--step", type=int, default=None,
                        help="export the checkpoint of this step to <run>/export/<run>-step<N>.safetensors "
                             "(default: the latest, into the run's own files)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import importlib

    _quiet_libraries()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "unavailable", None):  # its flags are unknown: the module that defines them did not import
        print(f"error: {args.unavailable}", file=sys.stderr)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command not in LIGHT_COMMANDS:
        _quiet_progress_bars()
    handlers = {"demo-model": _demo_model, "export": _export}
    if args.command in COMMANDS:
        return run_command(importlib.import_module(COMMANDS[args.command][0]).run, args)
    return run_command(handlers[args.command], args)


def run_command(command, args: argparse.Namespace) -> int:
    """Run a subcommand: a user error is one ``error:`` line and exit code 2, Ctrl-C is 130."""
    try:
        return command(args)
    except UserError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130


def exit_now(code: int) -> None:
    """Exit with ``code``, skipping interpreter shutdown when this is one process of a multi-process run.

    There the process group's C++ threads can abort shutdown ("terminate called without an active
    exception"), and torchrun would then report a signal instead of this process's own exit code.
    """
    if "trainer.distributed" not in sys.modules:  # no process group without it (and importing it loads torch)
        sys.exit(code)
    from trainer.distributed import world_size_from_env

    if world_size_from_env() <= 1:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
