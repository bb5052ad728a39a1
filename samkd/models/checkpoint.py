"""Reading, checking and writing model weights.

Files are read with `weights_only=True`, so a checkpoint can hold tensors and plain containers
but no arbitrary Python objects. Training checkpoints wrapped as `{"model": ...}` or
`{"state_dict": ...}`, and weights saved from a `DistributedDataParallel` (`module.` prefix),
are unwrapped; a `samkd train` checkpoint (`checkpoints/last.pt`, `checkpoints/best.pt`) reads
as its student's weights, without the distillation adapters.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.overrides import TorchFunctionMode

from samkd.files import atomic_path, existing_folder, format_bytes

WRAPPER_KEYS = ("model", "state_dict")
# What every `samkd train` checkpoint holds: the training step's state dict under "model", in
# which the student's weights are prefixed "student." (beside "objective.": the adapters).
TRAINING_CHECKPOINT_KEYS = ("model", "progress", "settings")
STUDENT_PREFIX = "student."
# How peft names an adapted linear layer's parts (the adapter is samkd's only one, "default").
LORA_BASE, LORA_A, LORA_B = ".base_layer.", ".lora_A.default.", ".lora_B.default."
DATA_PARALLEL_PREFIX = "module."
WEIGHTS_ONLY_REASON = "WeightsUnpickler error:"
TORCH_ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_MAGIC = b"\x80"
# How many offending keys an error message names, per kind of mismatch.
KEYS_SHOWN = 3

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the model; one-line message."""


class SkippedInit(TorchFunctionMode):
    """Inside: the `torch.nn.init` functions that dispatch to torch-function modes
    (`uniform_`, `normal_`, `constant_`, `kaiming_uniform_`: the default initialisation of
    `nn.Linear` and `nn.Conv2d`) leave their tensor as allocated.

    For a model whose every parameter and persistent buffer a strict `load_state_dict`
    overwrites next: random initialisation of ViT-H takes about 2 s on a CPU, 0.03 s
    without. Buffers that are not in a state dict (pixel statistics, TinyViT's bias indices)
    are computed by ordinary tensor code, which runs as usual.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def load_state_dict_file(path: str | PathLike[str]) -> StateDict:
    """Reads a state dict onto the CPU, unwrapping training checkpoints."""
    return unwrap_state_dict(read_torch_file(path), source=str(path))


def read_torch_file(path: str | PathLike[str]) -> Any:
    """`torch.load(path, weights_only=True)` onto the CPU, with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # Not a weights file fails anywhere in the unpickler (a text file: KeyError or IndexError,
    # depending on its first bytes), so every error of the load means the same.
    except Exception as error:
        reason = _load_failure(error) if _is_torch_file(path) else "neither a zip nor a pickle"
        if path.stat().st_size == 0:
            reason = "the file is empty"
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch weights file: {reason}"
        ) from error


def unwrap_state_dict(loaded: Any, source: str = "state dict") -> StateDict:
    """The state dict inside `loaded`: the student's of a `samkd train` checkpoint; else
    unwraps `{"model": ...}`, `{"state_dict": ...}` and strips a `module.` prefix carried by
    every key."""
    if is_training_checkpoint(loaded):
        loaded = training_student_state(loaded)
    for key in WRAPPER_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise CheckpointError(f"checkpoint {source} holds no state dict of tensors")
    state = {str(key): value for key, value in loaded.items()}
    if state and all(key.startswith(DATA_PARALLEL_PREFIX) for key in state):
        state = {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}
    return state


def training_student_state(checkpoint: Mapping[str, Any]) -> StateDict:
    """The student's weights in a `samkd train` checkpoint, with LoRA adapters merged."""
    state = {
        key.removeprefix(STUDENT_PREFIX): value
        for key, value in checkpoint["model"].items()
        if key.startswith(STUDENT_PREFIX)
    }
    if not any(LORA_A in key for key in state):
        return state
    lora = yaml.safe_load(checkpoint["settings"])["student"]["lora"]
    return merge_lora_state(state, lora["alpha"] / lora["rank"])


def merge_lora_state(state: Mapping[str, torch.Tensor], scaling: float) -> StateDict:
    """A state dict with peft's LoRA layers (`X.base_layer.weight`, `X.lora_A.default.weight`
    `r x in`, `X.lora_B.default.weight` `out x r`) as the plain model's: `X.weight` is
    `W + scaling * B A`."""
    merged = {
        key.replace(LORA_BASE, "."): value
        for key, value in state.items()
        if LORA_A not in key and LORA_B not in key
    }
    for key, down in state.items():
        if LORA_A in key:
            layer = key.split(LORA_A)[0]
            up = state[key.replace(LORA_A, LORA_B)]
            merged[f"{layer}.weight"] = merged[f"{layer}.weight"] + scaling * (up @ down)
    return merged


def is_training_checkpoint(loaded: Any) -> bool:
    """Whether `loaded` (a file's content) is a checkpoint written by `samkd train`."""
    return (
        isinstance(loaded, Mapping)
        and all(key in loaded for key in TRAINING_CHECKPOINT_KEYS)
        and isinstance(loaded["model"], Mapping)
    )


def load_weights(
    model: nn.Module,
    state_dict_or_path: Mapping[str, torch.Tensor] | str | PathLike[str],
    model_type: str,
) -> None:
    """Loads weights strictly into `model` (of type `model_type`, named in errors).

    Absolute positional embeddings and global relative positions saved for another image size
    are interpolated to the model's size, as segment-anything does for fine-tuning.
    """
    if isinstance(state_dict_or_path, Mapping):
        source = "state dict"
        state = unwrap_state_dict(state_dict_or_path, source)
    else:
        source = str(state_dict_or_path)
        state = load_state_dict_file(state_dict_or_path)
    expected = model.state_dict()
    state = _resize_positions(state, expected)
    _check_fits(expected, state, source, model_type)
    model.load_state_dict(state, strict=True)


