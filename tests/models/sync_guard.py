"""Records the calls that make the host wait for the device (a CUDA stream sync), so CPU tests
can assert that a model's forward has none: each one stops the host from queueing the next
kernels while the GPU works, which is what makes a serving step host-bound.

Two levels catch them:
- Python: Tensor.tolist / item / numpy / cpu / __bool__ / __int__ / __float__ / __index__ /
  __array__ (a TorchFunctionMode; on the CPU these read memory without any aten op).
- aten: ops whose output size or value the device decides (nonzero, masked_select, unique,
  _local_scalar_dense, boolean-mask index / index_put, repeat_interleave without output_size,
  bincount, equal, is_nonzero) (a TorchDispatchMode).

With `host_copies`, also host data put on the device by a synchronous copy: torch.tensor /
as_tensor given a device, and indexing with Python lists (torch copies them over before the
op). On the CPU every tensor is a host tensor, so this is opt-in, for code (the sampler) whose
host-built tensors must go through engine/input_staging.to_device_async.

Triton kernel launches are not looked into: a compiled launch queues the kernel and returns,
where the CPU interpreter's copies to numpy would read as syncs.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_METHODS = frozenset(("tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
                          "__array__"))
SYNC_ATEN = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten._local_scalar_dense",
             "aten.bincount", "aten.equal", "aten.is_nonzero")
MASK_DTYPES = (torch.bool, torch.uint8)


def aten_sync(func, args, kwargs) -> bool:
    """Whether the aten call `func(*args, **kwargs)` needs device values on the host."""
    name = str(func)
    if name.startswith(SYNC_ATEN):
        return True
    if name.startswith("aten.repeat_interleave"):
        return kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None)
    if name.startswith(("aten.index.Tensor", "aten.index_put", "aten._index_put_impl")):
        return any(isinstance(t, torch.Tensor) and t.dtype in MASK_DTYPES for t in args[1])
    return False


def host_copy(func, args, kwargs) -> bool:
    """Whether the torch call copies host data onto `device` synchronously (see `host_copies`)."""
    if func in (torch.tensor, torch.as_tensor):
        return kwargs.get("device") is not None
    if getattr(func, "__name__", "") in ("__getitem__", "__setitem__") and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, list) for i in index)
    return False


class SyncRecorder:
    """`with recorder.watch(): ...` collects (what, where) of every sync-inducing call inside."""

    def __init__(self, host_copies: bool = False):
        self.host_copies = host_copies
        self.syncs: list[tuple[str, str]] = []
        self._in_kernel = 0

    def _record(self, what: str) -> None:
        if self._in_kernel:
            return
        frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
        self.syncs.append((what, " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                             for f in reversed(frames[-4:]))))

    @contextlib.contextmanager
    def watch(self) -> Iterator["SyncRecorder"]:
        rec = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name in SYNC_METHODS:
                    rec._record(f"Tensor.{name}")
                elif rec.host_copies and host_copy(func, args, kwargs):
                    rec._record(f"host copy: {name}")
                return func(*args, **kwargs)

        class Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if aten_sync(func, args, kwargs):
                    rec._record(str(func))
                return func(*args, **kwargs)

        with self._kernels_unwatched(), Functions(), Aten():
            yield self

    @contextlib.contextmanager
    def _kernels_unwatched(self) -> Iterator[None]:
        try:
            from triton.runtime import interpreter
        except ImportError:
            yield
            return
        launch = interpreter.GridExecutor.__call__

        def call(executor, *args, **kwargs):
            self._in_kernel += 1
            try:
                return launch(executor, *args, **kwargs)
            finally:
                self._in_kernel -= 1

        interpreter.GridExecutor.__call__ = call
        try:
            yield
        finally:
            interpreter.GridExecutor.__call__ = launch
