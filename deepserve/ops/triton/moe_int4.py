"""W4A16 fused MoE, small-batch path, as Triton kernels: routed experts with 4-bit weights
(layout: ops/moe_int4.py, whose torch op is the oracle) dequantized in registers.

At decode a step routes a few tokens to top-k experts each; every (token, slot) assignment
is a pair of matrix-vector products on one expert, so the time is the packed weights' bytes.
Two launches, the matrix-vector products of ops/triton/int4_gemm.py (`int4_rows_dot`: each
packed word loaded once, nibbles unpacked in registers; DEQ and, for DEQ 3, WORDS words a
thread as the GEMV's `gemv_deq` decides them) on BLOCK_N rows per program:

1. `_gate_up_kernel`, program (assignment a, row block): h[a, n] = silu(G[e] x_t)[n] *
   (U[e] x_t)[n] for the gate and up rows n of expert e = topk_ids[a] (gate rows, then the up
   rows I below), the block's gate and up rows in one tile, so x is read once for both;
2. `_down_kernel`, program (token t, row block): y[t, n] = sum over t's k slots j of
   topk_weight[t, j] * (W2[e_j] h[t k + j])[n], the sum in fp32 registers (no [T k, D] buffer).

Assignments to experts outside [0, E) (another EP rank's) add nothing. Rounding follows the
reference: gate and up rounded to x's dtype before silu * up, h rounded to x's dtype before
the down projection, each slot's down output rounded before its weight.

Larger batches take the sorted path: the assignments sorted by expert into BLOCK_M-row blocks
(ops/triton/moe_align.py, as the 16-bit and fp8 fused MoE), then two grouped GEMMs whose
programs each multiply one block's gathered rows by tiles of its expert's weight dequantized
in registers (`tl.dot`): gate and up together with silu(gate) * up in the epilogue, then down,
whose epilogue writes each assignment's output times its routing weight in fp32; the k slots
of each token are then summed.

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
from deepserve.ops.int4 import PACK
from deepserve.ops.triton._common import (cdiv, dot_dtype, interpreting, next_pow2, pdl_begin, pdl_launch,
                                          unpack_by_ptx)
from deepserve.ops.triton.int4_gemm import (MAGIC, dequant_tile, gemv_deq, int4_rows_dot, int4_settings,
                                             lane_minus, pairs_mode, slice_words)
from deepserve.ops.triton.int4_half2 import SCALE as SCALE16
from deepserve.ops.triton.int4_half2 import magic16_of, pair_sum16, pairs_fma16, x_pairs
from deepserve.ops.triton.int4_mma import pair_order
from deepserve.ops.triton.moe_align import align_by_expert

SMALL_BATCH = 64   # assignments (tokens x top_k) up to which the per-assignment kernels run


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, h_ptr, E, I, DW, top_k, magic,
                    stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ha,
                    GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr, STEPS: tl.constexpr,
                    DEQ: tl.constexpr, USE_PDL: tl.constexpr, ASM: tl.constexpr = 0, WORDS: tl.constexpr = 1):
    """h[a, n] = silu(G[e] x_t)[n] * (U[e] x_t)[n], e = ids[a], t = a // top_k, for BLOCK_N rows n:
    the gate and up rows of the block in one tile of 2 BLOCK_N rows (gate row n, then up row
    I + n), so each word of x is read once for both. WORDS: DEQ 3's words a thread
    (`int4_rows_dot`; a slice is WORDS SUB_C words)."""
    pdl_begin(USE_PDL)
    a, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + a)
    valid = (e >= 0) & (e < E)
    e = tl.where(valid, e, 0).to(tl.int64)
    j = tl.arange(0, 2 * BLOCK_N)
    pair_rows = tl.minimum(pid_n * BLOCK_N + j // 2, I - 1)     # (rows past I: not stored)
    w_rows = (pair_rows + (j % 2) * I).to(tl.int64)
    x = x_ptr + (a // top_k).to(tl.int64) * stride_xt
    dt = h_ptr.dtype.element_ty
    qw, s, z = qw_ptr + e * stride_qe, s_ptr + e * stride_se, z_ptr + e * stride_se
    y = int4_rows_dot(qw + w_rows * stride_qn, x, s + w_rows * stride_sn, z + w_rows * stride_sn,
                      g_ptr + e * stride_ge, 0, DW, magic, GROUP, HAS_ZP, HAS_GIDX, EVEN, 2 * BLOCK_N, SUB_C,
                      STEPS, dt, DEQ, ASM=ASM, WORDS=WORDS)
    gate, up = tl.split(tl.reshape(y, [BLOCK_N, 2]))
    gate = gate.to(dt).to(tl.float32)
    up = up.to(dt).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(h_ptr + a.to(tl.int64) * stride_ha + rows, tl.where(valid, silu * up, 0.0).to(dt), mask=rows < I)


@triton.jit
def _down_kernel(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, E, D, IW, magic,
                 stride_ha, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_yt,
                 TOP_K: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                 EVEN: tl.constexpr, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr, STEPS: tl.constexpr,
                 DEQ: tl.constexpr, SLOTS: tl.constexpr, USE_PDL: tl.constexpr, ASM: tl.constexpr = 0,
                 WORDS: tl.constexpr = 1):
    """y[t, n] = sum over token t's slots j of wts[t, j] * (W2[e_j] h[t k + j])[n] (each slot's
    product rounded to h's dtype first, as the reference), for BLOCK_N rows n.

    SLOTS (a launch setting; 0: off): the slots one after another, each a matrix-vector product
    whose loads wait for the one before; else every slot's words of a step in one
    [SLOTS, SUB_C, BLOCK_N] tile (SLOTS: TOP_K rounded up to a power of two), TOP_K times the
    bytes in flight (`_all_slots_dot`; groups of whole words; DEQ 3: `_all_slots_half2`, else
    DEQ 1's unpacking). WORDS (slots one after another): DEQ 3's words a thread, as the gate_up
    kernel's."""
    pdl_begin(USE_PDL)
    t, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < D
    r = tl.minimum(rows, D - 1).to(tl.int64)          # (rows past D: not stored)
    dt = h_ptr.dtype.element_ty
    if SLOTS > 0 and DEQ == 3:
        out = _all_slots_half2(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, r, t, E, IW, magic, stride_ha,
                               stride_qe, stride_qn, stride_se, stride_sn, TOP_K, GROUP, HAS_ZP, EVEN, BLOCK_N, SUB_C,
                               STEPS, SLOTS, dt, ASM)
        tl.store(y_ptr + t.to(tl.int64) * stride_yt + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)
        return
    if SLOTS > 0:
        out = _all_slots_dot(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, r, t, E, IW, magic, stride_ha, stride_qe,
                             stride_qn, stride_se, stride_sn, TOP_K, GROUP, HAS_ZP, EVEN, BLOCK_N, SUB_C, STEPS,
                             SLOTS, dt)
        tl.store(y_ptr + t.to(tl.int64) * stride_yt + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)
        return
    out = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        a = t * TOP_K + j
        e = tl.load(ids_ptr + a)
        if (e >= 0) & (e < E):
            ex = e.to(tl.int64)
            y = int4_rows_dot(qw_ptr + ex * stride_qe + r * stride_qn, h_ptr + a.to(tl.int64) * stride_ha,
                              s_ptr + ex * stride_se + r * stride_sn, z_ptr + ex * stride_se + r * stride_sn,
                              g_ptr + ex * stride_ge, 0, IW, magic, GROUP, HAS_ZP, HAS_GIDX, EVEN, BLOCK_N,
                              SUB_C, STEPS, dt, DEQ, ASM=ASM, WORDS=WORDS)
            out += y.to(dt).to(tl.float32) * tl.load(wts_ptr + a).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _all_slots_dot(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, r, t, E, IW, magic, stride_ha, stride_qe, stride_qn,
                   stride_se, stride_sn, TOP_K: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                   EVEN: tl.constexpr, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr, STEPS: tl.constexpr,
                   SLOTS: tl.constexpr, dt: tl.constexpr):
    """fp32 [BLOCK_N]: sum over token t's slots j of wts[t, j] * (W2[e_j] h[t k + j])[r], each
    slot's product rounded to dt first, all slots at once: a step loads a [SLOTS, SUB_C,
    BLOCK_N] tile of words (slots past TOP_K and assignments to other ranks' experts masked,
    adding nothing), each slot's h lanes as [SLOTS, SUB_C] shared by its BLOCK_N rows. The
    arithmetic of `int4_rows_dot` with DEQ 1 (words visited in swapped pairs, each lane the
    exact u - z times h, times the word's scale once), on a slot axis."""
    offs_s = tl.arange(0, SLOTS)
    a = t * TOP_K + offs_s
    e = tl.load(ids_ptr + a, mask=offs_s < TOP_K, other=-1)
    use = (offs_s < TOP_K) & (e >= 0) & (e < E)
    ex = tl.where(use, e, 0).to(tl.int64)
    qw_rows = qw_ptr + ex[:, None] * stride_qe + r[None, :] * stride_qn          # [S, BN]
    s_rows = s_ptr + ex[:, None] * stride_se + r[None, :] * stride_sn
    z_rows = z_ptr + ex[:, None] * stride_se + r[None, :] * stride_sn
    h_rows = h_ptr + tl.where(use, a, 0).to(tl.int64) * stride_ha                # [S]
    perm = tl.arange(0, SUB_C) ^ 1
    acc = tl.zeros([SLOTS, SUB_C, BLOCK_N], tl.float32)
    for c_step in range(0, IW, SUB_C * STEPS):
        for sub in tl.static_range(STEPS):
            offs_c = c_step + sub * SUB_C + perm
            if EVEN:
                ok = use[:, None]                                                       # [S, C]
            else:
                ok = use[:, None] & (offs_c < IW)[None, :]
            w = tl.load(qw_rows[:, None, :] + offs_c[None, :, None], mask=ok[:, :, None], other=0)
            hi = w >> 16
            tw = tl.zeros([SLOTS, SUB_C, BLOCK_N], tl.float32)
            hs = tl.zeros([SLOTS, SUB_C], tl.float32)
            for q in tl.static_range(8):
                x = tl.load(h_rows[:, None] + 8 * offs_c[None, :] + q, mask=ok, other=0.0).to(tl.float32)
                if HAS_ZP:
                    tw += lane_minus(w if q < 4 else hi, magic, q, 0.0) * x[:, :, None]
                    hs += x
                else:
                    tw += lane_minus(w if q < 4 else hi, magic, q, 8.0) * x[:, :, None]
            grp = (8 * offs_c) // GROUP
            sc = tl.load(s_rows[:, None, :] + grp[None, :, None], mask=ok[:, :, None], other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_rows[:, None, :] + grp[None, :, None], mask=ok[:, :, None], other=8).to(tl.float32)
                tw -= z * hs[:, :, None]
            acc += tw * sc
    y = tl.sum(acc, axis=1)                                                              # [S, BN]
    wts = tl.load(wts_ptr + a, mask=use, other=0.0).to(tl.float32)
    return tl.sum(y.to(dt).to(tl.float32) * wts[:, None], axis=0)


@triton.jit
def _all_slots_half2(h_ptr, ids_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, r, t, E, IW, magic, stride_ha, stride_qe,
                     stride_qn, stride_se, stride_sn, TOP_K: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                     EVEN: tl.constexpr, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr, STEPS: tl.constexpr,
                     SLOTS: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """`_all_slots_dot` in packed fp16 (DEQ 3, one word a thread: `int4_half2`): a step's words of
    every slot as one column axis of SLOTS SUB_C words (column j: slot j // SUB_C, its word
    (j % SUB_C) ^ 1 of the slice), a [SLOTS SUB_C, BLOCK_N] tile whose columns each read their
    slot's h pairs (h's row as a [columns, 1] pointer, which `x_pairs` offsets by the word), so
    the GEMV's per-word arithmetic runs unchanged; the word sums are reduced per slot at the end."""
    j = tl.arange(0, SLOTS * SUB_C)
    slot = j // SUB_C
    a = t * TOP_K + slot
    e = tl.load(ids_ptr + a, mask=slot < TOP_K, other=-1)
    use = (slot < TOP_K) & (e >= 0) & (e < E)                                   # [SC]
    ex = tl.where(use, e, 0).to(tl.int64)
    qw_cols = qw_ptr + ex[:, None] * stride_qe + r[None, :] * stride_qn          # [SC, BN]
    s_cols = s_ptr + ex[:, None] * stride_se + r[None, :] * stride_sn
    z_cols = z_ptr + ex[:, None] * stride_se + r[None, :] * stride_sn
    h_cols = (h_ptr + tl.where(use, a, 0).to(tl.int64) * stride_ha)[:, None]    # [SC, 1]
    word = (j % SUB_C) ^ 1
    magic16 = magic16_of(magic)
    acc = tl.zeros([SLOTS * SUB_C, BLOCK_N], tl.float32)
    for c_step in range(0, IW, SUB_C * STEPS):
        for sub in tl.static_range(STEPS):
            offs_c = c_step + sub * SUB_C + word
            if EVEN:
                ok = use
            else:
                ok = use & (offs_c < IW)
            w = tl.load(qw_cols + offs_c[:, None], mask=ok[:, None], other=0)
            x04, x15, x26, x37, xs = x_pairs(h_cols, offs_c, ok, False, ASM)
            pairs = pairs_fma16(w, x04[:, None], x15[:, None], x26[:, None], x37[:, None],
                                tl.zeros(w.shape, tl.int32), magic16, ASM)
            tw = pair_sum16(pairs, ASM)
            grp = (8 * offs_c) // GROUP
            sc = tl.load(s_cols + grp[:, None], mask=ok[:, None], other=0.0).to(tl.float32)
            if HAS_ZP:
                z = tl.load(z_cols + grp[:, None], mask=ok[:, None], other=8).to(tl.float32)
                tw -= (z - 8.0) * (xs * (1.0 / SCALE16))[:, None]
            acc += tw * sc
    y = tl.sum(tl.reshape(acc, [SLOTS, SUB_C, BLOCK_N]), axis=1) * SCALE16                # [S, BN]
    offs_s = tl.arange(0, SLOTS)
    a_s = t * TOP_K + offs_s
    e_s = tl.load(ids_ptr + a_s, mask=offs_s < TOP_K, other=-1)
    wts = tl.load(wts_ptr + a_s, mask=(offs_s < TOP_K) & (e_s >= 0) & (e_s < E), other=0.0).to(tl.float32)
    return tl.sum(y.to(dt).to(tl.float32) * wts[:, None], axis=0)


@triton.jit
def _sorted_block(sorted_ptr, block_expert_ptr, n_assign, qw_ptr, s_ptr, z_ptr, g_ptr, stride_qe, stride_qn,
                  stride_se, stride_sn, stride_ge, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's block: its expert (E past the last segment), assignment rows (n_assign is
    padding) and their mask, its output columns and their mask, and the pointers of those
    columns' packed rows, scale / zero rows and the expert's g_idx."""
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < n_assign
    e = expert.to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = offs_n.to(tl.int64)
    return (expert, tl.where(row_ok, rows, 0).to(tl.int64), row_ok, offs_n, offs_n < N,
            qw_ptr + e * stride_qe + n * stride_qn, s_ptr + e * stride_se + n * stride_sn,
            z_ptr + e * stride_se + n * stride_sn, g_ptr + e * stride_ge)


@triton.jit
def _tile_dot(a_rows, row_ok, acc, qw_rows, s_rows, z_rows, g, n_ok, c0, KW, magic, GROUP: tl.constexpr,
              HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, SCALES: tl.constexpr, EVEN: tl.constexpr,
              DOT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr, PAIRS: tl.constexpr):
    """acc + A[rows, words c0 ..] @ W[cols, words c0 ..]^T, W dequantized (rounded to A's dtype;
    PAIRS: in bf16 pairs, the activations read in the tile's pair order)."""
    w = dequant_tile(qw_rows, s_rows, z_rows, g, n_ok, c0, KW, magic, GROUP, HAS_ZP, HAS_GIDX, SCALES, EVEN, BLOCK_N,
                     SUB_C, a_rows.dtype.element_ty, PAIRS)
    f = 8 * c0 + tl.arange(0, 8 * SUB_C)
    a = tl.load(a_rows[:, None] + f[None, :], mask=row_ok[:, None] & (f < 8 * KW)[None, :], other=0.0)
    a = pair_order(a, a_rows.shape[0], SUB_C, PAIRS)
    return tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)


@triton.jit
def _sorted_gate_up_kernel(x_ptr, sorted_ptr, block_expert_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, h_ptr, n_assign, E, I,
                           DW, top_k, magic, stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ha,
                           GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, SCALES: tl.constexpr,
                           EVEN: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, PAIRS: tl.constexpr):
    SUB_C: tl.constexpr = BLOCK_K // 8
    expert, rows, row_ok, offs_n, n_ok, qw, s, z, g = _sorted_block(
        sorted_ptr, block_expert_ptr, n_assign, qw_ptr, s_ptr, z_ptr, g_ptr, stride_qe, stride_qn, stride_se,
        stride_sn, stride_ge, I, BLOCK_M, BLOCK_N)
    if expert < E:
        x_rows = x_ptr + (rows // top_k) * stride_xt
        dt = h_ptr.dtype.element_ty
        up_qw, up_s, up_z = qw + I * stride_qn, s + I * stride_sn, z + I * stride_sn        # up rows I + n
        gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c0 in range(0, DW, SUB_C):
            gate = _tile_dot(x_rows, row_ok, gate, qw, s, z, g, n_ok, c0, DW, magic, GROUP, HAS_ZP, HAS_GIDX, SCALES,
                             EVEN, DOT_DTYPE, BLOCK_N, SUB_C, PAIRS)
            up = _tile_dot(x_rows, row_ok, up, up_qw, up_s, up_z, g, n_ok, c0, DW, magic, GROUP, HAS_ZP, HAS_GIDX,
                           SCALES, EVEN, DOT_DTYPE, BLOCK_N, SUB_C, PAIRS)
        gate = gate.to(dt).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * stride_ha + offs_n[None, :], (silu * up.to(dt).to(tl.float32)).to(dt),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sorted_down_kernel(h_ptr, sorted_ptr, block_expert_ptr, wts_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, n_assign, E,
                        D, IW, magic,
                        stride_ha, stride_qe, stride_qn, stride_se, stride_sn, stride_ge, stride_ya,
                        GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, SCALES: tl.constexpr,
                        EVEN: tl.constexpr, DOT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PAIRS: tl.constexpr):
    SUB_C: tl.constexpr = BLOCK_K // 8
    expert, rows, row_ok, offs_n, n_ok, qw, s, z, g = _sorted_block(
        sorted_ptr, block_expert_ptr, n_assign, qw_ptr, s_ptr, z_ptr, g_ptr, stride_qe, stride_qn, stride_se,
        stride_sn, stride_ge, D, BLOCK_M, BLOCK_N)
    if expert < E:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c0 in range(0, IW, SUB_C):
            acc = _tile_dot(h_ptr + rows * stride_ha, row_ok, acc, qw, s, z, g, n_ok, c0, IW, magic, GROUP, HAS_ZP,
                            HAS_GIDX, SCALES, EVEN, DOT_DTYPE, BLOCK_N, SUB_C, PAIRS)
        # fp32 y[a] = routing weight * (the product rounded to h's dtype, the reference's output)
        wt = tl.load(wts_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * wt[:, None]
        tl.store(y_ptr + rows[:, None] * stride_ya + offs_n[None, :], y, mask=row_ok[:, None] & n_ok[None, :])


def _gidx(g_idx: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(pointer operand, expert stride, HAS_GIDX) of an optional [E, K] g_idx."""
    if g_idx is None:
        return placeholder, 0, False
    g_idx = g_idx.to(torch.int32).contiguous()
    return g_idx, g_idx.stride(0), True


def _matrix(w, scales, zeros, g_idx, group: int, words: int, min_k: int = 0) -> dict:
    """One stacked matrix's launch operands and its K-slice constants (SUB_C, SCALES): slices of
    `words` words (fewer where K has fewer, as if K were at least min_k)."""
    g, sg, has_g = _gidx(g_idx, w)
    kw = w.shape[2]
    sub, mode = slice_words(max(kw * PACK, min_k), group, has_g, words)
    return dict(ptrs=(w, scales, zeros if zeros is not None else scales, g),
                strides=(w.stride(0), w.stride(1), scales.stride(0), scales.stride(1), sg),
                sub=sub, consts=dict(GROUP=group, HAS_ZP=zeros is not None, HAS_GIDX=has_g, SCALES=mode))


def _gemv_matrix(w, scales, zeros, g_idx, group: int, cfg: dict, dtype: torch.dtype, one_word: bool = False) -> dict:
    """One stacked matrix's operands and settings for the matrix-vector kernels (`int4_rows_dot`),
    decided as the GEMV's `gemv_deq`: DEQ (fp32 activations take 1 for 3) and WORDS (DEQ 3's
    words a thread: 1 where a thread's words could straddle groups, with g_idx, odd words a row
    or rows not 8-byte aligned, and with one_word); slices of `sub` words a thread-column (at
    least 2, at most K's words rounded up to a power of two), WORDS sub words each, STEPS a
    loop trip, EVEN where K is whole loop trips."""
    g, sg, has_g = _gidx(g_idx, w)
    kw = w.shape[2]
    # (rows of an expert 8-byte aligned: every row and expert stride even, as a contiguous row of
    # even words is)
    odd_strides = bool(w.stride(0) % 2 or w.stride(1) % 2) or one_word
    deq, words = gemv_deq(cfg, dtype, group, has_g, w[0], odd_strides)
    sub = max(2, min(cfg["SUB_C"], next_pow2(kw)))
    steps = max(1, min(cfg["STEPS"], cdiv(kw, sub * words)))
    return dict(ptrs=(w, scales, zeros if zeros is not None else scales, g),
                strides=(w.stride(0), w.stride(1), scales.stride(0), scales.stride(1), sg),
                consts=dict(GROUP=group, HAS_ZP=zeros is not None, HAS_GIDX=has_g, SUB_C=sub, STEPS=steps,
                            EVEN=kw % (sub * words * steps) == 0, DEQ=deq, WORDS=words))


def _sorted_path(x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, topk_weights, topk_ids, groups,
                 w13_g_idx=None, w2_g_idx=None, act_int8=False):
    num_tokens, top_k = topk_ids.shape
    e, d, i = w13.shape[0], x.shape[1], w2.shape[2] * PACK
    n_assign = num_tokens * top_k
    cfg = int4_settings("moe_sorted", n_assign // max(e, 1), 2 * i, d, x.device)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    aligned = align_by_expert(topk_ids, e, bm)
    h = torch.empty(n_assign, i, dtype=x.dtype, device=x.device)
    y = torch.zeros(n_assign, d, dtype=torch.float32, device=x.device)  # rows of other EP ranks stay 0
    wts = topk_weights.reshape(-1).contiguous()
    common = dict(DOT_DTYPE=dot_dtype(x.dtype), BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    for name, (w, s, z, g_idx, group, k_out, a_in, out) in {
            "gate_up": (w13, w13_scales, w13_zeros, w13_g_idx, groups[0], i, x, h),
            "down": (w2, w2_scales, w2_zeros, w2_g_idx, groups[1], d, h, y)}.items():
        mat = _matrix(w, s, z, g_idx, group, cfg["BLOCK_K"] // PACK)
        if mat["sub"] < 4:                         # a step feeds tl.dot at least 32 columns
            mat = _matrix(w, s, z, g_idx, group, 4, min_k=32)
        sub = mat["sub"]
        kw = w.shape[2]
        grid = (aligned.num_blocks, cdiv(k_out, bn))
        if name == "gate_up":
            _sorted_gate_up_kernel[grid](
                a_in, aligned.sorted_ids, aligned.block_expert, *mat["ptrs"], out, n_assign, e, i, kw, top_k, MAGIC,
                a_in.stride(0), *mat["strides"], out.stride(0), EVEN=kw % sub == 0, BLOCK_K=PACK * sub,
                PAIRS=pairs_mode(cfg, a_in.dtype, z is not None, mat["consts"]["SCALES"]), **mat["consts"], **common)
            if act_int8:
                h = int8_rows_roundtrip(h)
        else:
            _sorted_down_kernel[grid](
                h, aligned.sorted_ids, aligned.block_expert, wts, *mat["ptrs"], out, n_assign, e, d, kw, MAGIC, h.stride(0),
                *mat["strides"], out.stride(0), EVEN=kw % sub == 0, BLOCK_K=PACK * sub,
                PAIRS=pairs_mode(cfg, h.dtype, z is not None, mat["consts"]["SCALES"]), **mat["consts"], **common)
    return y.view(num_tokens, top_k, d).sum(1).to(x.dtype)


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
    e, d, i = w13.shape[0], x.shape[1], w2.shape[2] * PACK
    x = x.contiguous()
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    n_assign = ids.numel()
    h = torch.empty(n_assign, i, dtype=x.dtype, device=x.device)
    cfg = int4_settings("moe_gate_up", num_tokens, 2 * i, d, x.device)
    mat = _gemv_matrix(w13, w13_scales, w13_zeros, w13_g_idx, groups[0], cfg, x.dtype)
    _gate_up_kernel[(n_assign, cdiv(i, cfg["BLOCK_N"]))](
        x, ids, *mat["ptrs"], h, e, i, d // PACK, top_k, MAGIC, x.stride(0), *mat["strides"], h.stride(0),
        BLOCK_N=cfg["BLOCK_N"], ASM=unpack_by_ptx(), num_warps=cfg["num_warps"], num_stages=1, **mat["consts"],
        **pdl_launch(x.device))
    if act_int8:
        h = int8_rows_roundtrip(h)
    y = torch.empty(num_tokens, d, dtype=x.dtype, device=x.device)
    cfg = int4_settings("moe_down", num_tokens, d, i, x.device)
    whole_words = w2_g_idx is None and groups[1] % PACK == 0     # `_all_slots_dot`'s cases
    slots = next_pow2(top_k) if cfg["SLOTS"] and whole_words else 0
    mat = _gemv_matrix(w2, w2_scales, w2_zeros, w2_g_idx, groups[1], cfg, h.dtype, one_word=slots > 0)
    _down_kernel[(num_tokens, cdiv(d, cfg["BLOCK_N"]))](
        h, ids, wts, *mat["ptrs"], y, e, d, i // PACK, MAGIC, h.stride(0), *mat["strides"], y.stride(0), TOP_K=top_k,
        BLOCK_N=cfg["BLOCK_N"], SLOTS=slots, ASM=unpack_by_ptx(), num_warps=cfg["num_warps"], num_stages=1,
        **mat["consts"], **pdl_launch(x.device))
    return y
