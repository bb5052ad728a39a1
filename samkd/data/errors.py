"""Errors raised for bad input data, and the raise-or-skip policy applied to them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from loguru import logger

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[OnError, ...] = ("raise", "skip")


class DataError(ValueError):
    """A file in the dataset cannot be used.

    The message is always one line, ``"<path>: <problem>"``, so that it can be logged,
    counted and shown to a user as is.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


def check_on_error(on_error: str) -> OnError:
    """Return ``on_error`` if it is a known policy, else raise ``ValueError``."""
    if on_error == "raise":
        return "raise"
    if on_error == "skip":
        return "skip"
    raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")


def handle_error(error: DataError, on_error: OnError, consequence: str) -> str:
    """Raise ``error`` under ``"raise"``; under ``"skip"`` log it and return its message.

    ``consequence`` says what is left out (``"image skipped"``, ``"mask skipped"``) and is
    appended to the logged warning only, so the returned message stays the bare error.
    """
    if on_error == "raise":
        raise error
    message = str(error)
    logger.warning("{} ({})", message, consequence)
    return message


def summarize_skipped(messages: Iterable[str]) -> str:
    """One line saying how many items were skipped, counting repeated messages once.

    Load-time skips are reported again each time a sample is loaded (every epoch), so
    the same message may arrive several times.
    """
    unique = sorted(set(messages))
    if not unique:
        return "no items skipped"
    noun = "item" if len(unique) == 1 else "items"
    return f"skipped {len(unique)} {noun}; first: {unique[0]}"
