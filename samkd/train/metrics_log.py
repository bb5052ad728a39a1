"""`metrics.jsonl` (one JSON object per record) and, when installed, TensorBoard events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loguru import logger

from samkd.files import atomic_path


class MetricsLog:
    """Appends records to `<run>/metrics.jsonl`; mirrors numbers to TensorBoard if available.

    On resume, records after the checkpoint's step are dropped first, so a resumed run's log
    reads as if it had never been interrupted.
    """

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed; logging to metrics.jsonl only")
            else:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only records with `step <= step` (atomically rewritten)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        with atomic_path(self.path) as temporary:
            temporary.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a `metrics.jsonl` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
