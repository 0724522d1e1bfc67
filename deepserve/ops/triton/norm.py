"""RMSNorm and fused residual-add + RMSNorm as one-pass Triton kernels.

One program normalises one row: the row is read once into registers (hidden sizes up to
16k fit), its mean square is reduced in fp32, and the output is written in the same pass.
The fused variant also writes `x + residual`, saving a separate add kernel and one round
trip of the residual stream through memory (the same fusion vLLM's fused_add_rms_norm does).
Rounding follows the torch reference exactly: the normalised row is cast to the input dtype
before the weight multiplies it, and the residual sum is rounded before its statistics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.ops.registry import register
from deepserve.ops.triton._common import as_rows, next_pow2, pdl_begin, pdl_launch


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                     x_stride, res_stride, out_stride, res_out_stride, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # round the sum to the stream dtype first: the reference normalises the rounded sum
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm weight must have shape ({x.shape[-1]},), got {tuple(weight.shape)}")
    x2 = as_rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res2 = res_out = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
        res2 = as_rows(residual)
        res_out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    if n_rows == 0:
        return out, res_out
    block = next_pow2(n_cols)
    num_warps = min(max(block // 256, 1), 16)
    res_out2 = res_out.view(-1, n_cols) if res_out is not None else None
    _rms_norm_kernel[(n_rows,)](
        x2, res2, weight.contiguous(), out.view(-1, n_cols), res_out2,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, n_cols,
        n_cols, n_cols, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps, **pdl_launch(x.device))
    return out, res_out


@register("rms_norm", "triton")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, eps)[0]


@register("fused_add_rms_norm", "triton")
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    return _launch(x, residual, weight, eps)
