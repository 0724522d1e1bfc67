"""Fused MoE experts as two grouped-GEMM Triton kernels over tokens sorted by expert.

After `align_by_expert`, each program of the first kernel multiplies BLOCK_M rows routed
to one expert by that expert's gate and up columns n at once and writes
silu(gate) * up (the activation fused into the GEMM epilogue, so the 2I-wide intermediate
never reaches memory). The second kernel multiplies by the expert's down projection and
writes each (token, slot) row in the activation dtype, as the reference's linear rounds
it; a small kernel then sums each token's k rows times their routing weights in fp32. The
grid is fixed by host-known bounds, so nothing syncs and the whole op can sit in a CUDA
graph. Batches of a few tokens (`use_small_path`) run fused_moe_small.py instead: two GEMV
launches, no sort. The layout follows vLLM's/SGLang's fused_moe (sorted token ids +
per-block expert ids).

Both GEMMs take a 1-D grid in an L2-friendly order (`_block_of`) and, on Hopper and newer,
read the weight tiles through TMA block descriptors (`_weight_tile`); the gathered
activation rows are ordinary loads, which the pipeliner overlaps with the matrix products.

fp8 weights (e4m3 with one fp32 scale_inv per 128x128 block, DeepSeek-V3's format) run as
W8A8: each 128-wide slice of an activation row is quantised to e4m3 with its own scale
(per-token-group quantisation, as DeepSeek-V3's inference does), the product runs on fp8
tensor cores, and both scales are applied to the partial sums. Large batches quantise each
row once beforehand (`_quant_rows`); small ones in registers inside the GEMMs, saving two
launches where the weights' bytes dominate. A checkpoint's static activation scales (one for
the gate/up input, one for the down input) quantise the rows beforehand instead, every group
of a row taking the one scale (`_static_rows`), so the kernels run unchanged. Weights with one
scale a row (compressed-tensors FP8 'channel', scales [E, N, 1]) run the same kernels with
ROW_SCALES, which index the scales by weight row instead of by 128-row block. Weight-only fp8
(a compressed-tensors scheme without input_activations) runs them with A16: the activations
stay in their dtype, the e4m3 weight tile is widened to it (exactly) for the MMA, and the
block's weight scale multiplies the partial sum (W8A16).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deepserve.ops.moe import check_row_scales, check_shared_experts, check_static_scales, check_weight_only
from deepserve.ops.moe import fused_moe as fused_moe_torch
from deepserve.ops.quant import quant_fp8_static
from deepserve.ops.triton.quant_gemm import fp8_block_linear, fp8_kernels_usable
from deepserve.ops.registry import register
from deepserve.ops.triton.activation import silu_and_mul
from deepserve.ops.triton._common import and_scalar, cdiv, dot_dtype, interpreting, next_pow2, nvidia_sm90, unit_last
from deepserve.ops.triton.fused_moe_small import fused_moe_small, moe_shapes
from deepserve.ops.triton.launch_config import launch_settings
from deepserve.ops.triton.moe_align import align_by_expert

try:                                  # Triton >= 3.4; older ones read weights by pointers
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

FP8_BLOCK = 128
FP8_MAX = 448.0


@triton.jit
def _quant_group(a, FP8_MAX_C: tl.constexpr):
    """Row-wise e4m3 quantisation of an activation tile [M, 128] -> (values, scales [M])."""
    amax = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10)
    scale = amax / FP8_MAX_C
    return (a / scale[:, None]).to(tl.float8e4nv), scale


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, n_cols, x_stride, q_stride, s_stride,
                       GROUPS: tl.constexpr, FP8_MAX_C: tl.constexpr):
    """One row of x [R, C] -> e4m3 values q [R, C] and one fp32 scale per 128 columns s [R, C/128]:
    what `_quant_group` computes inside the GEMMs, done once per row instead of once per
    column block."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, GROUPS)
    offs = g[:, None] * 128 + tl.arange(0, 128)[None, :]
    mask = offs < n_cols
    x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0).to(tl.float32)
    q, scale = _quant_group(x, FP8_MAX_C)
    tl.store(q_ptr + row * q_stride + offs, q, mask=mask)
    tl.store(s_ptr + row * s_stride + g, scale, mask=g * 128 < n_cols)


