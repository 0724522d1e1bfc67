"""W4A16 linear (4-bit weights, 16-bit activations) as Triton kernels, weights dequantized in
registers: `qweight` int32 [N, K/8] (input features packed, nibble i of column c = feature
8c + i), scales [N, S], optional uint8 zeros [N, S] (else 8), optional g_idx [K] (layout:
ops/int4.py, whose torch op is the oracle these kernels are tested against).

Two kernels:

1. `_int4_gemv_kernel` (one to `GEMV_ROWS` rows, decode): split-K. Program (n, s, m) reads
   BLOCK_N weight rows over the s-th K slice, unpacks the nibbles, applies (u - z) * s in fp32
   and accumulates w * x elementwise (no tensor cores: a matrix-vector product is bound by
   the weight read); the SPLIT_K partial sums land in an fp32 buffer that one reduction adds.
   Splitting K gives a small layer (few output rows) enough programs to keep every SM
   reading: at batch 1 the time is the packed weight's bytes over the bandwidth.
2. `_int4_gemm_kernel` (prefill, larger batches): a tiled GEMM whose K step dequantizes a
   [BLOCK_K, BLOCK_N] weight tile to the activations' dtype and feeds `tl.dot`.

Each int32 is fetched once per nibble lane (addresses k // 8, shift 4 * (k % 8)); the
repeated addresses are served by one cache line, so DRAM traffic is the packed bytes. When
a K tile lies inside one group and there is no g_idx, the scale and zero are read once per
row of the tile instead of per element (`ONE_GROUP`).

Rounding: the weight is dequantized in fp32 and rounded once to the activations' dtype, as
the torch reference does; only the fp32 summation order differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.int4 import PACK, check_int4_operands
from deepserve.ops.int4 import int4_linear as int4_linear_torch
from deepserve.ops.registry import register
from deepserve.ops.triton._common import as_rows, dot_dtype, interpreting, next_pow2, sm_count

GEMV_ROWS = 4   # up to this many rows take the split-K GEMV


@triton.jit
def _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_n, offs_k, n_ok, k_ok, stride_qn, stride_sn,
                  GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                  ONE_GROUP: tl.constexpr):
    """fp32 [len(offs_n), len(offs_k)] weight tile W[n, k] = (u - z) * s."""
    mask = n_ok[:, None] & k_ok[None, :]
    packed = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + (offs_k // 8)[None, :],
                     mask=mask, other=0)
    u = ((packed >> ((offs_k % 8) * 4)[None, :]) & 0xF).to(tl.float32)
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_sn
    if ONE_GROUP:      # the whole K tile lies in one group: one scale (and zero) per row
        g = tl.min(offs_k, axis=0) // GROUP
        s = tl.load(s_rows + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_ZP:
            z = tl.load(z_rows + g, mask=n_ok, other=8).to(tl.float32)[:, None]
        else:
            z = 8.0
    else:
        if HAS_GIDX:
            g = tl.load(g_ptr + offs_k, mask=k_ok, other=0)
        else:
            g = offs_k // GROUP
        s = tl.load(s_rows[:, None] + g[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZP:
            z = tl.load(z_rows[:, None] + g[None, :], mask=mask, other=8).to(tl.float32)
        else:
            z = 8.0
    return (u - z) * s


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, part_ptr, N, K, k_per_split,
                      stride_xm, stride_qn, stride_sn, stride_ps, stride_pm,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                      ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_n, offs_k, n_ok, k_ok, stride_qn, stride_sn,
                          GROUP, HAS_ZP, HAS_GIDX, ONE_GROUP)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_ok, other=0.0)
        # round the weight to x's dtype first, as the reference does, then multiply in fp32
        acc += w.to(x_ptr.dtype.element_ty).to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(part_ptr + split * stride_ps + m * stride_pm + offs_n, tl.sum(acc, axis=1), mask=n_ok)


@triton.jit
def _load_a_tile(a_ptr, stride_am, M, K, k0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """This program's output tile (rows offs_m, columns offs_n, masks) and the activation tile
    [BLOCK_M, BLOCK_K] at K offset k0 with its K offsets and mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    m_ok, k_ok = offs_m < M, offs_k < K
    a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :],
                mask=m_ok[:, None] & k_ok[None, :], other=0)
    return a, offs_m, offs_n, offs_k, m_ok, k_ok


