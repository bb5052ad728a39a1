"""`samkd` in a process of its own, with faults the tests need to provoke.

usage: python patched_extract.py [--no-space-check] [--hold-join FILE] -- ARGS...

--no-space-check  skip the free-space check, so that the disk fills up midway
--hold-join FILE  before joining each teacher's shards, wait until FILE exists (at most
                  120 s): the extraction holds its lock and a live temporary file meanwhile
ARGS are those of `samkd`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import samkd.features.join
import samkd.features.writer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-space-check", action="store_true")
    parser.add_argument("--hold-join", type=Path)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    if options.no_space_check:
        samkd.features.writer.ensure_free_space = lambda *args, **kwargs: None  # type: ignore
    if options.hold_join is not None:
        join_teacher = samkd.features.join._join_teacher
        flag: Path = options.hold_join

        def held_join_teacher(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + 120
            while not flag.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            return join_teacher(*args, **kwargs)

        samkd.features.join._join_teacher = held_join_teacher  # type: ignore[assignment]
    from samkd.cli import app

    arguments = options.args[1:] if options.args[:1] == ["--"] else options.args
    app(arguments, prog_name="samkd")


if __name__ == "__main__":
    main()
