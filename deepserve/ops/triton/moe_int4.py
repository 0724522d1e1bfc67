"""W4A16 fused MoE, small-batch path, as Triton kernels: routed experts with 4-bit weights
(layout: ops/moe_int4.py, whose torch op is the oracle) dequantized in registers.

At decode a step routes a few tokens to top-k experts each; every (token, slot) assignment
is a pair of matrix-vector products on one expert, so the time is the packed weights' bytes.
Two launches, each program one assignment and BLOCK_N output rows:

1. `_gate_up_kernel`: h[a, n] = silu(G[e] x_t)[n] * (U[e] x_t)[n] for the gate and up rows n of
   expert e = topk_ids[a], both read in the same program (gate rows, then the up rows I below);
2. `_down_kernel`: y[a, n] = topk_weight[a] * (W2[e] h[a])[n] in fp32,

and the k slots of each token are summed. Assignments to experts outside [0, E) (another EP
rank's) give zero rows. Rounding follows the reference: gate and up rounded to x's dtype
before silu * up, h rounded to x's dtype before the down projection.

Large batches (prefill) go to the torch op here: a sorted grouped GEMM over 4-bit experts,
like the 16-bit and fp8 sorted paths of ops/triton/fused_moe.py, is not written yet.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.moe_int4 import check_moe_int4_operands
from deepserve.ops.moe_int4 import fused_moe_int4 as fused_moe_int4_torch
from deepserve.ops.registry import register
from deepserve.ops.triton._common import interpreting, next_pow2
from deepserve.ops.triton.int4_gemm import _dequant_tile

SMALL_BATCH = 64   # assignments (tokens x top_k) up to which the per-assignment kernels run


@triton.jit
def _expert_rows_dot(v_ptr, qw_ptr, s_ptr, z_ptr, rows, row_ok, K, stride_qn, stride_sn,
                     GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ONE_GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N]: rows `rows` of one expert's dequantized [*, K] matrix times vector v [K]
    (the weight rounded to v's dtype first); rows where `row_ok` is false give 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, qw_ptr, rows, offs_k, row_ok, k_ok, stride_qn, stride_sn,
                          GROUP, HAS_ZP, False, ONE_GROUP)
        v = tl.load(v_ptr + offs_k, mask=k_ok, other=0.0)
        acc += w.to(v_ptr.dtype.element_ty).to(tl.float32) * v.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _assignment(ids_ptr, E, N, BLOCK_N: tl.constexpr):
    """This program's assignment a, its expert (0 when another EP rank holds it), whether the
    expert is here (else nothing is read and zeros are written), its output rows and their mask."""
    a, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + a)
    valid = (e >= 0) & (e < E)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return a, tl.where(valid, e, 0), valid, rows, rows < N


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, qw_ptr, s_ptr, z_ptr, h_ptr, E, I, D, top_k,
                    stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ha,
                    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ONE_GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a, e, valid, rows, row_ok = _assignment(ids_ptr, E, I, BLOCK_N)
    h_rows = h_ptr + a.to(tl.int64) * stride_ha + rows
    x = x_ptr + (a // top_k).to(tl.int64) * stride_xt
    qw = qw_ptr + e.to(tl.int64) * stride_qe
    s = s_ptr + e.to(tl.int64) * stride_se
    z = z_ptr + e.to(tl.int64) * stride_se
    gate = _expert_rows_dot(x, qw, s, z, rows, row_ok & valid, D, stride_qn, stride_sn, GROUP, HAS_ZP,
                            ONE_GROUP, BLOCK_N, BLOCK_K)
    up = _expert_rows_dot(x, qw, s, z, rows + I, row_ok & valid, D, stride_qn, stride_sn, GROUP, HAS_ZP,
                          ONE_GROUP, BLOCK_N, BLOCK_K)
    dt = h_ptr.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)
    up = up.to(dt).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(h_rows, (silu * up).to(dt), mask=row_ok)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, E, I, D,
                 stride_ha, stride_qe, stride_qn, stride_se, stride_sn, stride_ya,
                 GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ONE_GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a, e, valid, rows, row_ok = _assignment(ids_ptr, E, D, BLOCK_N)
    y_rows = y_ptr + a.to(tl.int64) * stride_ya + rows
    h = h_ptr + a.to(tl.int64) * stride_ha
    y = _expert_rows_dot(h, qw_ptr + e.to(tl.int64) * stride_qe, s_ptr + e.to(tl.int64) * stride_se,
                         z_ptr + e.to(tl.int64) * stride_se, rows, row_ok & valid, I, stride_qn, stride_sn,
                         GROUP, HAS_ZP, ONE_GROUP, BLOCK_N, BLOCK_K)
    y = y.to(h_ptr.dtype.element_ty).to(tl.float32)        # the reference's down output in x's dtype
    tl.store(y_rows, y * tl.load(wts_ptr + a).to(tl.float32), mask=row_ok)


def _settings(k: int, group: int) -> tuple[int, int, bool, int]:
    """(BLOCK_N, BLOCK_K, ONE_GROUP, num_warps)."""
    if interpreting():
        block_n, cap, warps = 16, 32, 1
    else:
        block_n, cap, warps = 16, 256, 4
    bk = min(cap, next_pow2(k))
    return block_n, bk, group % bk == 0, warps


@register("fused_moe_int4", "triton")
def fused_moe_int4(x: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor, w13_zeros: Optional[torch.Tensor],
                   w2: torch.Tensor, w2_scales: torch.Tensor, w2_zeros: Optional[torch.Tensor],
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, groups: tuple[int, int]) -> torch.Tensor:
    args = (x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, topk_weights, topk_ids, groups)
    num_tokens, top_k = topk_ids.shape
    if (not (x.is_cuda or interpreting()) or num_tokens * top_k > SMALL_BATCH or num_tokens == 0
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return fused_moe_int4_torch(*args)
    check_moe_int4_operands(x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, groups)
    e, d, i = w13.shape[0], x.shape[1], w2.shape[2] * 8
    x = x.contiguous()
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    n_assign = ids.numel()
    h = torch.empty(n_assign, i, dtype=x.dtype, device=x.device)
    bn, bk, one, warps = _settings(d, groups[0])
    z13 = w13_zeros if w13_zeros is not None else w13_scales
    _gate_up_kernel[(n_assign, triton.cdiv(i, bn))](
        x, ids, w13, w13_scales, z13, h, e, i, d, top_k, x.stride(0), w13.stride(0), w13.stride(1),
        w13_scales.stride(0), w13_scales.stride(1), h.stride(0), GROUP=groups[0], HAS_ZP=w13_zeros is not None,
        ONE_GROUP=one, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    y = torch.empty(n_assign, d, dtype=torch.float32, device=x.device)
    bn, bk, one, warps = _settings(i, groups[1])
    z2 = w2_zeros if w2_zeros is not None else w2_scales
    _down_kernel[(n_assign, triton.cdiv(d, bn))](
        h, ids, wts, w2, w2_scales, z2, y, e, i, d, h.stride(0), w2.stride(0), w2.stride(1),
        w2_scales.stride(0), w2_scales.stride(1), y.stride(0), GROUP=groups[1], HAS_ZP=w2_zeros is not None,
        ONE_GROUP=one, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y.view(num_tokens, top_k, d).sum(1).to(x.dtype)
