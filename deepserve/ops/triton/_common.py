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


# Host-side launch arithmetic in plain Python: triton.cdiv / triton.next_power_of_2 are
# ConstexprFunction objects in Triton 3.6 (about 5 us a call), called a few dozen times a layer
# by the launch code of an eager step.
def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of integers, as triton.cdiv."""
    return (a + b - 1) // b


def interpret_env() -> bool:
    """TRITON_INTERPRET set (to anything but "" or "0") in the environment now."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# triton.jit chooses the interpreter when it decorates a kernel, as the kernel's module is
# imported (this one first), so the host code reads the same choice once here, not in every
# launch's code (a few reads a kernel, an environment lookup each).
_INTERPRETING = interpret_env()


def interpreting() -> bool:
    """True when kernels run under TRITON_INTERPRET=1 (numpy on the CPU): the environment as
    the kernels were decorated."""
    return _INTERPRETING


def unpack_by_ptx() -> bool:
    """Whether the 4-bit kernels unpack with their inline PTX: it compiles for NVIDIA GPUs only
    (ROCm builds of torch also report device type "cuda"; the interpreter runs no assembly),
    elsewhere they take join-based unpacks with the same values."""
    return not interpreting() and torch.version.hip is None


@triton.jit
def repeat_words(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed words [BN, BK / 8] -> [BN, BK], each word repeated over its 8 lanes by joins (an
    axis held by the loading thread), so an inline-PTX unpack packing several lanes an
    instance finds the word in the same thread as its lanes."""
    pp = tl.join(p, p)
    pp = tl.join(pp, pp)
    return tl.reshape(tl.join(pp, pp), [BLOCK_N, BLOCK_K])


# Triton 3.9 removed block pointers (tl.make_block_ptr keeps its name but raises); there the
# kernels that step a tile along K through one take a pointer tensor and a row mask instead.
BLOCK_PTRS = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 9)


@triton.jit
def row_tile(base, n_rows, n_cols, stride, row0, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
             BLOCK_PTR: tl.constexpr):
    """Rows [row0, row0 + BLOCK_ROWS) and columns [0, BLOCK_COLS) of the row-major [n_rows, n_cols]
    matrix at `base` (unit column stride): a block pointer with BLOCK_PTR, else a pointer tensor.
    Read with load_rows (rows past n_rows read 0), moved along the columns with advance_cols."""
    # one return after the branches: the compiler also compiles a return after an `if` that
    # returns (and rejects two return types), where the interpreter stops at the first
    if BLOCK_PTR:
        tile = tl.make_block_ptr(base, (n_rows, n_cols), (stride, 1), (row0, 0), (BLOCK_ROWS, BLOCK_COLS), (1, 0))
    else:
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        tile = base + rows[:, None].to(tl.int64) * stride + tl.arange(0, BLOCK_COLS)[None, :]
    return tile


@triton.jit
def load_rows(tile, rows_ok, BLOCK_PTR: tl.constexpr):
    """row_tile's tile, zero in rows past the matrix (rows_ok [BLOCK_ROWS]: the rows inside)."""
    if BLOCK_PTR:
        x = tl.load(tile, boundary_check=(0,), padding_option="zero")
    else:
        x = tl.load(tile, mask=rows_ok[:, None], other=0)
    return x


@triton.jit
def advance_cols(tile, cols, BLOCK_PTR: tl.constexpr):
    """row_tile's tile moved `cols` columns on."""
    if BLOCK_PTR:
        moved = tl.advance(tile, (0, cols))
    else:
        moved = tile + cols
    return moved


@triton.jit
def and_scalar(mask, cond):
    """mask & cond for a block mask and a scalar condition, as a select: Triton 3.9's interpreter
    widens `block & scalar` to int32, which its loads and stores refuse as a mask."""
    return tl.where(cond, mask, False)


@triton.jit
def scalar_mask(cond, like):
    """The scalar condition cond as a block mask of like's shape (what a load or store would
    broadcast it to, but in bool: see and_scalar)."""
    return and_scalar(tl.full(like.shape, 1, tl.int1), cond)


@functools.lru_cache(maxsize=8)
def _properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def _cuda_properties(device: torch.device):
    """The device's properties (read once per device), or None off CUDA."""
    if device.type != "cuda":
        return None
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a nominal 8 off CUDA: interpret mode on the CPU)."""
    props = _cuda_properties(device)
    return 8 if props is None else props.multi_processor_count


def device_properties(device: torch.device):
    """The CUDA device's properties (compute capability, SMs, memory), for settings tuned per
    chip (launch_config.device_key); None off CUDA."""
    return _cuda_properties(device)


def nvidia_sm90(device: torch.device) -> bool:
    """An NVIDIA GPU of compute capability 9.0 or newer (Hopper+: PDL, TMA). ROCm builds also
    report device type "cuda", without either."""
    props = _cuda_properties(device)
    return props is not None and torch.version.hip is None and props.major >= 9


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
# only then read activations or write anything (weights they may ask into L2 before: below).
# `pdl_begin` is the signal that lets the next kernel launch, then that wait. Kernels call it
# before touching another kernel's output (most as their first statement) and are launched
# with `**pdl_launch(device)`. DEEPSERVE_PDL=0 turns it off.
#
# The signal comes before the wait: a kernel's dependent launches once every program of it
# has started, even while it still waits on its own predecessor, so during a run of small
# latency-bound kernels several are resident at once, each waiting on the one before, and
# their weight prefetches start earlier (measured: docs/PERFORMANCE.md). It cannot deadlock:
# a kernel launches only after all programs of the one before are resident, and that one's
# progress needs nothing later.


@functools.lru_cache(maxsize=64)
def _pdl_on(device: torch.device, env: str) -> bool:
    """PDL on `device` with DEEPSERVE_PDL=env (read at every launch: tests and A/B runs set it
    between models), once per device and value."""
    return env != "0" and nvidia_sm90(device)


def pdl_launch(device: torch.device, *weights: torch.Tensor) -> dict:
    """Launch keywords for a kernel that calls pdl_begin(USE_PDL) on `device`. With `weights`
    (those the kernel streams, for its prefetch_rows: below) also PREFETCH, on with PDL when
    they total at most PREFETCH_MAX_BYTES, and LINE, the elements of one 128-byte line."""
    on = not interpreting() and _pdl_on(device, os.environ.get("DEEPSERVE_PDL", "1"))
    kw = {"USE_PDL": on, "launch_pdl": on} if on else {"USE_PDL": False}
    if weights:
        kw.update(PREFETCH=on and sum(w.numel() * w.element_size() for w in weights) <= PREFETCH_MAX_BYTES,
                  LINE=LINE_BYTES // weights[0].element_size())
    return kw


@triton.jit
def pdl_begin(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


# ---------------------------------------------------------------- weight prefetch into L2
# A kernel launched early under PDL sits in `griddepcontrol.wait` while its predecessor runs.
# At batch-1 decode most predecessors are latency-bound (a norm, the routing, the attention
# split and merge: a few KB each), so memory bandwidth idles there. Weights depend on no
# earlier kernel: a kernel that streams weights first asks L2 for the lines it will read
# (`prefetch.global.L2`, which keeps no registers and waits for nothing), then waits, and its
# loads after the wait hit L2. `pdl_launch(device, *weights)` gives the PREFETCH and LINE
# launch keywords: on with PDL for small weights (below).

LINE_BYTES = 128


# Small weights gain from the prefetch; large ones lose, since a bulk of prefetches queued
# ahead of the small kernel on the critical path slows it more than the weights gain (the
# measurements per kernel family: docs/PERFORMANCE.md). Hence the cap: a kernel prefetches
# when its weights total at most PREFETCH_MAX_BYTES.
PREFETCH_MAX_BYTES = 4 << 20


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the line of every pointer in `ptrs` (any shape); nothing waits for it."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(row_ptrs, n_cols, LINE: tl.constexpr, LINES: tl.constexpr, PREFETCH: tl.constexpr):
    """Prefetch elements [0, n_cols) of the rows at row_ptrs [R] into L2, LINES lines of LINE
    elements per step along the rows. Every pointer must be in bounds: callers clamp rows."""
    if PREFETCH:
        offs = tl.arange(0, LINES) * LINE
        for c0 in range(0, n_cols, LINES * LINE):
            cols = tl.minimum(c0 + offs, n_cols - 1)       # past the end: the row's last line again
            prefetch_l2(row_ptrs[:, None] + cols[None, :])


@triton.jit
def round_to_e4m3(x):
    """x (fp32, |x| < 2^9) rounded to the nearest e4m3 value, ties to even, still in fp32: the
    add-and-subtract of 1.5 * 2^23 ulps rounds at the ulp of x's binade (2^(e-3), 2^-9 for
    subnormals). Exact where a cast might not be (Triton 3.6's interpreter drops the carry
    of a mantissa that rounds up into the next binade: 31.26 -> 16)."""
    bits = x.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    ulp_e = tl.maximum(e - 127 - 3, -9)
    magic = (((ulp_e + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (x + magic) - magic
    # a negative x that rounds to zero keeps its sign (-0.0), as the e4m3 cast does
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def quantize_e4m3(x, QMAX: tl.constexpr):
    """One 1-D group x (fp32) quantized as quant_gemm.act_quant_fp8 does: (its e4m3 values, still
    in fp32; its scale max(amax, 1e-12) / QMAX). The divisions are IEEE (div_rn), as torch's, so
    scales and values equal the torch reference's bit for bit."""
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), QMAX)
    return round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, scale), -QMAX), QMAX)), scale
