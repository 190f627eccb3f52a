"""``python -m trainer check-data``: look a data folder over before training it (see trainer.dataset_check)."""

from __future__ import annotations

import argparse

from trainer.config import TrainConfig
from trainer.data import scan_dataset
from trainer.dataset_check import check_images, file_facts, shown_name
from trainer.errors import ImageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="the folder you would pass to train --data")
    parser.add_argument("--resolution", type=int, default=TrainConfig.resolution,
                        help="the training resolution to judge picture sizes against (default %(default)s)")
    parser.epilog = ("Prints what would make the LoRA worse (duplicates, pictures too small or too wide, too few); "
                     "exit code 1 when it found something, 0 when not. Caption lengths depend on the base's text "
                     "encoder: a training run checks them at its start.")


def run(args: argparse.Namespace) -> int:
    scan = scan_dataset(args.data)
    facts, unreadable = [], list(scan.skipped)
    for item in scan.items:
        try:
            facts.append(file_facts(shown_name(item.path, args.data), item.path))
        except ImageError as err:
            unreadable.append((shown_name(item.path, args.data), str(err).split(": ", 1)[-1]))
    findings = check_images(facts, args.resolution)
    for name, reason in unreadable:
        print(f"skipped {name}: {reason}")
    for finding in findings:
        print(f"- {finding.line()}")
    verdict = f"{len(findings)} thing(s) to look at" if findings else "nothing to fix"
    print(f"{len(facts)} picture(s) looked over for training at {args.resolution} px: {verdict}")
    return 1 if findings else 0
