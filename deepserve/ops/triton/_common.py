"""Small helpers shared by the Triton kernels: block sizes, interpret-mode detection, rows view.

Kernels here are written once for every Triton target (CUDA, ROCm, the CPU interpreter);
these helpers keep host-side launch arithmetic in one place so each kernel file stays about
its kernel.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (numpy on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 8 off CUDA: interpret mode on the CPU)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride (what the kernels step along), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a 2-D [rows, D] view with a unit stride along D (copies only if needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _patch_interpreter_for_numpy_2_4() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array there) into a loop bound
    with int(array), which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed upstream in
    #9172). Re-register `__index__` with an explicit squeeze after the interpreter's own patch."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_deepserve_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._deepserve_patched = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_for_numpy_2_4()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands use exact fp32 products (the torch oracle does); 16-bit ones ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """The tl dtype tensor-core operands are cast to: the activation dtype on a GPU; fp32 for
    bf16 under the interpreter, whose dot multiplies bf16's raw uint16 storage (Triton 3.6)."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported activation dtype for Triton kernels: {dtype}")
    if interpreting() and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


# ---------------------------------------------------------------- programmatic dependent launch
# At batch-1 decode a step is ~350 small kernels back to back, each paying launch and ramp-up
# latency while the GPU drains the previous one. With programmatic dependent launch (Hopper
# and later) a kernel is launched before its predecessor finishes; its programs start, wait in
# `griddepcontrol.wait` until the predecessor has completed and its writes are visible, and
# only then read or write memory. `pdl_begin` is that wait, then the signal that lets the next
# kernel launch in turn (after the wait, so at most one kernel runs ahead). Kernels whose
# first statement is `pdl_begin(USE_PDL)` are launched with `**pdl_launch(device)`.
# DEEPSERVE_PDL=0 turns it off.


@functools.lru_cache(maxsize=8)
def _pdl_ok(device_index: int) -> bool:
    """NVIDIA sm_90+ only: ROCm builds also report device type "cuda", without griddepcontrol."""
    return torch.version.hip is None and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_launch(device: torch.device) -> dict:
    """Launch keywords for a kernel that starts with pdl_begin(USE_PDL) on `device`."""
    on = (device.type == "cuda" and not interpreting() and os.environ.get("DEEPSERVE_PDL", "1") != "0"
          and _pdl_ok(device.index if device.index is not None else torch.cuda.current_device()))
    return {"USE_PDL": on, "launch_pdl": on} if on else {"USE_PDL": False}


@triton.jit
def pdl_begin(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
