"""A small extraction run as a separate process, so that tests can SIGKILL it.

usage: python extract_script.py OUTPUT [--sleep SECONDS] [--rank R --world-size W --no-join]
                                [--pseudo-masks]
Prints "ready" once imports are done, then the writer's message, then "done".
--pseudo-masks: vit_h also writes pseudo-masks (`feature_helpers.pseudo_masks_for`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from feature_helpers import KILL_PLAN, PSEUDO_MASKS, make_plan, write_all  # noqa: E402

from samkd.features import open_for_extraction  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output", type=Path)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--no-join", action="store_true")
    parser.add_argument("--pseudo-masks", action="store_true")
    args = parser.parse_args()
    print("ready", flush=True)
    plan = make_plan(**KILL_PLAN, pseudo_masks=PSEUDO_MASKS if args.pseudo_masks else None)
    with open_for_extraction(
        args.output, plan, rank=args.rank, world_size=args.world_size
    ) as writer:
        print(writer.message, flush=True)
        write_all(writer, batch_size=2, sleep=args.sleep)
        writer.finish(join=False if args.no_join else None)
    print("done", flush=True)


if __name__ == "__main__":
    main()
