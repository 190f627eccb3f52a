"""``python -m trainer check-data``: look a data folder over before training it (see trainer.dataset_check)."""

from __future__ import annotations

import argparse
from functools import partial

from trainer.bases import default_resolution, parse_base
from trainer.config import RESOLUTION_RULE, TrainConfig, valid_resolution
from trainer.dataset_check import (check_bare_captions, check_captions, check_images, check_uncaptioned, file_facts, load_caption_reader,
                                   shown_name, token_count)
from trainer.errors import ImageError, UserError
from trainer.scan import scan_dataset
from trainer.trigger import with_trigger


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the folder you would pass to train --data")
    parser.add_argument("--resolution", type=int, default=None,
                        help="the training resolution to judge picture sizes against (default: --base's own size, "
                             "as train uses; without --base %d)" % TrainConfig.resolution)
    parser.add_argument("--base", default="", help="also count caption tokens in this base's tokenizer (a demo "
                                                   "base, a diffusers folder or a cached hub id)")
    parser.add_argument("--trigger", default="", help="the trigger word training puts first in captions")
    parser.epilog = ("Prints what would make the LoRA worse (copies of one picture, pictures too small or too "
                     "wide, too few, captions too long for --base's text encoder); exit code 1 when it found "
                     "something, 0 when not.")


def run(args: argparse.Namespace) -> int:
    if args.base:
        parse_base(args.base)  # a base that does not exist is the error train would give, not "captions not checked"
    if args.resolution is None:
        args.resolution = default_resolution(args.base) if args.base else TrainConfig.resolution
    if not valid_resolution(args.resolution):
        raise UserError(f"--resolution {args.resolution}: must be {RESOLUTION_RULE} (train takes the same)")
    scan = scan_dataset(args.data)
    facts, unreadable = [], list(scan.skipped)
    for item in scan.items:
        try:
            facts.append(file_facts(shown_name(item.path, args.data), item.path))
        except ImageError as err:
            unreadable.append((shown_name(item.path, args.data), str(err).split(": ", 1)[-1]))
    skipped = {name for name, _ in unreadable}  # training skips them: their captions are no finding
    items = [item for item in scan.items if shown_name(item.path, args.data) not in skipped]
    findings = check_images(facts, args.resolution)
    findings += check_uncaptioned([shown_name(item.path, args.data) for item in items if item.from_file_name])
    findings += check_bare_captions([(shown_name(item.path, args.data), item.caption) for item in items
                                     if not item.from_file_name], args.trigger or "")
    if args.base:
        reader = load_caption_reader(args.base)
        if reader is None:
            print(f"captions not checked: no tokenizer of {args.base} at hand (give a demo base, a diffusers "
                  "folder or a hub id in the Hugging Face cache)")
        else:
            captions = [(shown_name(item.path, args.data), with_trigger(item.caption, args.trigger))
                        for item in items]
            findings += check_captions(captions, partial(token_count, reader.tokenizer), reader.limit, reader.encoder)
    for name, reason in unreadable:
        print(f"skipped {name}: {reason}")
    for finding in findings:
        print(f"- {finding.line()}")
    verdict = f"{len(findings)} thing(s) to look at" if findings else "nothing to fix"
    print(f"{len(facts)} picture(s) looked over for training at {args.resolution} px: {verdict}")
    return 1 if findings else 0
