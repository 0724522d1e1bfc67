"""One-row linear layer (y = x W^T + b for a single token) as a Triton GEMV kernel.

At batch-1 decode every projection is a matrix-vector product: the time is the weight read,
and cuBLAS reaches copy bandwidth for some shapes but not for others (docs/PERFORMANCE.md).
This kernel streams the weight with as many programs as keeps every SM busy:

- grid (cdiv(N, BLOCK_N),): program n reads weight rows [n*BLOCK_N, (n+1)*BLOCK_N), whole
  rows along K (contiguous, 16-byte loads per lane), multiplies by x and accumulates
  elementwise in fp32 into a [BLOCK_N, BLOCK_K] tile that is reduced once at the end.
- no tensor cores, no split-K: a single launch, with a grid fixed by the shapes (CUDA-graph
  safe).

`linear_pair` applies two weights to the same row in one launch (MLA's q / q_a and kv_a
projections both read the layer input), the programs split between the two weights' rows.

Rounding matches the torch reference `F.linear(x.to(W.dtype), W, b)`: fp32 accumulation,
bias added in fp32, one rounding to the weight's dtype (the fp32 MoE router takes a bf16
activation and gives fp32 logits in the same launch, where torch needs a cast kernel and a
cuBLAS dot + reduce). `use_gemv` says when the engine takes this path instead of cuBLAS: one
row on a Triton device, where the kernel beat cuBLAS at every batch-1 shape measured
(benchmarks/sweep_gemv.py, docs/PERFORMANCE.md).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.dense import linear as torch_linear
from deepserve.ops.registry import register
from deepserve.ops.triton._common import cdiv, interpreting, next_pow2, pdl_begin, pdl_launch, prefetch_rows
from deepserve.ops.triton.gemm import gemm, use_gemm
from deepserve.ops.triton.launch_config import launch_settings


@triton.jit
def _gemv_rows(x_ptr, w_ptr, b_ptr, y_ptr, block, N, K, w_stride,
               HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr):
    """y[rows] = W[rows] x (+ b[rows]) for rows block*BLOCK_N ... + BLOCK_N. The rows are
    asked into L2 before the PDL wait (they depend on no earlier kernel; x does)."""
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
    prefetch_rows(w_ptr + tl.minimum(rows, N - 1).to(tl.int64) * w_stride, K, LINE, LINES, PREFETCH)
    pdl_begin(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + offs_k)
            w = tl.load(w_rows + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, w_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
                 LINES: tl.constexpr):
    _gemv_rows(x_ptr, w_ptr, b_ptr, y_ptr, tl.program_id(0), N, K, w_stride,
               HAS_BIAS, BLOCK_N, BLOCK_K, EVEN_K, USE_PDL, PREFETCH, LINE, LINES)


@triton.jit
def _gemv_pair_kernel(x_ptr, w1_ptr, w2_ptr, y1_ptr, y2_ptr, N1, N2, K, w1_stride, w2_stride,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr,
                      PREFETCH: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr):
    """Two weights applied to the same row in one launch: the first cdiv(N1, BLOCK_N)
    programs take W1's rows, the rest W2's."""
    pid = tl.program_id(0)
    first = tl.cdiv(N1, BLOCK_N)
    if pid < first:
        _gemv_rows(x_ptr, w1_ptr, w1_ptr, y1_ptr, pid, N1, K, w1_stride, False, BLOCK_N, BLOCK_K, EVEN_K,
                   USE_PDL, PREFETCH, LINE, LINES)
    else:
        _gemv_rows(x_ptr, w2_ptr, w2_ptr, y2_ptr, pid - first, N2, K, w2_stride, False, BLOCK_N, BLOCK_K,
                   EVEN_K, USE_PDL, PREFETCH, LINE, LINES)


def gemv_config(n: int, k: int, device: torch.device) -> dict:
    """BLOCK_N, BLOCK_K, num_warps of an [N, K] weight, from the launch table (configs/gemv/).

    Few rows per program and long K steps (16-byte loads per lane), so thousands of small
    programs keep every SM's loads in flight; more warps once the weight is large. How each
    chip's settings were measured: docs/PERFORMANCE.md (benchmarks/sweep_gemv.py)."""
    return launch_settings("gemv", device, n=n, k=k, elements=n * k)


