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

Larger batches take the sorted path: the assignments sorted by expert into BLOCK_M-row blocks
(ops/triton/moe_align.py, as the 16-bit and fp8 fused MoE), then two grouped GEMMs whose
programs each multiply one block's gathered rows by tiles of its expert's weight dequantized
in registers (`tl.dot`): gate and up together with silu(gate) * up in the epilogue, then down;
the k slots of each token are summed with their routing weights in fp32.

With activation reordering (per-expert g_idx) every kernel reads each input feature's group
from g_idx (HAS_GIDX) instead of k // GROUP. W4A8 (`act_int8`) rounds x and h through int8 per
row between the launches (the torch op's definition).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.moe_int4 import check_moe_int4_operands, int8_rows_roundtrip
from deepserve.ops.moe_int4 import fused_moe_int4 as fused_moe_int4_torch
from deepserve.ops.registry import register
from deepserve.ops.triton._common import dot_dtype, interpreting, next_pow2
from deepserve.ops.triton.int4_gemm import _dequant_tile
from deepserve.ops.triton.moe_align import align_by_expert

SMALL_BATCH = 64   # assignments (tokens x top_k) up to which the per-assignment kernels run


@triton.jit
def _expert_rows_dot(v_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, rows, row_ok, K, stride_qn, stride_sn,
                     GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N]: rows `rows` of one expert's dequantized [*, K] matrix times vector v [K]
    (the weight rounded to v's dtype first); rows where `row_ok` is false give 0."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = _dequant_tile(qw_ptr, s_ptr, z_ptr, g_ptr, rows, offs_k, row_ok, k_ok, stride_qn, stride_sn,
                          GROUP, HAS_ZP, HAS_GIDX, ONE_GROUP)
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
def _gate_up_kernel(x_ptr, ids_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, h_ptr, E, I, D, top_k,
                    stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ha,
                    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a, e, valid, rows, row_ok = _assignment(ids_ptr, E, I, BLOCK_N)
    h_rows = h_ptr + a.to(tl.int64) * stride_ha + rows
    x = x_ptr + (a // top_k).to(tl.int64) * stride_xt
    qw = qw_ptr + e.to(tl.int64) * stride_qe
    s = s_ptr + e.to(tl.int64) * stride_se
    z = z_ptr + e.to(tl.int64) * stride_se
    g = g_ptr + e.to(tl.int64) * stride_ge
    gate = _expert_rows_dot(x, qw, s, z, g, rows, row_ok & valid, D, stride_qn, stride_sn, GROUP, HAS_ZP,
                            HAS_GIDX, ONE_GROUP, BLOCK_N, BLOCK_K)
    up = _expert_rows_dot(x, qw, s, z, g, rows + I, row_ok & valid, D, stride_qn, stride_sn, GROUP, HAS_ZP,
                          HAS_GIDX, ONE_GROUP, BLOCK_N, BLOCK_K)
    dt = h_ptr.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)
    up = up.to(dt).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(h_rows, (silu * up).to(dt), mask=row_ok)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, E, I, D,
                 stride_ha, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ya,
                 GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a, e, valid, rows, row_ok = _assignment(ids_ptr, E, D, BLOCK_N)
    y_rows = y_ptr + a.to(tl.int64) * stride_ya + rows
    h = h_ptr + a.to(tl.int64) * stride_ha
    y = _expert_rows_dot(h, qw_ptr + e.to(tl.int64) * stride_qe, s_ptr + e.to(tl.int64) * stride_se,
                         z_ptr + e.to(tl.int64) * stride_se, g_ptr + e.to(tl.int64) * stride_ge, rows,
                         row_ok & valid, I, stride_qn, stride_sn, GROUP, HAS_ZP, HAS_GIDX, ONE_GROUP, BLOCK_N, BLOCK_K)
    y = y.to(h_ptr.dtype.element_ty).to(tl.float32)        # the reference's down output in x's dtype
    tl.store(y_rows, y * tl.load(wts_ptr + a).to(tl.float32), mask=row_ok)


@triton.jit
def _sorted_block(sorted_ptr, block_expert_ptr, n_assign, qw_ptr, s_ptr, z_ptr, g_ptr, stride_qe, stride_se,
                  stride_ge, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's block: its expert (E past the last segment), assignment rows (n_assign is
    padding) and their mask, the expert's weight / scale / zero / g_idx pointers, the output columns."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < n_assign
    e = expert.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return (expert, tl.where(row_ok, rows, 0).to(tl.int64), row_ok, qw_ptr + e * stride_qe, s_ptr + e * stride_se,
            z_ptr + e * stride_se, g_ptr + e * stride_ge, offs_n, offs_n < N)


@triton.jit
def _expert_tile_dot(a, acc, qw, s, z, g, offs_n, n_ok, offs_k, k_ok, stride_qn, stride_sn, GROUP: tl.constexpr,
                     HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     X_DTYPE: tl.constexpr):
    """acc + a [BM, BK] @ W[offs_n, offs_k]^T, W dequantized and rounded to the activations' dtype."""
    w = _dequant_tile(qw, s, z, g, offs_n, offs_k, n_ok, k_ok, stride_qn, stride_sn, GROUP, HAS_ZP, HAS_GIDX,
                      ONE_GROUP)
    return tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(X_DTYPE).to(DOT_DTYPE)), acc)


