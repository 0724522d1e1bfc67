"""FP8 block quantization in DeepSeek's checkpoint format (pure tensor functions).

DeepSeek-V3/R1 ship their linear weights as float8 e4m3 with one fp32 scale per 128x128
block, stored beside the weight as `<name>_scale_inv` ("inverse" because it multiplies the
fp8 value back to real units: w ~= fp32(q) * scale_inv). The last block of a row or column
may be partial when a dimension is not a multiple of 128 (e.g. kv_a_proj_with_mqa's 576
rows). Reference: DeepSeek-V3 `inference/kernel.py` (weight_dequant) and `fp8_cast_bf16.py`.

These are the functions the engine's loader calls to dequantize at load time (CPU path) and
that `deepserve convert` uses; they run on any device and are exact functions of their
inputs, so the conversion is reproducible bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from deepserve.ops.quant import FP8_DTYPE, FP8_MAX  # noqa: F401  (re-exported)

DEFAULT_BLOCK = (128, 128)
E8M0_DTYPE = torch.float8_e8m0fnu
_MIN_AMAX = 1e-12


def block_scale_shape(shape: tuple[int, int],
                      block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of the per-block scale tensor for a [N, K] weight: [ceil(N/bn), ceil(K/bk)]."""
    n, k = shape
    bn, bk = block
    return (math.ceil(n / bn), math.ceil(k / bk))


def _check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(t.shape)}")