def check_weights_file(model: nn.Module, path: str | PathLike[str], model_type: str) -> None:
    """Raise the `CheckpointError` that loading `path` into `model` (of type `model_type`; on
    the meta device is enough) would raise, without loading it: for jobs that would fail
    only after hours of other work."""
    expected = model.state_dict()
    state = _resize_positions(load_state_dict_file(path), expected)
    _check_fits(expected, state, str(path), model_type)


def _check_fits(
    expected: Mapping[str, torch.Tensor], state: StateDict, source: str, model_type: str
) -> None:
    mismatch = describe_mismatch(expected, state)
    if not mismatch:
        return
    given, wanted = weights_family(state), weights_family(expected)
    # Naming the families helps most across SAM generations (a SAM 1 file for a SAM 2 type).
    if given and wanted and given != wanted and "SAM 2" in given + wanted:
        raise CheckpointError(
            f"checkpoint {source} holds {given} weights, but model type {model_type!r} is "
            f"{wanted}: {mismatch}"
        )
    raise CheckpointError(f"checkpoint {source} does not fit model type {model_type!r}: {mismatch}")


def weights_family(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which family a state dict's keys are of (SAM 1's ViT, MobileSAM's TinyViT, SAM 2 or
    SAM 2.1), or None when they are of none."""
    if any(key.startswith("sam_mask_decoder.") for key in state):
        return "SAM 2.1" if "no_obj_embed_spatial" in state else "SAM 2"
    if any(key.startswith("image_encoder.layers.") for key in state):
        return "MobileSAM (TinyViT)"
    if any(key.startswith("image_encoder.blocks.") for key in state):
        return "SAM 1 (ViT)"
    return None


def describe_mismatch(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> str:
    """Empty if `given` has exactly the keys and shapes of `expected`, else a one-line summary."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [
        f"{key}: {_shape(given[key])} vs {_shape(expected[key])}"
        for key in expected
        if key in given and given[key].shape != expected[key].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if reshaped:
        parts.append(f"{len(reshaped)} with other shapes, checkpoint vs model ({_first(reshaped)})")
    return ", ".join(parts)


def save_state_dict(
    model: nn.Module | Mapping[str, torch.Tensor], path: str | PathLike[str]
) -> None:
    """Writes `model`'s state dict to `path` atomically: readers never see a partial file.
    Weights holding NaN or infinity are refused (a `CheckpointError`)."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    nonfinite = nonfinite_keys(state)
    if nonfinite:
        raise CheckpointError(
            f"refusing to write {path}: {len(nonfinite)} of {len(state)} tensors hold NaN or "
            f"infinity ({_first(nonfinite)})"
        )
    write_torch_file(state, Path(path))


def write_torch_file(content: Any, path: Path) -> None:
    """`torch.save` under a temporary name, then rename (see `atomic_path`); a write that
    fails (a full disk) is a `CheckpointError` naming the file and the free space, and
    leaves no temporary file."""
    try:
        with atomic_path(path) as temporary:
            torch.save(content, temporary)
    # torch's zip writer reports a failed write as a RuntimeError, the open as an OSError.
    except (RuntimeError, OSError) as error:
        free = format_bytes(shutil.disk_usage(existing_folder(path.parent)).free)
        reason = getattr(error, "strerror", None) or "write failed"
        raise CheckpointError(f"{path}: cannot write: {reason} ({free} free there)") from None


def nonfinite_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of the floating-point tensors that hold a NaN or an infinity."""
    return [
        key
        for key, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not bool(tensor.isfinite().all())
    ]


def _resize_positions(state: StateDict, expected: Mapping[str, torch.Tensor]) -> StateDict:
    resized = dict(state)
    for key, tensor in state.items():
        target = expected.get(key)
        if target is None or target.shape == tensor.shape:
            continue
        if key.endswith("pos_embed") and tensor.ndim == 4:
            resized[key] = _resize_pos_embed(tensor, (target.shape[1], target.shape[2]))
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and tensor.ndim == 2:
            resized[key] = _resize_rel_pos(tensor, target.shape[0])
    return resized


def _resize_pos_embed(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """1 x H x W x C -> 1 x size x C, bicubic."""
    channels_first = pos_embed.permute(0, 3, 1, 2).float()
    resized = F.interpolate(channels_first, size=size, mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype)


def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """L x C -> length x C, linear (as segment-anything's `get_rel_pos`)."""
    channels_first = rel_pos.t()[None].float()
    resized = F.interpolate(channels_first, size=length, mode="linear")
    return resized[0].t().to(rel_pos.dtype)


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:KEYS_SHOWN])
    return shown + ", ..." if len(items) > KEYS_SHOWN else shown


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(size) for size in tensor.shape) or "scalar"


def _is_torch_file(path: Path) -> bool:
    """Whether a file starts as `torch.save` writes (a zip) or as legacy pickles do."""
    with path.open("rb") as file:
        start = file.read(4)
    return start == TORCH_ZIP_MAGIC or start[:1] == PICKLE_PROTOCOL_MAGIC


def _load_failure(error: BaseException) -> str:
    """The gist of a `torch.load` error: its first sentence."""
    text = str(error)
    prefix = ""
    if WEIGHTS_ONLY_REASON in text:
        # torch wraps the actual reason in paragraphs of advice on trusting the file.
        text = text.split(WEIGHTS_ONLY_REASON, 1)[1]
        prefix = "refused by weights-only loading: "
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    first = next((p for p in paragraphs if p), "")
    if not first:
        return f"{type(error).__name__} (empty or truncated file?)"
    return prefix + first.split(". ")[0].rstrip(".")