@triton.jit
def _sorted_gate_up_kernel(x_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, h_ptr, n_assign, E, I,
                           D, top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ha,
                           GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    expert, rows, row_ok, qw, s, z, g, offs_n, n_ok = _sorted_block(
        sorted_ptr, block_expert_ptr, n_assign, qw_ptr, s_ptr, z_ptr, g_ptr, stride_qe, stride_se, stride_ge, I,
        BLOCK_M, BLOCK_N)
    if expert < E:
        x_rows = x_ptr + (rows // top_k) * stride_xt
        dt = h_ptr.dtype.element_ty
        gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < D
            a = tl.load(x_rows[:, None] + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            gate = _expert_tile_dot(a, gate, qw, s, z, g, offs_n, n_ok, offs_k, k_ok, stride_qn, stride_sn, GROUP,
                                    HAS_ZP, HAS_GIDX, ONE_GROUP, DOT_DTYPE, dt)
            up = _expert_tile_dot(a, up, qw, s, z, g, offs_n + I, n_ok, offs_k, k_ok, stride_qn, stride_sn, GROUP,
                                  HAS_ZP, HAS_GIDX, ONE_GROUP, DOT_DTYPE, dt)
        gate = gate.to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * stride_ha + offs_n[None, :], (silu * up.to(dt).to(tl.float32)).to(dt),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sorted_down_kernel(h_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, n_assign, E, I, D,
                        stride_ha, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ya,
                        GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    expert, rows, row_ok, qw, s, z, g, offs_n, n_ok = _sorted_block(
        sorted_ptr, block_expert_ptr, n_assign, qw_ptr, s_ptr, z_ptr, g_ptr, stride_qe, stride_se, stride_ge, D,
        BLOCK_M, BLOCK_N)
    if expert < E:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < I
            a = tl.load(h_ptr + rows[:, None] * stride_ha + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = _expert_tile_dot(a, acc, qw, s, z, g, offs_n, n_ok, offs_k, k_ok, stride_qn, stride_sn, GROUP,
                                   HAS_ZP, HAS_GIDX, ONE_GROUP, DOT_DTYPE, h_ptr.dtype.element_ty)
        tl.store(y_ptr + rows[:, None] * stride_ya + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def _gidx(g_idx: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(pointer operand, expert stride, HAS_GIDX) of an optional [E, K] g_idx."""
    if g_idx is None:
        return placeholder, 0, False
    g_idx = g_idx.to(torch.int32).contiguous()
    return g_idx, g_idx.stride(0), True


def _sorted_path(x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, topk_weights, topk_ids, groups,
                 w13_g_idx=None, w2_g_idx=None, act_int8=False):
    num_tokens, top_k = topk_ids.shape
    e, d, i = w13.shape[0], x.shape[1], w2.shape[2] * 8
    n_assign = num_tokens * top_k
    if interpreting():
        bm, bn, cap, warps = 16, 16, 32, 1
    else:
        bm, bn, cap, warps = 64, 64, 64, 4
    aligned = align_by_expert(topk_ids, e, bm)
    h = torch.empty(n_assign, i, dtype=x.dtype, device=x.device)
    y = torch.zeros(n_assign, d, dtype=x.dtype, device=x.device)       # rows of other EP ranks stay 0
    common = dict(DOT_DTYPE=dot_dtype(x.dtype), BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    bk = min(cap, next_pow2(d))
    g13, sg13, has13 = _gidx(w13_g_idx, w13)
    _sorted_gate_up_kernel[(aligned.num_blocks, triton.cdiv(i, bn))](
        x, aligned.sorted_ids, aligned.block_expert, w13, w13_scales,
        w13_zeros if w13_zeros is not None else w13_scales, g13, h, n_assign, e, i, d, top_k, x.stride(0),
        w13.stride(0), w13.stride(1), w13_scales.stride(0), w13_scales.stride(1), sg13, h.stride(0),
        GROUP=groups[0], HAS_ZP=w13_zeros is not None, HAS_GIDX=has13, ONE_GROUP=not has13 and groups[0] % bk == 0,
        BLOCK_K=bk, **common)
    if act_int8:
        h = int8_rows_roundtrip(h)
    bk = min(cap, next_pow2(i))
    g2, sg2, has2 = _gidx(w2_g_idx, w2)
    _sorted_down_kernel[(aligned.num_blocks, triton.cdiv(d, bn))](
        h, aligned.sorted_ids, aligned.block_expert, w2, w2_scales, w2_zeros if w2_zeros is not None else w2_scales,
        g2, y, n_assign, e, i, d, h.stride(0), w2.stride(0), w2.stride(1), w2_scales.stride(0), w2_scales.stride(1),
        sg2, y.stride(0), GROUP=groups[1], HAS_ZP=w2_zeros is not None, HAS_GIDX=has2,
        ONE_GROUP=not has2 and groups[1] % bk == 0, BLOCK_K=bk, **common)
    weighted = y.float().view(num_tokens, top_k, d) * topk_weights.float()[..., None]
    return weighted.sum(1).to(x.dtype)


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
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, groups: tuple[int, int],
                   w13_g_idx: Optional[torch.Tensor] = None, w2_g_idx: Optional[torch.Tensor] = None,
                   act_int8: bool = False) -> torch.Tensor:
    args = (x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, topk_weights, topk_ids, groups)
    num_tokens, top_k = topk_ids.shape
    if (not (x.is_cuda or interpreting()) or num_tokens == 0
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return fused_moe_int4_torch(*args, w13_g_idx, w2_g_idx, act_int8)
    check_moe_int4_operands(x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, groups, w13_g_idx, w2_g_idx)
    if act_int8:          # W4A8: int8 per-token activations, emulated on the W4A16 kernels
        x = int8_rows_roundtrip(x)
    if num_tokens * top_k > SMALL_BATCH:
        return _sorted_path(x.contiguous(), *args[1:], w13_g_idx, w2_g_idx, act_int8)
    e, d, i = w13.shape[0], x.shape[1], w2.shape[2] * 8
    x = x.contiguous()
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    n_assign = ids.numel()
    h = torch.empty(n_assign, i, dtype=x.dtype, device=x.device)
    bn, bk, one, warps = _settings(d, groups[0])
    z13 = w13_zeros if w13_zeros is not None else w13_scales
    g13, sg13, has13 = _gidx(w13_g_idx, w13)
    _gate_up_kernel[(n_assign, triton.cdiv(i, bn))](
        x, ids, w13, w13_scales, z13, g13, h, e, i, d, top_k, x.stride(0), w13.stride(0), w13.stride(1),
        w13_scales.stride(0), w13_scales.stride(1), sg13, h.stride(0), GROUP=groups[0], HAS_ZP=w13_zeros is not None,
        HAS_GIDX=has13, ONE_GROUP=one and not has13, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    if act_int8:
        h = int8_rows_roundtrip(h)
    y = torch.empty(n_assign, d, dtype=torch.float32, device=x.device)
    bn, bk, one, warps = _settings(i, groups[1])
    z2 = w2_zeros if w2_zeros is not None else w2_scales
    g2, sg2, has2 = _gidx(w2_g_idx, w2)
    _down_kernel[(n_assign, triton.cdiv(d, bn))](
        h, ids, wts, w2, w2_scales, z2, g2, y, e, i, d, h.stride(0), w2.stride(0), w2.stride(1),
        w2_scales.stride(0), w2_scales.stride(1), sg2, y.stride(0), GROUP=groups[1], HAS_ZP=w2_zeros is not None,
        HAS_GIDX=has2, ONE_GROUP=one and not has2, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y.view(num_tokens, top_k, d).sum(1).to(x.dtype)
