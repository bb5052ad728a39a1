"""`python -m samkd.demo [WORKDIR] [--fast]`: the end-to-end demo (see `samkd.demo.run`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samkd.demo.run import run_demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m samkd.demo",
        description="Train a teacher, distil a student from it and compare them, on generated "
        "data with nothing to download.",
    )
    parser.add_argument("workdir", nargs="?", default=".samkd-demo", type=Path, help="work folder")
    parser.add_argument(
        "--fast",
        "--smoke",
        action="store_true",
        help="a tiny version (seconds) that checks the pipeline, not the numbers",
    )
    args = parser.parse_args(argv)
    summary = run_demo(args.workdir, fast=args.fast)
    # A full run where distillation did not help is a failure worth an exit status.
    return 0 if args.fast or summary["distillation_helped"] else 1


if __name__ == "__main__":
    sys.exit(main())
