"""A detector of host-device syncs: operations after which the host waits for the device.

On a GPU, reading a tensor's value on the host (`.item()`, `bool()`, `.tolist()`, `.cpu()`)
waits for every queued kernel, and so do operations whose output size depends on the data
(`nonzero`, boolean-mask indexing, `masked_select`) and blocking copies to or from the device.
The detector records them at the dispatcher (what a tensor op really runs) and at the Python
API (what never reaches the dispatcher for a CPU tensor: `.tolist()`, `.cpu()`), so it works
on the CPU, where nothing actually waits.

On the CPU every tensor is on the host, which the detector allows for in two ways: it ignores
the value checks that some ops make on the host for CPU tensors only (`one_hot`; on CUDA they
are device asserts), and it flags `.to(device)` without `non_blocking=True` when the project's
code calls it (not torch's own, which moves tensors between the devices it was handed). Not
seen on the CPU: indexing a device tensor with a host index tensor, and copies between tensors
already on different devices.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Their output's value or size is read on the host.
SYNCING_OPS = {
    aten._local_scalar_dense,  # item(), bool(), float(), int(), if tensor: ...
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
}
# Synchronous with boolean indices (counted with nonzero inside the kernel).
INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Read the data on the host without going through the dispatcher for a CPU tensor.
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__array__,
}
# Copies that block unless asked not to.
COPIES = {torch.Tensor.to, torch.Tensor.cuda}
FACTORIES_FROM_HOST = {torch.tensor, torch.as_tensor}
# They read their input's values on the host for CPU tensors only (a device assert on CUDA).
CPU_ONLY_CHECKS = {torch.nn.functional.one_hot}


class _State:
    def __init__(self) -> None:
        self.found: list[str] = []
        self.in_cpu_only_check = 0


def _caller() -> str:
    """The innermost frame of the project's code that made the call."""
    for frame in reversed(traceback.extract_stack()):
        ours = "/samkd/" in frame.filename or "/tests/" in frame.filename
        if ours and not frame.filename.endswith("syncs.py"):
            return f"{frame.filename.split('/samkd/')[-1]}:{frame.lineno} {frame.name}"
    return "?"


def _has_bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)
        for index in indices or ()
    )


def _blocking_copy(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict) -> bool:
    """`tensor.to(device)` / `.cuda()` without `non_blocking=True` (`.to(dtype)` is no copy
    between devices)."""
    if kwargs.get("non_blocking") or any(arg is True for arg in args[1:]):
        return False
    if func is torch.Tensor.cuda:
        return True
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, torch.device | str | torch.Tensor) for t in targets)


class _DispatchRecorder(TorchDispatchMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            self.state.found.append(f"{func} at {_caller()}")
        return func(*args, **kwargs)

    def _syncs(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        packet = func.overloadpacket
        if packet in SYNCING_OPS or (packet in INDEXING_OPS and _has_bool_index(args)):
            return not self.state.in_cpu_only_check
        # With tensor repeats and no output size, the size is the sum of the repeats.
        return (
            packet is aten.repeat_interleave
            and func._overloadname != "self_int"
            and kwargs.get("output_size") is None
        )


class _FunctionRecorder(TorchFunctionMode):
    def __init__(self, state: _State) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        by_torch = "/torch/" in sys._getframe(1).f_code.co_filename
        if (
            func in HOST_READS
            or (func in COPIES and not by_torch and _blocking_copy(func, args, kwargs))
            or (func in FACTORIES_FROM_HOST and kwargs.get("device") is not None)
        ):
            self.state.found.append(f"{getattr(func, '__name__', func)} at {_caller()}")
        if func not in CPU_ONLY_CHECKS:
            return func(*args, **kwargs)
        self.state.in_cpu_only_check += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.state.in_cpu_only_check -= 1


@contextmanager
def detect_syncs() -> Iterator[list[str]]:
    """Record every syncing operation run inside the block, as `op at file:line function`."""
    state = _State()
    with _FunctionRecorder(state), _DispatchRecorder(state):
        yield state.found