@triton.jit
def _store_tile(acc, y_ptr, b_ptr, M, N, stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """acc (+ bias) -> this program's output tile of y, in y's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K,
                      stride_xm, stride_qn, stride_sn, stride_ym,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                      ONE_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, offs_m, offs_n, offs_k, m_ok, k_ok = _load_a_tile(x_ptr, stride_xm, M, K, k0, BLOCK_M, BLOCK_N,
                                                             BLOCK_K)
        n_ok = offs_n < N
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_n, offs_k, n_ok, k_ok, stride_qn, stride_sn,
                          GROUP, HAS_ZP, HAS_GIDX, ONE_GROUP)                      # [BN, BK]
        w = w.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)    # rounded to x's dtype, as the reference
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w), acc)
    _store_tile(acc, y_ptr, b_ptr, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def _block_k(k: int, group_size: int, has_gidx: bool, cap: int) -> tuple[int, bool]:
    """(BLOCK_K, ONE_GROUP): the K step, and whether each step stays inside one group. A step
    shortened to a power-of-two group (>= 32) reads one scale per row instead of one per
    element: groups of 128 take 128-wide steps rather than the cap."""
    bk = min(cap, next_pow2(k))
    if not has_gidx and group_size % bk and group_size >= 32 and group_size & (group_size - 1) == 0:
        bk = group_size
    return bk, not has_gidx and group_size % bk == 0


def gemv_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """BLOCK_N, BLOCK_K, SPLIT_K, num_warps for the split-K GEMV: enough programs for ~4 per
    SM (interpreted: few large programs, and two K splits so the split path is exercised)."""
    if interpreting():
        return dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, num_warps=1)
    block_n, block_k = 8, 256
    blocks = triton.cdiv(n, block_n) * m
    split = max(1, min(triton.cdiv(4 * sm_count(device), blocks), triton.cdiv(k, block_k), 16))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4)


def gemm_config(m: int, n: int) -> dict:
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=1)
    if m <= 32:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8)


def int4_gemv(x2: torch.Tensor, qweight, scales, zeros, g_idx, group_size: int,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x2 [M <= GEMV_ROWS, K] -> [M, N] in x's dtype, split-K."""
    m, k = x2.shape
    n = qweight.shape[0]
    cfg = gemv_config(m, n, k, x2.device)
    bk, one_group = _block_k(k, group_size, g_idx is not None, cfg["BLOCK_K"])
    split = cfg["SPLIT_K"]
    k_per_split = triton.cdiv(triton.cdiv(k, split), bk) * bk        # whole K steps per split
    split = triton.cdiv(k, k_per_split)
    parts = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split, m)
    _int4_gemv_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
        parts, n, k, k_per_split, x2.stride(0), qweight.stride(0), scales.stride(0),
        parts.stride(0), parts.stride(1), GROUP=group_size, HAS_ZP=zeros is not None,
        HAS_GIDX=g_idx is not None, ONE_GROUP=one_group, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=bk,
        num_warps=cfg["num_warps"])
    y = parts.sum(0) if split > 1 else parts[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def int4_gemm(x2: torch.Tensor, qweight, scales, zeros, g_idx, group_size: int,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[0]
    cfg = gemm_config(m, n)
    bk, one_group = _block_k(k, group_size, g_idx is not None, cfg["BLOCK_K"])
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _int4_gemm_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
        bias if bias is not None else y, y, m, n, k, x2.stride(0), qweight.stride(0), scales.stride(0),
        y.stride(0), GROUP=group_size, HAS_ZP=zeros is not None, HAS_GIDX=g_idx is not None,
        ONE_GROUP=one_group, HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x2.dtype), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=bk, num_warps=cfg["num_warps"])
    return y


@register("int4_linear", "triton")
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                g_idx: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernels on a Triton device (GEMV up to GEMV_ROWS rows, GEMM beyond), else the torch op."""
    if not (x.is_cuda or interpreting()) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return int4_linear_torch(x, qweight, scales, zeros, g_idx, group_size, bias)
    check_int4_operands(x, qweight, scales, zeros, g_idx, group_size)
    lead, n = x.shape[:-1], qweight.shape[0]
    x2 = as_rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    args = (x2, qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(),
            None if g_idx is None else g_idx.contiguous(), group_size, bias)
    y = int4_gemv(*args) if x2.shape[0] <= GEMV_ROWS else int4_gemm(*args)
    return y.reshape(*lead, n)


__all__ = ["int4_linear", "int4_gemv", "int4_gemm", "PACK"]
