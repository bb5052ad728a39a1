"""The run tab: a training run folder's logged terms, curves, summary and settings, read again
whenever its `metrics.jsonl` changes (a run still writing it)."""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samkd.errors import UsageError
from samkd.evaluate.spec import RUN_SETTINGS
from samkd.inspect import loss_terms, plot_run, summarize_records

METRICS_FILE = "metrics.jsonl"
# Positions in the log rather than measurements: not plotted.
NOT_TERMS = ("step", "epoch")
TRAIN, VAL = "train", "val"

# pyplot keeps global state: one figure at a time, whichever session asks.
_PLOT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Term:
    """One logged number: its name, the kind of record it is in, and its values."""

    name: str
    kind: str
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class RunSnapshot:
    """What the run tab shows of a run folder at one moment."""

    folder: Path
    records: int
    terms: list[Term]
    summary: dict[str, Any]
    settings: str
    curves: np.ndarray | None

    @property
    def term_names(self) -> list[str]:
        return [term.name for term in self.terms]


def change_token(folder: Path) -> tuple[int, int] | None:
    """What changes when the run appends to its log: the file's mtime and size."""
    try:
        stat = (folder / METRICS_FILE).stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a `metrics.jsonl`: a last line still being written (no newline
    yet) waits for the next read."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    try:
        return [json.loads(line) for line in complete.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: line {error.lineno} is not JSON: {error.msg}") from None


def logged_terms(records: list[dict[str, Any]]) -> list[Term]:
    """Every number the run logs, as curves over steps: the loss terms first (as `samkd
    inspect` plots them), then the training records' other numbers, then the validation
    records' (a name in both kinds, e.g. lambda_kd, is plotted from the training records)."""
    order: dict[str, str] = {name: TRAIN for name in loss_terms(records)}
    for kind in (TRAIN, VAL):
        for record in records:
            if record.get("kind") != kind:
                continue
            for name, value in record.items():
                if name not in NOT_TERMS and _is_number(value):
                    order.setdefault(name, kind)
    terms = []
    for name, kind in order.items():
        points = [
            (record["step"], float(record[name]))
            for record in records
            if record.get("kind") == kind and _is_number(record.get(name))
        ]
        terms.append(Term(name, kind, [step for step, _ in points], [v for _, v in points]))
    return terms


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def plot_terms(records: list[dict[str, Any]], terms: list[Term]) -> np.ndarray | None:
    """One panel per term (`samkd inspect`'s curves), as an `H x W x 3` image; None
    without terms. Validation terms are named `val/...` in the log, as `plot_run` expects,
    except the ones in both kinds, which come from the training records."""
    if not terms:
        return None
    with _PLOT_LOCK, tempfile.TemporaryDirectory(prefix="samkd-view-") as folder:
        path = plot_run(records, Path(folder) / "curves.png", [term.name for term in terms])
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))


def read_run(folder: Path, plot: bool = True) -> RunSnapshot:
    """The run folder as it is now. Raises `UsageError` for a folder without a log."""
    if not (folder / METRICS_FILE).is_file():
        raise UsageError(f"{folder}: not a training run folder (no {METRICS_FILE})")
    records = read_records(folder / METRICS_FILE)
    terms = logged_terms(records)
    settings = folder / RUN_SETTINGS
    return RunSnapshot(
        folder=folder,
        records=len(records),
        terms=terms,
        summary=summarize_records(folder, records),
        settings=settings.read_text() if settings.is_file() else "",
        curves=plot_terms(records, terms) if plot else None,
    )