def _quant_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scales per 128-column group) of the rows of x [R, C]."""
    rows, cols = x.shape
    groups = cdiv(cols, FP8_BLOCK)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if rows:
        _quant_rows_kernel[(rows,)](x, q, s, cols, x.stride(0), q.stride(0), s.stride(0),
                                    GROUPS=next_pow2(groups), FP8_MAX_C=FP8_MAX, num_warps=4)
    return q, s


@triton.jit
def _block_of(num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of this program in a 1-D grid of num_m x num_n tiles.

    Programs run roughly in launch order, so the order decides what the L2 can share: GROUP_M
    row blocks at a time walk the column blocks together, row blocks fastest. With GROUP_M=1
    the column blocks of one row block run side by side (its gathered activations are read
    from memory once, not once per column block) and, since an expert's row blocks are
    consecutive, each expert's weight tile is streamed once for all its rows."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _weight_tile(ptrs, mask, desc, expert, n0, k0, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 W_TMA: tl.constexpr):
    """An expert's weight tile [BLOCK_K, BLOCK_N] (rows n0.., columns k0.. of w[expert], read
    transposed): through the tensor-memory accelerator from a [1, BLOCK_N, BLOCK_K] block
    descriptor when W_TMA (out-of-range rows and columns read as zero), else by pointers."""
    if W_TMA:
        return tl.trans(desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize=["n_assign", "num_m"])
def _gate_up_kernel(x_ptr, xs_ptr, w_ptr, w_desc, ws_ptr, sorted_ptr, block_expert_ptr, out_ptr,
                    x_stride, xs_stride, w_se, w_sn, w_sk, ws_se, ws_sn, ws_sk, out_stride,
                    n_assign, inter, hidden, n_experts, num_m,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, FP8: tl.constexpr, A_FP8: tl.constexpr, W_TMA: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, ROW_SCALES: tl.constexpr = False, A16: tl.constexpr = False):
    pid_m, pid_n = _block_of(num_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < n_experts:
        rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < n_assign
        tok = tl.where(row_ok, rows // TOP_K, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = x_ptr + tok[:, None] * x_stride + offs_k[None, :]
        w_base = w_ptr + expert * w_se + offs_k[:, None] * w_sk
        g_ptrs = w_base + offs_n[None, :] * w_sn                   # gate rows n
        u_ptrs = w_base + (offs_n + inter)[None, :] * w_sn         # up rows I + n
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = offs_k < hidden - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = k_ok[:, None] & n_ok[None, :]
            # (past column I the TMA gate tile reads up rows: those columns are never stored)
            wg = _weight_tile(g_ptrs, w_ok, w_desc, expert.to(tl.int32), pid_n * BLOCK_N, k0, BLOCK_N, BLOCK_K,
                              W_TMA)
            wu = _weight_tile(u_ptrs, w_ok, w_desc, expert.to(tl.int32), inter + pid_n * BLOCK_N, k0, BLOCK_N,
                              BLOCK_K, W_TMA)
            if FP8:
                kb = k0 // BLOCK_K
                s_base = ws_ptr + expert * ws_se + kb * ws_sk
                if ROW_SCALES:    # one scale a weight row (ws_sk 0: the same at every k)
                    sg = tl.load(s_base + offs_n * ws_sn, mask=n_ok, other=0.0)
                    su = tl.load(s_base + (offs_n + inter) * ws_sn, mask=n_ok, other=0.0)
                else:
                    sg = tl.load(s_base + (offs_n // BLOCK_K) * ws_sn, mask=n_ok, other=0.0)
                    su = tl.load(s_base + ((offs_n + inter) // BLOCK_K) * ws_sn, mask=n_ok, other=0.0)
                if A16:       # weight only: the rows as they are, the e4m3 tiles widened exactly
                    a16 = a.to(DOT_DTYPE)
                    acc_g += tl.dot(a16, wg.to(DOT_DTYPE)) * sg[None, :]
                    acc_u += tl.dot(a16, wu.to(DOT_DTYPE)) * su[None, :]
                else:
                    if A_FP8:     # rows quantised beforehand (_quant_rows_kernel): values and group scales
                        a_q = a
                        a_s = tl.load(xs_ptr + tok * xs_stride + kb, mask=row_ok, other=1.0)
                    else:
                        a_q, a_s = _quant_group(a.to(tl.float32), 448.0)
                    acc_g += tl.dot(a_q, wg) * a_s[:, None] * sg[None, :]
                    acc_u += tl.dot(a_q, wu) * a_s[:, None] * su[None, :]
            else:
                acc_g = tl.dot(a.to(DOT_DTYPE), wg.to(DOT_DTYPE), acc_g)
                acc_u = tl.dot(a.to(DOT_DTYPE), wu.to(DOT_DTYPE), acc_u)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * w_sk
            u_ptrs += BLOCK_K * w_sk
        # round gate/up to the activation dtype like the reference's bf16 linear output
        gate = acc_g.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = acc_u.to(out_ptr.dtype.element_ty).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32) * up
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * out_stride + offs_n[None, :]
        tl.store(o_ptrs, act.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize=["n_assign", "num_m"])
def _down_kernel(h_ptr, hs_ptr, w_ptr, w_desc, ws_ptr, sorted_ptr, block_expert_ptr, out_ptr,
                 h_stride, hs_stride, w_se, w_sn, w_sk, ws_se, ws_sn, ws_sk, out_stride,
                 n_assign, hidden, inter, n_experts, num_m,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, FP8: tl.constexpr, A_FP8: tl.constexpr, W_TMA: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, ROW_SCALES: tl.constexpr = False, A16: tl.constexpr = False):
    pid_m, pid_n = _block_of(num_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < n_experts:
        rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        row_ok = rows < n_assign
        safe_rows = tl.where(row_ok, rows, 0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + safe_rows[:, None] * h_stride + offs_k[None, :]
        w_ptrs = w_ptr + expert * w_se + offs_k[:, None] * w_sk + offs_n[None, :] * w_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k_ok = offs_k < inter - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _weight_tile(w_ptrs, k_ok[:, None] & n_ok[None, :], w_desc, expert.to(tl.int32), pid_n * BLOCK_N, k0,
                             BLOCK_N, BLOCK_K, W_TMA)
            if FP8:
                s_rows = offs_n if ROW_SCALES else offs_n // BLOCK_K     # a scale a row, or a block's
                s = tl.load(ws_ptr + expert * ws_se + (k0 // BLOCK_K) * ws_sk + s_rows * ws_sn, mask=n_ok, other=0.0)
                if A16:       # weight only (as the gate/up kernel)
                    acc += tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE)) * s[None, :]
                else:
                    if A_FP8:
                        a_q = a
                        a_s = tl.load(hs_ptr + safe_rows * hs_stride + k0 // BLOCK_K, mask=row_ok, other=1.0)
                    else:
                        a_q, a_s = _quant_group(a.to(tl.float32), 448.0)
                    acc += tl.dot(a_q, w) * a_s[:, None] * s[None, :]
            else:
                acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * w_sk
        # the reference's bf16 linear output; the slot sum applies the routing weight in fp32
        tl.store(out_ptr + safe_rows[:, None] * out_stride + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_slots_kernel(y_ptr, ids_ptr, topk_w_ptr, add_ptr, out_ptr, hidden, n_experts,
                      TOP_K: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr):
    """out[t] = sum over the token's k slots j routed to a local expert of w[t, j] * y[t*k + j],
    in fp32 (the reference's index_add of weighted rows); with ADD, plus add[t] (the shared
    experts' rows) after the sum's rounding to out's dtype, as torch's `out + add` rounds."""
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + tok * TOP_K + j)
        local = (e >= 0) & (e < n_experts)
        w = tl.load(topk_w_ptr + tok * TOP_K + j)
        acc += w * tl.load(y_ptr + (tok * TOP_K + j) * hidden + offs, mask=and_scalar(mask, local), other=0.0).to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    if ADD:
        add = tl.load(add_ptr + tok * hidden + offs, mask=mask, other=0.0)
        out = (out.to(tl.float32) + add.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tok * hidden + offs, out, mask=mask)


def _tma_weights(w: torch.Tensor) -> bool:
    """Whether expert weights w [E, N, K] can be read through TMA block descriptors: a Triton
    that has them, an NVIDIA GPU of compute capability 9.0 or newer, compiled kernels, and
    the 16-byte alignment of the base and of the two outer strides that the descriptors
    need. TMA tiles run both the compute-bound and the bandwidth-bound batches faster than
    pointer loads (docs/PERFORMANCE.md)."""
    if TensorDescriptor is None or interpreting() or not nvidia_sm90(w.device):
        return False
    return (w.stride(2) == 1 and w.data_ptr() % 16 == 0
            and all(st * w.element_size() % 16 == 0 for st in w.stride()[:2]))


def _weight_arg(w: torch.Tensor, tma: bool, block_n: int, block_k: int):
    """The kernels' w_desc argument: a [1, block_n, block_k] block descriptor of w, or w itself
    (unused) on the pointer path."""
    return TensorDescriptor.from_tensor(w, [1, block_n, block_k]) if tma else w


def use_small_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `fused_moe_small` (two GEMV launches, no sort) runs this batch.

    It reads an expert's weights once per (token, slot) routed to it, so two tokens sharing
    an expert read it twice, where the sorted grouped GEMM reads it once for both. That is
    rare while the assignments are few against the experts (T*k <= E/2), and the ~20 small
    launches the sort costs dominate there; the floor of 8 keeps tiny expert counts (tests,
    EP shards) on the launch-light path for a single token."""
    return num_tokens * top_k <= max(8, num_experts // 2)


def sorted_tiles(n_assign: int, num_experts: int, inter: int, fp8: bool, elem_bytes: int,
                 device: torch.device) -> tuple[dict, dict]:
    """Each kernel's launch settings from the table (configs/fused_moe/), by rows per expert
    (`per_expert`; a table may also name the experts' intermediate size `inter`; `elem_bytes`:
    the MMA operands', 1 for W8A8 fp8, the activations' for weight-only fp8):
    BLOCK_M (taken from gate_up's), PREQUANT (fp8: quantise activation rows once beforehand),
    BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; W_TMA, where a table sets it, forces the
    weights' TMA tiles on or off.

    Few rows per expert take small row blocks (an expert's last block is padding); where the
    GEMMs are compute-bound, large blocks walking the columns together. fp32 activations and
    weights take twice the shared memory per stage: half the K tile and at most 2 stages keep
    the tiles under Hopper's 227 KB; weight-only fp8 (fp8 with 16/32-bit operands) reads 128-wide
    K tiles and widens the weight tiles in shared memory: narrow column tiles, 2 stages (chosen to
    fit, not swept). How each other setting was measured: docs/PERFORMANCE.md
    (benchmarks/sweep_fused_moe.py)."""
    shape = dict(fp8=fp8, per_expert=n_assign / max(num_experts, 1), elem_bytes=elem_bytes, inter=inter)
    return (launch_settings("fused_moe", device, kernel="gate_up", **shape),
            launch_settings("fused_moe", device, kernel="down", **shape))


@register("fused_moe", "triton")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: Optional[torch.Tensor] = None,
              w2_scale: Optional[torch.Tensor] = None, shared_w13: Optional[torch.Tensor] = None,
              shared_w2: Optional[torch.Tensor] = None, shared_w13_scale: Optional[torch.Tensor] = None,
              shared_w2_scale: Optional[torch.Tensor] = None, a13_scale: Optional[torch.Tensor] = None,
              a2_scale: Optional[torch.Tensor] = None, per_channel_weights: bool = False,
              weight_only: bool = False) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] (rows: gate then up), w2 [E, D, I] -> [T, D]; plus the shared
    experts shared_w13 [2*Is, D] / shared_w2 [D, Is] when given: fused into the small path's
    two launches; beside the sorted path an MLP of their own (it streams its weights once
    there; fp8 shared weights: the block-fp8 linear the dense layer runs) whose rows the slot
    sum adds. fp8 experts with static activation scales (`a13_scale` / `a2_scale`) take the
    sorted path at any batch, its rows quantised beforehand with the one scale (the small
    path's kernels quantise per group, or not at all). fp8 weights with one scale a row
    (`per_channel_weights`, scales [E, N, 1]) take the sorted path too, its kernels reading a
    scale per weight row instead of per 128-row block. fp8 `weight_only` (W8A16): the small
    path's CUDA-core kernels, or the sorted kernels with the activations unquantised (A16)."""
    num_tokens, hidden, num_experts, inter, fp8 = moe_shapes(x, w13, w2, w13_scale, w2_scale)
    check_shared_experts(x, fp8, shared_w13, shared_w2, shared_w13_scale, shared_w2_scale)
    check_static_scales(fp8, a13_scale, a2_scale, shared_w13)
    check_weight_only(fp8, weight_only, a13_scale, shared_w13)
    check_row_scales(x, w13, w2, w13_scale, w2_scale, per_channel_weights, shared_w13)
    shared = dict(shared_w13=shared_w13, shared_w2=shared_w2, shared_w13_scale=shared_w13_scale,
                  shared_w2_scale=shared_w2_scale)
    static = a13_scale is not None
    if fp8 and not fp8_kernels_usable(x.device):   # no e4m3 tensor cores: dequantize per call
        return fused_moe_torch(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale,
                               a13_scale=a13_scale, a2_scale=a2_scale, per_channel_weights=per_channel_weights,
                               weight_only=weight_only, **shared)
    top_k = topk_ids.shape[1]
    if num_tokens and use_small_path(num_tokens, top_k, num_experts) and not static and not per_channel_weights:
        return fused_moe_small(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale,
                               weight_only=weight_only, **shared)
    add = None
    if shared_w13 is not None and fp8:
        act = silu_and_mul(fp8_block_linear(x, shared_w13, shared_w13_scale))
        add = fp8_block_linear(act, shared_w2, shared_w2_scale)
    elif shared_w13 is not None:   # LlamaMLP's ops: cuBLAS GEMMs around the Triton SiLU-and-mul
        add = F.linear(silu_and_mul(F.linear(x, shared_w13)), shared_w2)
    return _fused_moe_sorted(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, add,
                             (a13_scale, a2_scale) if static else None, per_channel_weights, weight_only)


def _static_rows(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scales per 128-column group) of the rows of x [R, C] quantised with
    one static scale: `_quant_rows`' layout, every group holding that scale."""
    groups = cdiv(x.shape[1], FP8_BLOCK)
    return quant_fp8_static(x, scale), scale.float().reshape(1, 1).expand(x.shape[0], groups).contiguous()


def _fused_moe_sorted(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, w13_scale: Optional[torch.Tensor], w2_scale: Optional[torch.Tensor],
                      add: Optional[torch.Tensor],
                      static: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                      row_scales: bool = False, weight_only: bool = False) -> torch.Tensor:
    """`fused_moe` over tokens sorted by expert (grouped GEMMs), plus `add` [T, D] (the shared
    experts' output) in the slot sum when given; fp8 with `static` (a13_scale, a2_scale): the
    rows quantised beforehand with those scales; `row_scales`: weight scales [E, N, 1];
    `weight_only`: the rows unquantised (A16)."""
    num_tokens, hidden, num_experts, inter, fp8 = moe_shapes(x, w13, w2, w13_scale, w2_scale)
    top_k = topk_ids.shape[1]
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    n_assign = num_tokens * top_k
    # the MMA operands' bytes: weight-only fp8 widens the e4m3 tiles to the activations' dtype
    gu, dn = sorted_tiles(n_assign, num_experts, inter, fp8, x.element_size() if weight_only else w13.element_size(),
                          x.device)
    block_m, prequant, tma = gu.pop("BLOCK_M"), gu.pop("PREQUANT"), gu.pop("W_TMA", None)
    for key in ("BLOCK_M", "PREQUANT", "W_TMA"):
        dn.pop(key, None)
    aligned = align_by_expert(topk_ids, num_experts, block_m)
    x = unit_last(x)
    act = torch.empty(n_assign, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(n_assign, hidden, dtype=x.dtype, device=x.device)
    # a row's one scale read at every k step: stride 0 along K
    s13 = (*w13_scale.stride()[:2], 0 if row_scales else w13_scale.stride(2)) if fp8 else (0, 0, 0)
    s2 = (*w2_scale.stride()[:2], 0 if row_scales else w2_scale.stride(2)) if fp8 else (0, 0, 0)
    num_m = aligned.num_blocks
    common = dict(BLOCK_M=block_m, FP8=fp8, DOT_DTYPE=dot_dtype(x.dtype), ROW_SCALES=row_scales, A16=weight_only)
    gu, dn = {**common, **gu}, {**common, **dn}
    # fp8: activation rows quantised once by a separate pass where the row blocks are large
    # enough for the GEMMs to be compute-bound, else inside the GEMMs (one launch less)
    prequant = fp8 and not weight_only and (prequant or static is not None)
    if tma is None:
        tma = _tma_weights(w13) and _tma_weights(w2)
    quant = _quant_rows if static is None else functools.partial(_static_rows, scale=static[0])
    a, a_s = quant(x) if prequant else (x, x)
    w13_desc = _weight_arg(w13, tma, gu["BLOCK_N"], gu["BLOCK_K"])
    _gate_up_kernel[(num_m * cdiv(inter, gu["BLOCK_N"]),)](
        a, a_s, w13, w13_desc, w13_scale if fp8 else w13, aligned.sorted_ids, aligned.block_expert, act,
        a.stride(0), a_s.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), *s13, act.stride(0),
        n_assign, inter, hidden, num_experts, num_m, TOP_K=top_k, A_FP8=prequant, W_TMA=tma, **gu)
    quant = _quant_rows if static is None else functools.partial(_static_rows, scale=static[1])
    h, h_s = quant(act) if prequant else (act, act)
    w2_desc = _weight_arg(w2, tma, dn["BLOCK_N"], dn["BLOCK_K"])
    _down_kernel[(num_m * cdiv(hidden, dn["BLOCK_N"]),)](
        h, h_s, w2, w2_desc, w2_scale if fp8 else w2, aligned.sorted_ids, aligned.block_expert, y,
        h.stride(0), h_s.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), *s2, y.stride(0),
        n_assign, hidden, inter, num_experts, num_m, A_FP8=prequant, W_TMA=tma, **dn)
    block = min(next_pow2(hidden), 1024)
    _sum_slots_kernel[(num_tokens, cdiv(hidden, block))](
        y, topk_ids.contiguous(), topk_weights.reshape(-1).float().contiguous(),
        out if add is None else add.contiguous(), out, hidden, num_experts,
        TOP_K=top_k, BLOCK=block, ADD=add is not None, num_warps=4)
    return out
