"""A small extraction run in a process of its own, so that tests can SIGKILL it.

usage: python extract_script.py OUTPUT [--sleep SECONDS] [--rank R --world-size W --no-join]
                                [--pseudo-masks]
       python extract_script.py --serve
Prints "ready" once imports are done, then the writer's message, then "done".
--pseudo-masks: vit_h also writes pseudo-masks (`feature_helpers.pseudo_masks_for`).
--serve: once imported, read one command line (OUTPUT and options, as above) per line of
stdin and run each in a child forked from this process, which then starts at once (a new
interpreter spends seconds importing); prints "started PID" when it forks and
"ended PID CODE" when the child ends (CODE: its exit status, or -SIGNAL), the child's own
lines in between.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from feature_helpers import KILL_PLAN, PSEUDO_MASKS, make_plan, write_all  # noqa: E402

from samkd.features import open_for_extraction  # noqa: E402


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--no-join", action="store_true")
    parser.add_argument("--pseudo-masks", action="store_true")
    return parser


def extract(args: argparse.Namespace) -> None:
    plan = make_plan(**KILL_PLAN, pseudo_masks=PSEUDO_MASKS if args.pseudo_masks else None)
    with open_for_extraction(
        args.output, plan, rank=args.rank, world_size=args.world_size
    ) as writer:
        print(writer.message, flush=True)
        write_all(writer, batch_size=2, sleep=args.sleep)
        writer.finish(join=False if args.no_join else None)
    print("done", flush=True)


def serve() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        args = parser().parse_args(shlex.split(line))
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                extract(args)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(f"started {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"ended {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    args = parser().parse_args()
    print("ready", flush=True)
    extract(args)


if __name__ == "__main__":
    main()
