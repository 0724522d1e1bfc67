"""One step's integer inputs to the device in two transfers instead of seven.

A decode step sends token ids, positions, KV slots, logits rows (int64) and query starts,
sequence lengths, block tables (int32) to the GPU. Seven small copies from pageable memory
cost the host ~150 µs per step at batch 1 (benchmarks/profile_decode.py), time the GPU sits
idle between CUDA-graph replays. Here the arrays of each dtype are packed into one pinned
buffer and copied once, asynchronously; the device tensors are views of that one copy.

Two buffers alternate, each guarded by an event recorded after its copy, so a buffer is
never rewritten while a copy from it may still be queued (a worker rank can run ahead of
its GPU). On the CPU the packed tensor is cloned instead (the model reads it in the step).

Every array starts on a 16-byte boundary of its buffer (segments padded): Triton specializes
each pointer argument on its 16-byte alignment, so a view at an offset set by the preceding
arrays' lengths (token and sequence counts) would compile a kernel again for each class.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

_DTYPES = ((torch.int64, np.int64), (torch.int32, np.int32))
ALIGN_BYTES = 16


def aligned_offsets(sizes: Sequence[int], itemsize: int) -> tuple[list[int], int]:
    """Start offsets (in elements) of arrays of `sizes` packed one after another, each
    starting on an ALIGN_BYTES boundary, and the packed length."""
    step = max(1, ALIGN_BYTES // itemsize)
    offsets, n = [], 0
    for size in sizes:
        offsets.append(n)
        n += -(-size // step) * step
    return offsets, n


class InputStaging:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._host: list[dict] = [{}, {}]
        self._done: list[Optional[torch.cuda.Event]] = [None, None]
        self._turn = 0

    def _buffer(self, slot: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        buf = self._host[slot].get(dtype)
        if buf is None or buf.numel() < n:
            size = max(n, 2 * buf.numel() if buf is not None else 4096)
            buf = torch.empty(size, dtype=dtype, pin_memory=self.cuda)
            self._host[slot][dtype] = buf
        return buf

    def copy(self, i64: Sequence, i32: Sequence) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Device views of each array in `i64` (as int64) and `i32` (as int32), in order."""
        slot, self._turn = self._turn, self._turn ^ 1
        if self._done[slot] is not None:
            self._done[slot].synchronize()
        views = []
        for (dtype, np_dtype), parts in zip(_DTYPES, (i64, i32)):
            arrays = [np.asarray(p, dtype=np_dtype).reshape(-1) for p in parts]
            offsets, n = aligned_offsets([a.shape[0] for a in arrays], np.dtype(np_dtype).itemsize)
            host = self._buffer(slot, dtype, n)[:n]
            flat = host.numpy()
            for a, o in zip(arrays, offsets):
                flat[o:o + a.shape[0]] = a
            packed = host.to(self.device, non_blocking=True) if self.cuda else host.clone()
            views.append([packed[o:o + a.shape[0]] for a, o in zip(arrays, offsets)])
        if self.cuda:
            self._done[slot] = torch.cuda.Event()
            self._done[slot].record()
        return views[0], views[1]


def to_device_async(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list/array (or CPU tensor) on `device` without a host-device sync.

    `torch.tensor(data, device=cuda)` copies from pageable memory, which waits for every
    kernel already queued on the stream: under async scheduling that stalls the host until
    the previous step finishes, and the GPU then idles while this step is launched (~0.3-0.5
    ms a step, seen in benchmarks/profile_decode.py's timeline). A pinned staging copy goes
    asynchronously; PyTorch's pinned allocator keeps the buffer alive until the copy is done."""
    host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
