"""``python -m benchmarks …`` = ``python -m trainer bench …`` (same flags; see trainer/cli_bench.py)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from trainer import cli_bench
    from trainer.errors import UserError

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=cli_bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_bench.add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv, args.command_prefix = argv, "python -m benchmarks"
    try:
        return cli_bench.run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