def _launch_setup(x: torch.Tensor, k: int, n_total: int, *weights: torch.Tensor):
    """x as one unit-stride row of k, the weights with unit-stride rows, and the launch
    settings (config, num_warps) for n_total output features."""
    if x.shape[-1] != k or x.numel() != k:
        raise ValueError(f"gemv takes one row of {k} features, got x {tuple(x.shape)}")
    x1 = x.reshape(k)
    x1 = x1 if x1.stride(0) == 1 else x1.contiguous()
    weights = [w if w.stride(1) == 1 else w.contiguous() for w in weights]
    cfg = gemv_config(n_total, k, x.device)
    num_warps = cfg.pop("num_warps")
    launch = pdl_launch(x.device, *weights)
    cfg.update(launch, LINES=min(next_pow2(cdiv(k, launch["LINE"])), 64))
    return x1, weights, cfg, num_warps


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] holding one row in all, weight [N, K] -> [..., N] in the weight's dtype
    (= F.linear(x.to(weight.dtype), weight, bias)), one launch."""
    n, k = weight.shape
    x1, (weight,), cfg, num_warps = _launch_setup(x, k, n, weight)
    out = torch.empty(*x.shape[:-1], n, dtype=weight.dtype, device=x.device)
    if n == 0:
        return out
    _gemv_kernel[(cdiv(n, cfg["BLOCK_N"]),)](
        x1, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0, num_warps=num_warps, num_stages=1, **cfg)
    return out


def gemv_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] holding one row, w1 [N1, K], w2 [N2, K] (same dtype) -> (x W1^T, x W2^T), one launch."""
    (n1, k), (n2, k2) = w1.shape, w2.shape
    if k2 != k or w1.dtype != w2.dtype:
        raise ValueError(f"gemv_pair takes two [N, {k}] weights of one dtype, got w1 {tuple(w1.shape)} "
                         f"{w1.dtype}, w2 {tuple(w2.shape)} {w2.dtype}")
    x1, (w1, w2), cfg, num_warps = _launch_setup(x, k, n1 + n2, w1, w2)
    y1 = torch.empty(*x.shape[:-1], n1, dtype=w1.dtype, device=x.device)
    y2 = torch.empty(*x.shape[:-1], n2, dtype=w2.dtype, device=x.device)
    grid = (cdiv(n1, cfg["BLOCK_N"]) + cdiv(n2, cfg["BLOCK_N"]),)
    _gemv_pair_kernel[grid](x1, w1, w2, y1, y2, n1, n2, k, w1.stride(0), w2.stride(0),
                            EVEN_K=k % cfg["BLOCK_K"] == 0, num_warps=num_warps, num_stages=1, **cfg)
    return y1, y2


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() takes the GEMV kernel: one row of floats on a Triton device."""
    return (x.numel() == x.shape[-1] and weight.dim() == 2 and weight.dtype in FLOAT_DTYPES
            and x.dtype in FLOAT_DTYPES and (x.is_cuda or interpreting()))


@register("linear", "triton", per_shape=True)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           force_triton: bool = False) -> torch.Tensor:
    """y = x W^T + b in the weight's dtype: the GEMV kernel for a single row; several rows take
    the Triton GEMM where the device's table or `force_triton` (--ops triton-all) says so
    (gemm.py), else cuBLAS."""
    if use_gemv(x, weight):
        return gemv(x, weight, bias)
    cfg = use_gemm(x, weight, force_triton)
    if cfg is not None:
        return gemm(x, weight, bias, cfg)
    return torch_linear(x, weight, bias)


@register("linear_pair", "triton", per_shape=True)
def linear_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                force_triton: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W1^T, x W2^T): one GEMV launch for a single row, two linears otherwise."""
    if use_gemv(x, w1) and w2.dtype == w1.dtype and w2.dim() == 2:
        return gemv_pair(x, w1, w2)
    return linear(x, w1, force_triton=force_triton), linear(x, w2, force_triton=force_triton)
