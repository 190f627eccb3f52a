"""Command line for captioning: ``python -m trainer caption`` and ``python -m captioning``.

``add_arguments`` + ``run`` are wired into the trainer CLI by the lead; ``main``
is the stand-alone entry point. User errors are raised as
:class:`trainer.errors.UserError` so the caller prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from captioning.folder import CaptionReport, caption_folder
from captioning.postprocess import CaptionOptions
from captioning.registry import available_captioners, get_captioner
from trainer.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the caption options to ``parser`` (a sub-command parser or a fresh one)."""
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset folder (images and N_name subfolders)")
    parser.add_argument(
        "--captioner",
        default="auto",
        metavar="NAME",
        help=f"one of {', '.join(available_captioners())} (default auto: best model found, else filename)",
    )
    parser.add_argument(
        "--captioner-model",
        metavar="PATH",
        help="local model folder (or a hub id already in the HF cache); nothing is downloaded",
    )
    parser.add_argument("--trigger", default="", metavar="WORD", help="trigger word added to every caption")
    parser.add_argument("--trigger-position", choices=("prepend", "append"), default="prepend")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .txt captions (default: keep them)")
    parser.add_argument(
        "--remove-phrase",
        action="append",
        default=[],
        metavar="TEXT",
        help="remove this phrase from captions, e.g. the style's name (repeatable)",
    )
    parser.add_argument("--max-length", type=int, default=0, metavar="N", help="max words per caption (0 = no limit)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per model call (default 4)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the captioning model runs")
    parser.add_argument("--threshold", type=float, default=0.35, help="wd14: minimum tag confidence (default 0.35)")
    parser.add_argument(
        "--exclude-tags", default="", metavar="TAGS", help="wd14: comma-separated tags never to write"
    )


def _tqdm_progress():
    """A progress callback drawing a tqdm bar on stderr, and a function closing it."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc="captioning", file=sys.stderr)
        bar.update(done - bar.n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def summary(report: CaptionReport) -> str:
    """One line for the terminal; per-file skip reasons follow on their own lines."""
    line = (
        f"captions: {len(report.written)} written, {len(report.kept)} kept, {len(report.skipped)} skipped"
        + (f" (captioner: {report.backend})" if report.backend else "")
        + (" — cancelled" if report.cancelled else "")
    )
    if report.kept:
        line += "; existing captions were kept (use --overwrite to replace them)"
    return "\n".join([line] + [f"  skipped {name}: {reason}" for name, reason in report.skipped])


def run(args: argparse.Namespace) -> int:
    """Caption ``args.data``; prints a summary. Returns 0, or 130 when interrupted.

    Raises:
        UserError: unknown captioner, missing model, bad folder or option (exit code 2 upstream).
    """
    options = CaptionOptions(
        trigger=args.trigger,
        trigger_position=args.trigger_position,
        remove_phrases=tuple(args.remove_phrase),
        max_length=args.max_length,
        overwrite=args.overwrite,
    )
    captioner = get_captioner(
        args.captioner,
        device=args.device,
        model_path=args.captioner_model,
        threshold=args.threshold,
        exclude_tags=tuple(t.strip() for t in args.exclude_tags.split(",") if t.strip()),
    )
    update, close_bar = _tqdm_progress()
    try:
        report = caption_folder(args.data, captioner, options, batch_size=args.batch_size, progress=update)
    except KeyboardInterrupt:
        print("captioning interrupted; captions written so far are complete files", file=sys.stderr)
        return 130
    finally:
        close_bar()
        captioner.close()
    print(summary(report))
    if report.fallback_reason:
        print(f"note: {report.fallback_reason}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m captioning``: parse, run, and turn user errors into one line + exit 2."""
    parser = argparse.ArgumentParser(prog="python -m captioning", description="Write <image>.txt captions.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