def _row_chunks(n: int, bn: int, rows_per_chunk: int):
    """Yield (r0, r1, b0, bh): row ranges holding whole blocks only, the partial tail alone.

    Each chunk views as [blocks, bh, K] so a per-block scale broadcasts over it without
    materializing an [N, K] scale tensor (bh = bn, or the tail's height).
    """
    n_full = (n // bn) * bn
    step = max(bn, (rows_per_chunk // bn) * bn)
    for r0 in range(0, n_full, step):
        yield r0, min(n_full, r0 + step), r0 // bn, bn
    if n_full < n:
        yield n_full, n, n_full // bn, n - n_full


def _column_scale(scale: torch.Tensor, k: int, bk: int) -> torch.Tensor:
    """[sn, sk] block scale -> [sn, K] (repeat along columns; small: no row expansion)."""
    return scale.repeat_interleave(bk, dim=1)[:, :k]


def scale_as_fp32(scale_inv: torch.Tensor) -> torch.Tensor:
    """A block scale tensor as fp32. DeepSeek-V3.1-style `ue8m0` scales may be stored as
    F8_E8M0 (8 exponent bits, no sign or mantissa: 2^(e-127), 0xFF NaN); the cast is exact
    (2^-127 is an fp32 subnormal) and keeps 0xFF NaN, which `valid_scales` refuses."""
    return scale_inv.to(torch.float32) if scale_inv.dtype == E8M0_DTYPE else scale_inv


def valid_scales(scale_inv: torch.Tensor) -> bool:
    """Whether every block scale is finite and positive: a NaN, infinite, zero or negative one
    would turn its block's weights into NaN / inf / zeros silently (checked at load only)."""
    return bool(torch.isfinite(scale_inv).all()) and bool((scale_inv > 0).all())


def first_bad_value(t: torch.Tensor, positive: bool = True, stored: Optional[torch.Tensor] = None) -> str:
    """The first value of a scale tensor that no scale may hold (non-finite; with `positive`,
    also zero or negative) and where: "nan at [0, 3]"; "" when there is none. For the one-line
    errors that name the tensor and the value. `stored`: the checkpoint's tensor when `t` is it
    cast (a float16 scale of 1e6 is inf): its value is the one named."""
    values = t.float()
    bad = ~torch.isfinite(values)
    if positive:
        bad |= values <= 0
    hits = bad.nonzero()
    if not len(hits):
        return ""
    where = hits[0].tolist()
    value = (values if stored is None else stored)[tuple(where)].item()
    return f"{value}" + (f" at {where}" if where else "")


def checked_scale_inv(loaded: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """A checkpoint's scale_inv as fp32 on `device`; a non-finite or non-positive value is
    refused naming `what` (the tensor, and the expert where there is one)."""
    loaded = loaded.to(device, torch.float32)
    if not valid_scales(loaded):
        raise ValueError(f"{what}: scale_inv has non-finite or non-positive values ({first_bad_value(loaded)})")
    return loaded


def dequant_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor,
                      block: tuple[int, int] = DEFAULT_BLOCK,
                      out_dtype: torch.dtype = torch.bfloat16,
                      rows_per_chunk: int = 4096) -> torch.Tensor:
    """y = out_dtype(fp32(weight) * scale_inv[block]) for a [N, K] e4m3 weight.

    `scale_inv` is fp32 (or E8M0) [ceil(N/bn), ceil(K/bk)]. Rows are processed in chunks (whole blocks)
    so a 18432x7168 weight never needs two full fp32 copies at once.
    """
    _check_2d("weight", weight)
    _check_2d("scale_inv", scale_inv)
    scale_inv = scale_as_fp32(scale_inv)
    if weight.dtype != FP8_DTYPE:
        raise ValueError(f"weight must be {FP8_DTYPE}, got {weight.dtype}")
    expected = block_scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                         f"{tuple(weight.shape)} with block {tuple(block)}: expected {expected}")
    if not valid_scales(scale_inv):
        raise ValueError(f"scale_inv has non-finite or non-positive values ({first_bad_value(scale_inv)})")
    n, k = weight.shape
    weight = weight.contiguous()
    s_cols = _column_scale(scale_inv.to(device=weight.device, dtype=torch.float32), k, block[1])
    out = torch.empty((n, k), dtype=out_dtype, device=weight.device)
    for r0, r1, b0, bh in _row_chunks(n, block[0], rows_per_chunk):
        nb = (r1 - r0) // bh
        x = weight[r0:r1].to(torch.float32).view(nb, bh, k)              # [blocks, bh, K]
        out[r0:r1] = (x * s_cols[b0:b0 + nb, None, :]).view(r1 - r0, k).to(out_dtype)
    return out


def quant_fp8_block(weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                    rows_per_chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight to (e4m3 [N, K], scale_inv fp32 [ceil(N/bn), ceil(K/bk)]).

    Per block: scale_inv = amax(|w|) / 448 and q = e4m3(fp32(w) / scale_inv), DeepSeek's own
    recipe, so the largest value of each block lands on the top of the e4m3 range.
    """
    _check_2d("weight", weight)
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    n, k = weight.shape
    bn, bk = block
    sn, sk = block_scale_shape((n, k), block)
    weight = weight.contiguous()
    # Pass 1: per-block amax. Rows reduce inside each chunk; columns on the small [sn, K] result.
    row_amax = torch.zeros((sn, sk * bk), dtype=torch.float32, device=weight.device)
    for r0, r1, b0, bh in _row_chunks(n, bn, rows_per_chunk):
        nb = (r1 - r0) // bh
        x = weight[r0:r1].to(torch.float32).view(nb, bh, k)
        row_amax[b0:b0 + nb, :k] = x.abs().amax(dim=1)
    amax = row_amax.view(sn, sk, bk).amax(dim=2)                          # [sn, sk]
    # An all-zero block would give scale 0 and 0/0 = NaN: clamp its amax. Divide by a tensor,
    # not a Python float: CUDA turns division by a scalar into multiplication by its
    # reciprocal (1 ulp off), and the scales must be identical on every device.
    scale_inv = amax.clamp(min=_MIN_AMAX) / torch.full_like(amax, FP8_MAX)
    # Pass 2: divide (not multiply by a reciprocal) so the block max maps to exactly 448.
    s_cols = _column_scale(scale_inv, k, bk)
    q = torch.empty((n, k), dtype=FP8_DTYPE, device=weight.device)
    for r0, r1, b0, bh in _row_chunks(n, bn, rows_per_chunk):
        nb = (r1 - r0) // bh
        x = weight[r0:r1].to(torch.float32).view(nb, bh, k)
        y = (x / s_cols[b0:b0 + nb, None, :]).clamp_(-FP8_MAX, FP8_MAX)
        q[r0:r1] = y.view(r1 - r0, k).to(FP8_DTYPE)
    return q, scale_inv
