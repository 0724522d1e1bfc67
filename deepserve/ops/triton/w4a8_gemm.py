"""W4A8 linear (4-bit weights, dynamic per-token int8 activations) as a Triton GEMM on int8
tensor cores; oracle: ops.int4.w4a8_linear.

The activations are quantized per token (ops.quant.quant_int8_rows, symmetric, amax / 127);
each K step of the kernel lies inside one weight group, so the step's product of int8
activations and the weight's signed 4-bit values (u - z, widened to int8 in registers) is one
int8 `tl.dot` with an exact int32 result, rescaled by the group's scale per output column and
summed in fp32; the token's scale multiplies the row at the end. Weights whose groups are
narrower than the smallest K step (16), or reordered by g_idx, go to the torch op.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.int4 import check_int4_operands
from deepserve.ops.int4 import w4a8_linear as w4a8_linear_torch
from deepserve.ops.quant import quant_int8_rows
from deepserve.ops.registry import register
from deepserve.ops.triton._common import as_rows, interpreting


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
def _w4a8_gemm_kernel(a_ptr, as_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K,
                      stride_am, stride_qn, stride_sn, stride_ym,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a, offs_m, offs_n, offs_k, m_ok, k_ok = _load_a_tile(a_ptr, stride_am, M, K, k0, BLOCK_M, BLOCK_N,
                                                             BLOCK_K)                  # int8 [BM, BK]
        n_ok = offs_n < N
        packed = tl.load(qw_ptr + offs_n[None, :].to(tl.int64) * stride_qn + (offs_k // 8)[:, None],
                         mask=k_ok[:, None] & n_ok[None, :], other=0)                   # [BK, BN]
        u = (packed >> ((offs_k % 8) * 4)[:, None]) & 0xF
        g = k0 // GROUP
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=n_ok, other=8).to(tl.int32)
        else:
            z = tl.full([BLOCK_N], 8, tl.int32)
        w = tl.where(k_ok[:, None], u - z[None, :], 0).to(tl.int8)                     # [BK, BN]
        s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.dot(a, w, out_dtype=tl.int32).to(tl.float32) * s[None, :]
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc *= tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    _store_tile(acc, y_ptr, b_ptr, M, N, stride_ym, HAS_BIAS, BLOCK_M, BLOCK_N)


def _block_k(group: int, k: int) -> Optional[int]:
    """The largest K step (16..128) inside one group, or None."""
    for bk in (128, 64, 32, 16):
        if group % bk == 0 and (bk <= k or bk == 16):
            return bk
    return None


@register("w4a8_linear", "triton")
def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                g_idx: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    bk = _block_k(group_size, x.shape[-1])
    if not (x.is_cuda or interpreting()) or g_idx is not None or bk is None:
        return w4a8_linear_torch(x, qweight, scales, zeros, g_idx, group_size, bias)
    check_int4_operands(x, qweight, scales, zeros, g_idx, group_size)
    lead, n = x.shape[:-1], qweight.shape[0]
    x2 = as_rows(x)
    m, k = x2.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    xq, xs = quant_int8_rows(x2)
    if interpreting():
        bm, bn, warps = 16, 32, 1
    else:
        bm, bn, warps = (16, 64, 4) if m <= 16 else (64, 64, 4) if m <= 128 else (128, 128, 8)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w4a8_gemm_kernel[grid](xq, xs.reshape(-1).contiguous(), qweight.contiguous(), scales.contiguous(),
                            zeros.contiguous() if zeros is not None else scales, bias if bias is not None else y,
                            y, m, n, k, xq.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
                            GROUP=group_size, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y.reshape(*lead, n)
