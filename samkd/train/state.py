"""Training checkpoints (written atomically, read with `weights_only=True`) and RNG state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samkd.errors import UsageError
from samkd.models.checkpoint import nonfinite_keys, read_torch_file, write_torch_file


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states, in types `weights_only` loading accepts."""
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": numpy_name,
            "keys": torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)),
            "pos": int(numpy_pos),
            "has_gauss": int(numpy_has_gauss),
            "gauss": float(numpy_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """`torch.save` under a temporary name, then rename: a crash never leaves half a file."""
    write_torch_file(state, path)


class NonFiniteWeightsError(UsageError):
    """The student's weights hold NaN or infinity: nothing more can be learnt or saved."""


def check_finite_weights(model: torch.nn.Module, step: int, last_checkpoint: Path) -> None:
    """Raise `NonFiniteWeightsError` when `model` holds NaN or infinity, before a checkpoint
    or the export would keep them (a finite loss can still take a step to non-finite weights,
    e.g. with a huge learning rate)."""
    nonfinite = nonfinite_keys(model.state_dict())
    if not nonfinite:
        return
    last = (
        f"the last good checkpoint is {last_checkpoint}"
        if last_checkpoint.is_file()
        else "no checkpoint was written before"
    )
    raise NonFiniteWeightsError(
        f"step {step}: {len(nonfinite)} weight tensors hold NaN or infinity "
        f"({nonfinite[0]}, ...); nothing saved, {last}; lower train.lr or set train.grad_clip"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"{path}: no training checkpoint to resume from")
    state: dict[str, Any] = read_torch_file(path)
    return state
