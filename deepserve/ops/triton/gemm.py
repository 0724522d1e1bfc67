"""Dense linear layer of several rows (y = x W^T + b) as a Triton GEMM, beside cuBLAS.

With this kernel every dense projection of R1 and the distills can run as Triton (the one-row
case is the GEMV, gemv.py; fp8 block weights have their own GEMM, quant_gemm.py), so a chip
with a Triton backend needs no vendor BLAS. On NVIDIA GPUs cuBLAS is the bar: which of the two
runs a shape is data, the `backend` setting ("triton" or "cublas") of the device's launch table
(configs/gemm/: the default table says cuBLAS everywhere, since no device has measured the
kernel faster yet; a sweep writes a device's rules). `--ops triton-all` (DEEPSERVE_OPS=triton-all)
takes the Triton kernel at every shape (its op table passes `force_triton`).

The kernel is the classic tiled GEMM (Triton's matmul tutorial): a [BLOCK_M, BLOCK_N] output
tile per program, programs ordered in groups of GROUP_M row tiles so neighbouring programs
reuse the same weight tiles from L2, K stepped by BLOCK_K through tensor-core dots with fp32
accumulation. Rounding matches the torch reference `F.linear(x.to(W.dtype), W, b)`: x is cast
to the weight's dtype, products accumulate in fp32, the bias joins in fp32, one rounding to
the weight's dtype (fp32 weights, the MoE router, use exact fp32 products, not TF32).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.triton._common import as_rows, dot_dtype, dot_precision, interpreting
from deepserve.ops.triton.launch_config import launch_settings

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles sweep the
    column tiles together, so each weight tile is read from L2 by the whole group."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, x_stride, w_stride, y_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    tile_m, tile_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * x_stride + offs_k[None, :]        # [BM, BK]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * w_stride + offs_k[:, None]        # [BK, BN] = W^T tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # x rounded to the weight's dtype first, as the reference's x.to(W.dtype)
        x = x.to(w_ptr.dtype.element_ty)
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * y_stride + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def gemm_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """backend ("triton" | "cublas"), BLOCK_M/N/K, GROUP_M, num_warps, num_stages of an
    [M, K] x [N, K]^T product, from the launch table (configs/gemm/)."""
    return launch_settings("gemm", device, m=m, n=n, k=k)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         cfg: Optional[dict] = None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N] in the weight's dtype (= F.linear(x.to(weight.dtype),
    weight, bias)), one launch of the Triton kernel whatever the table's backend says."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"gemm: x has {x.shape[-1]} features, weight {tuple(weight.shape)} takes {k}")
    x2 = as_rows(x)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=weight.dtype, device=x.device)
    if m and n:
        w = weight if weight.stride(1) == 1 else weight.contiguous()
        cfg = dict(cfg or gemm_config(m, n, k, x.device))
        cfg.pop("backend", None)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _gemm_kernel[grid](x2, w, bias if bias is not None else w, out, m, n, k,
                           x2.stride(0), w.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                           DOT_DTYPE=dot_dtype(weight.dtype), DOT_PRECISION=dot_precision(weight.dtype),
                           num_warps=warps, num_stages=stages, **cfg)
    return out.reshape(*x.shape[:-1], n)


def use_gemm(x: torch.Tensor, weight: torch.Tensor, force_triton: bool = False) -> Optional[dict]:
    """The launch settings when linear() takes the Triton GEMM for this product (floats on a
    Triton device, and the device's table picks Triton for the shape or `force_triton`, as
    --ops triton-all sets it), else None (cuBLAS)."""
    if not (weight.dim() == 2 and weight.dtype in FLOAT_DTYPES and x.dtype in FLOAT_DTYPES
            and (x.is_cuda or interpreting())):
        return None
    n, k = weight.shape
    cfg = gemm_config(x.numel() // max(k, 1), n, k, x.device)
    return cfg if force_triton or cfg["backend"] == "triton" else None
