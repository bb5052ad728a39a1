"""`samkd extract` under torchrun, with a short process-group timeout and a slow join.

usage: python -m torch.distributed.run ... torchrun_extract.py TIMEOUT_S JOIN_DELAY_S ARGS...

Every collective of the job times out after TIMEOUT_S seconds, and joining each teacher's
shards takes JOIN_DELAY_S seconds longer than it does; ARGS are those of `samkd`. A rank that
waited in a collective while rank 0 joins would time out and fail the job.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

import torch.distributed

import samkd.features.join


def main() -> None:
    timeout, delay = float(sys.argv[1]), float(sys.argv[2])
    init_process_group = torch.distributed.init_process_group
    join_teacher = samkd.features.join._join_teacher

    def with_short_timeout(*args: Any, **kwargs: Any) -> None:
        init_process_group(*args, **kwargs, timeout=datetime.timedelta(seconds=timeout))

    def slow_join_teacher(*args: Any, **kwargs: Any) -> None:
        time.sleep(delay)
        join_teacher(*args, **kwargs)

    torch.distributed.init_process_group = with_short_timeout
    samkd.features.join._join_teacher = slow_join_teacher  # type: ignore[assignment]
    from samkd.cli import app

    app(sys.argv[3:], prog_name="samkd")


if __name__ == "__main__":
    main()
