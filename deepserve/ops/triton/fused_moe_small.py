"""Fused MoE experts for a few tokens: two GEMV kernels, no sorting by expert.

At decode a batch routes T*k (token, slot) pairs that mostly land on distinct experts, so
the sorted grouped GEMM of fused_moe.py pays ~20 small launches to align assignments into
BLOCK_M-row blocks that then hold one valid row each. Here every (token, slot) pair reads
its expert's weights itself:

- `_small_gate_up_kernel`, grid (T*k, cdiv(I, BLOCK_N)): program (p, n) reads expert
  e = topk_ids.flat[p]'s gate and up rows n (contiguous along D) and writes
  act[p, n] = silu(gate) * up. No tensor cores: a [BLOCK_N, BLOCK_K] tile times one
  activation row, fp32 accumulation, reduced once at the end.
- `_small_down_kernel`, grid (T, cdiv(D, BLOCK_N)): program (t, n) multiplies act by the
  down rows n of every slot's expert, a [slots, BLOCK_N, BLOCK_K] tile per step where the
  launch table says so (`down_slots` ALL_SLOTS; not for a shared expert whose size is not a
  multiple of I, nor fp8 weights whose I is not a multiple of the scale block), else one slot
  after another, and sums the weighted results in fp32; the sum over slots lives in registers,
  so no [T*k, D] buffer and no third kernel. Slots pad to a power of two (R1: 8 routed + 1
  shared -> 16).

Two launches for the whole MoE, all grids fixed by host sizes (CUDA-graph safe). Slots
whose expert id lies outside [0, E) (another expert-parallel rank's experts, -1 padding)
read nothing and add zero. A weight row is read once per (token, slot) that picks its
expert, so two tokens sharing an expert read it twice: the path is for batches where that
is rare (see `fused_moe.use_small_path`).

Shared experts (DeepSeek's `n_shared_experts`, one dense SwiGLU MLP every token uses with
weight 1.0, intermediate size Is rather than I) ride in the same two launches when
`shared_w13` [2*Is, D] / `shared_w2` [D, Is] are given (in the activation dtype beside 16-bit
experts; beside fp8 experts e4m3 with Fp8BlockLinear's scales, one per row and 128 columns):
- the gate_up grid grows to (T*k + T, cdiv(max(I, Is), BLOCK_N)); its last T programs compute
  token t's shared act, and column blocks past a program's own I (or Is) return at once;
- act is one row per token, [T, k*I + Is]: the k routed acts back to back, then the shared
  act (without shared experts, Is = 0 and this is the old [T*k, I] layout, same addresses);
- each down program adds the shared down rows times the shared act into the same fp32
  register sum (as Is / I more slots when I divides Is, else after its k slots).
This saves the dense MLP's three launches (gate_up GEMV, silu_and_mul, down GEMV) and the add.

Rounding follows the torch reference (deepserve/ops/moe.py): gate, up, silu(gate) and each
expert's down output are rounded to the activation dtype (the shared expert's too); the
reference then rounds the routed sum and adds the shared output with a second rounding,
where this path rounds routed + shared once, from fp32: the results differ by about one ulp
of the activation dtype (the fused one is the more exact). fp8 weights (e4m3, one fp32
scale_inv per 128x128 block) are multiplied by the unquantised activation and each row's
128-wide partial sum by its block scale (W8A16, not the W8A8 of the sorted path and of the torch
op), so fp8 results match the torch op over the dequantised weights (their oracle) to about bf16
rounding, and the torch op over the fp8 weights within the activations' e4m3 rounding (~4%).
Where the launch table says MMA 1, fp8 weights run on the tensor cores instead, W8A8
(fused_moe_small_mma.py), as the torch op.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.moe import check_shared_experts, check_weight_only
from deepserve.ops.triton._common import and_scalar, cdiv, next_pow2, pdl_begin, pdl_launch, unit_last
from deepserve.ops.triton.fused_moe_small_mma import (_routed_slot, _silu_mul_store, act_quantized_by_gate_up,
                                                     down_mma, gate_up_mma)
from deepserve.ops.triton.launch_config import launch_settings

FP8_BLOCK = 128


@triton.jit
def _gemv_step(acc, acc_rows, w_rows, a_ptr, k0, k_len, s_ptr, rows, row_ok, s_sn, s_sk,
               OUT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr, ROW_SCALES: tl.constexpr):
    """Add W[rows, k0:k0+BLOCK_K] times a[k0:k0+BLOCK_K]; w_rows [BLOCK_N, 1] points at the rows.
    fp8 scales are one per SCALE_BLOCK x SCALE_BLOCK block, or with ROW_SCALES one per row and
    SCALE_BLOCK columns (Fp8BlockLinear's layout, the shared expert's).

    16-bit weights accumulate elementwise into acc [BLOCK_N, BLOCK_K], reduced once at the
    end. fp8 weights go in SCALE_BLOCK-wide slices, one scale block per row each: a slice's
    row sums are scaled once into acc_rows [BLOCK_N], one multiply per row instead of
    dequantising every element, which keeps the fp8 kernels memory-bound. (The reference
    rounds each dequantised weight to the activation dtype; skipping that rounding moves
    the result by about as much as the rounding itself, ~0.5% relative.)"""
    SUB_K: tl.constexpr = SCALE_BLOCK if FP8 else BLOCK_K
    for sub in tl.static_range(BLOCK_K // SUB_K):
        offs_k = k0 + sub * SUB_K + tl.arange(0, SUB_K)
        if EVEN_K:
            a = tl.load(a_ptr + offs_k)
            w = tl.load(w_rows + offs_k[None, :], mask=row_ok[:, None], other=0.0)
        else:
            k_ok = offs_k < k_len
            a = tl.load(a_ptr + offs_k, mask=k_ok, other=0.0)
            w = tl.load(w_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a = a.to(tl.float32)[None, :]
        if FP8:
            # a slice wholly past K (a step of several scale blocks at a ragged end) has no
            # scale column: its weights load as zeros, and its scale must not be read either
            s_ok = row_ok if EVEN_K else and_scalar(row_ok, k0 + sub * SUB_K < k_len)
            s_row = rows if ROW_SCALES else rows // SCALE_BLOCK
            s = tl.load(s_ptr + s_row * s_sn + (k0 // SCALE_BLOCK + sub) * s_sk, mask=s_ok, other=0.0)
            acc_rows += tl.sum(w.to(tl.float32) * a, axis=1) * s
        else:
            acc += w.to(OUT_DTYPE).to(tl.float32) * a
    return acc, acc_rows


@triton.jit
def _swiglu_block(x_row, g_rows, s_ptr, offs_n, n_ok, inter, hidden, w_sn, ws_sn, ws_sk, a_ptrs,
                  dt: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr, ROW_SCALES: tl.constexpr, LOOP_STAGES: tl.constexpr):
    """a_ptrs[:] = silu(gate) * up of rows offs_n: gate rows at g_rows, up rows `inter` further."""
    u_rows = g_rows + inter * w_sn                                       # up rows I + n
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)    # 16-bit weights, per element
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    rows_g = tl.zeros([BLOCK_N], tl.float32)             # fp8 weights, scaled row sums
    rows_u = tl.zeros([BLOCK_N], tl.float32)
    for k0 in tl.range(0, hidden, BLOCK_K, num_stages=LOOP_STAGES):
        acc_g, rows_g = _gemv_step(acc_g, rows_g, g_rows, x_row, k0, hidden, s_ptr, offs_n, n_ok,
                                   ws_sn, ws_sk, dt, BLOCK_K, EVEN_K, FP8, SCALE_BLOCK, ROW_SCALES)
        acc_u, rows_u = _gemv_step(acc_u, rows_u, u_rows, x_row, k0, hidden, s_ptr, offs_n + inter, n_ok,
                                   ws_sn, ws_sk, dt, BLOCK_K, EVEN_K, FP8, SCALE_BLOCK, ROW_SCALES)
    if not FP8:
        rows_g = tl.sum(acc_g, axis=1)
        rows_u = tl.sum(acc_u, axis=1)
    _silu_mul_store(rows_g, rows_u, a_ptrs, n_ok, dt)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize=["n_assign"])
def _small_gate_up_kernel(x_ptr, ids_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, act_ptr,
                          x_stride, ids_s0, ids_s1, w_se, w_sn, ws_se, ws_sn, ws_sk, sw_sn, sws_sn, sws_sk,
                          act_stride,
                          inter, s_inter, hidden, n_experts, n_assign,
                          TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          EVEN_K: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                          HAS_SHARED: tl.constexpr, LOOP_STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    dt = act_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if pid < n_assign:
        tok, slot, expert, local = _routed_slot(ids_ptr, ids_s0, ids_s1, n_experts, TOP_K)
        # with shared experts the grid spans max(I, Is) columns: blocks past I do nothing
        if local & (n0 < inter):
            n_ok = offs_n < inter
            x_row = x_ptr + tok * x_stride
            g_rows = w_ptr + expert * w_se + offs_n.to(tl.int64)[:, None] * w_sn     # gate rows n
            a_ptrs = act_ptr + tok * act_stride + slot * inter + offs_n
            _swiglu_block(x_row, g_rows, ws_ptr + expert * ws_se, offs_n, n_ok, inter, hidden, w_sn,
                          ws_sn, ws_sk, a_ptrs, dt, BLOCK_N, BLOCK_K, EVEN_K, FP8, SCALE_BLOCK, False, LOOP_STAGES)
    else:
        if HAS_SHARED:
            # the last T programs: token pid - T*k's shared expert, act columns [k*I, k*I + Is)
            s_tok = (pid - n_assign).to(tl.int64)     # (not `tok`: a name's type must agree across branches)
            if n0 < s_inter:
                n_ok = offs_n < s_inter
                g_rows = sw_ptr + offs_n.to(tl.int64)[:, None] * sw_sn
                a_ptrs = act_ptr + s_tok * act_stride + TOP_K * inter + offs_n
                _swiglu_block(x_ptr + s_tok * x_stride, g_rows, sws_ptr, offs_n, n_ok, s_inter, hidden, sw_sn,
                              sws_sn, sws_sk, a_ptrs, dt, BLOCK_N, BLOCK_K, EVEN_K, FP8, SCALE_BLOCK, True,
                              LOOP_STAGES)


@triton.jit
def _down_all_slots(act_row, ids_row, tw_row, w_ptr, ws_ptr, sw_ptr, sws_ptr, offs_n, n_ok, ids_s1, tw_s1,
                    w_se, w_sn, ws_se, ws_sn, ws_sk, sw_sn, sws_sn, sws_sk, inter, n_experts, dt: tl.constexpr,
                    TOP_K: tl.constexpr, N_SHARED: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                    LOOP_STAGES: tl.constexpr):
    """The token's down rows offs_n over all its slots at once: [SLOTS, BLOCK_N, BLOCK_K] tiles.

    Slot s < TOP_K is routed slot s; slots TOP_K ... TOP_K + N_SHARED - 1 are the shared
    expert's columns cut into N_SHARED pieces of `inter` (Is = N_SHARED * I), so every slot's
    act starts at act_row + s * inter. One step loads one K block of every slot: SLOTS times
    the bytes in flight of a loop over slots, which left the kernel latency-bound at batch 1.
    Rounding as the per-slot loop: each routed output rounded before its weight, the shared
    pieces summed in fp32 and rounded once.

    fp8 weights (I a multiple of SCALE_BLOCK): each SCALE_BLOCK-wide slice of a step is summed
    over K, then times its block's scale, [SLOTS, BLOCK_N] scales a slice: the routed experts'
    one per 128 x 128 block (ws_ptr, strides ws_se / ws_sn / ws_sk), the shared expert's one
    per row and 128 columns (sws_ptr, Fp8BlockLinear's layout), as `_gemv_step` scales them."""
    offs_s = tl.arange(0, SLOTS)
    routed = offs_s < TOP_K
    shared = (offs_s >= TOP_K) & (offs_s < TOP_K + N_SHARED)
    expert = tl.load(ids_row + offs_s * ids_s1, mask=routed, other=-1).to(tl.int64)
    use = (routed & (expert >= 0) & (expert < n_experts)) | shared
    expert = tl.where(routed & use, expert, 0)
    rows = offs_n.to(tl.int64)[None, :, None]
    w_rows = tl.where(routed[:, None, None], w_ptr + expert[:, None, None] * w_se + rows * w_sn,
                      sw_ptr + rows * sw_sn + (offs_s - TOP_K)[:, None, None] * inter)  # [S, N, 1]
    a_rows = act_row + offs_s[:, None] * inter                                          # [S, 1]
    SUB_K: tl.constexpr = SCALE_BLOCK if FP8 else BLOCK_K
    acc = tl.zeros([SLOTS, BLOCK_N, BLOCK_K], tl.float32)   # 16-bit weights, per element
    y = tl.zeros([SLOTS, BLOCK_N], tl.float32)              # fp8 weights, scaled slice sums
    if FP8:
        # a slot's scale row for each of its rows; the K block's column is added per slice
        n2 = offs_n.to(tl.int64)[None, :]
        s_rows = tl.where(routed[:, None], ws_ptr + expert[:, None] * ws_se + (n2 // SCALE_BLOCK) * ws_sn,
                          sws_ptr + n2 * sws_sn + ((offs_s - TOP_K) * (inter // SCALE_BLOCK))[:, None] * sws_sk)
        s_sk = tl.where(routed, ws_sk, sws_sk)[:, None]     # a K block's step in each slot's scales
        s_ok = use[:, None] & n_ok[None, :]
    for k0 in tl.range(0, inter, BLOCK_K, num_stages=LOOP_STAGES):
        for sub in tl.static_range(BLOCK_K // SUB_K):
            offs_k = k0 + sub * SUB_K + tl.arange(0, SUB_K)
            if EVEN_K:
                a = tl.load(a_rows + offs_k[None, :], mask=use[:, None], other=0.0)
                w = tl.load(w_rows + offs_k[None, None, :], mask=use[:, None, None] & n_ok[None, :, None],
                            other=0.0)
            else:
                k_ok = offs_k < inter
                a = tl.load(a_rows + offs_k[None, :], mask=use[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + offs_k[None, None, :],
                            mask=use[:, None, None] & n_ok[None, :, None] & k_ok[None, None, :], other=0.0)
            if FP8:
                kb = k0 // SCALE_BLOCK + sub
                if EVEN_K:
                    s = tl.load(s_rows + kb * s_sk, mask=s_ok, other=0.0)
                else:
                    s = tl.load(s_rows + kb * s_sk, mask=and_scalar(s_ok, kb * SCALE_BLOCK < inter), other=0.0)
                y += tl.sum(w.to(tl.float32) * a.to(tl.float32)[:, None, :], axis=2) * s
            else:
                acc += w.to(tl.float32) * a.to(tl.float32)[:, None, :]
    if not FP8:
        y = tl.sum(acc, axis=2)                                                         # [S, N]
    tw = tl.load(tw_row + offs_s * tw_s1, mask=routed & use, other=0.0).to(tl.float32)
    out = tl.sum(tl.where(routed[:, None], y.to(dt).to(tl.float32) * tw[:, None], 0.0), axis=0)
    if N_SHARED > 0:
        out += tl.sum(tl.where(shared[:, None], y, 0.0), axis=0).to(dt).to(tl.float32)
    return out


@triton.jit
def _small_down_kernel(act_ptr, ids_ptr, tw_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, out_ptr,
                       act_stride, ids_s0, ids_s1, tw_s0, tw_s1, w_se, w_sn, ws_se, ws_sn, ws_sk, sw_sn,
                       sws_sn, sws_sk, out_stride, hidden, inter, s_inter, n_experts,
                       TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EVEN_K: tl.constexpr, FP8: tl.constexpr, SCALE_BLOCK: tl.constexpr,
                       HAS_SHARED: tl.constexpr, EVEN_KS: tl.constexpr, SLOTS: tl.constexpr,
                       N_SHARED: tl.constexpr, LOOP_STAGES: tl.constexpr, USE_PDL: tl.constexpr):
    """SLOTS > 0: every slot in one [SLOTS, BLOCK_N, BLOCK_K] step (`_down_all_slots`; shared
    experts only as N_SHARED whole pieces of I); else one slot after another."""
    pdl_begin(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    dt = act_ptr.dtype.element_ty
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    act_row = act_ptr + tok * act_stride
    if SLOTS > 0:
        out = _down_all_slots(act_row, ids_ptr + tok * ids_s0, tw_ptr + tok * tw_s0, w_ptr, ws_ptr, sw_ptr, sws_ptr,
                              offs_n, n_ok, ids_s1, tw_s1, w_se, w_sn, ws_se, ws_sn, ws_sk, sw_sn, sws_sn, sws_sk,
                              inter, n_experts, dt, TOP_K, N_SHARED, SLOTS, BLOCK_N, BLOCK_K, EVEN_K, FP8,
                              SCALE_BLOCK, LOOP_STAGES)
    else:
        out = tl.zeros([BLOCK_N], tl.float32)
        for j in tl.static_range(TOP_K):
            expert = tl.load(ids_ptr + tok * ids_s0 + j * ids_s1).to(tl.int64)
            if (expert >= 0) & (expert < n_experts):
                a_row = act_row + j * inter
                w_rows = w_ptr + expert * w_se + offs_n.to(tl.int64)[:, None] * w_sn
                s_ptr = ws_ptr + expert * ws_se
                acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
                y = tl.zeros([BLOCK_N], tl.float32)
                for k0 in range(0, inter, BLOCK_K):
                    acc, y = _gemv_step(acc, y, w_rows, a_row, k0, inter, s_ptr, offs_n, n_ok, ws_sn, ws_sk,
                                        dt, BLOCK_K, EVEN_K, FP8, SCALE_BLOCK, False)
                if not FP8:
                    y = tl.sum(acc, axis=1)
                y = y.to(dt).to(tl.float32)       # the reference's down output dtype
                out += y * tl.load(tw_ptr + tok * tw_s0 + j * tw_s1).to(tl.float32)
        if HAS_SHARED:
            # the shared expert, weight 1.0, into the same fp32 sum (fp8 as the routed experts)
            w_rows = sw_ptr + offs_n.to(tl.int64)[:, None] * sw_sn
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            y = tl.zeros([BLOCK_N], tl.float32)
            for k0 in range(0, s_inter, BLOCK_K):
                acc, y = _gemv_step(acc, y, w_rows, act_row + TOP_K * inter, k0, s_inter, sws_ptr, offs_n, n_ok,
                                    sws_sn, sws_sk, dt, BLOCK_K, EVEN_KS, FP8, SCALE_BLOCK, True)
            if not FP8:
                y = tl.sum(acc, axis=1)
            out += y.to(dt).to(tl.float32)    # the shared MLP's down output dtype
    tl.store(out_ptr + tok * out_stride + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def small_config(kernel: str, fp8: bool, inter: int, device: torch.device) -> dict:
    """BLOCK_N, BLOCK_K, num_warps, num_stages and LOOP_STAGES of `kernel` ("gate_up", "down",
    or "down_slots": the down kernel with every slot in one step, for an intermediate size
    `inter`; its ALL_SLOTS says whether to take it) from the launch table
    (configs/fused_moe_small/).

    Each program streams BLOCK_N whole weight rows along K (16-byte loads per lane); fp8 steps
    cover whole 128-wide scale blocks, and a chip with faster memory needs more bytes in flight
    per program (the H200's fp8 rows). The launch's num_stages is 1: these loads feed no tl.dot,
    so it pipelines nothing; the gate_up K loop is software-pipelined by LOOP_STAGES instead.
    fp8 "gate_up" and "down" rules may set MMA 1: that kernel's tensor-core form, W8A8
    (fused_moe_small_mma.py: BLOCK_N >= 16 rows a program, one 128-group a step, num_stages
    its cp.async depth, QUANT_IN 1 quantising the activations inside, 0 in a launch before).
    How each setting was measured: docs/PERFORMANCE.md (benchmarks/sweep_moe_small.py)."""
    cfg = launch_settings("fused_moe_small", device, kernel=kernel, fp8=fp8, inter=inter)
    if fp8 and cfg["BLOCK_K"] % FP8_BLOCK:
        raise ValueError(f"fp8 weights need BLOCK_K a multiple of the {FP8_BLOCK}-wide scale block, "
                         f"got {cfg['BLOCK_K']}")
    return cfg


def moe_shapes(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: Optional[torch.Tensor],
               w2_scale: Optional[torch.Tensor]) -> tuple[int, int, int, int, bool]:
    """(T, D, E, I, fp8) of a fused-MoE call, after checking the weights fit x."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"expert weights w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit "
                         f"x {tuple(x.shape)}")
    fp8 = w13_scale is not None
    if fp8 != (w2_scale is not None):
        raise ValueError("fp8 fused_moe needs both w13_scale and w2_scale")
    return num_tokens, hidden, num_experts, inter, fp8


def fused_moe_small(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, *, w13_scale: Optional[torch.Tensor] = None,
                    w2_scale: Optional[torch.Tensor] = None, shared_w13: Optional[torch.Tensor] = None,
                    shared_w2: Optional[torch.Tensor] = None, shared_w13_scale: Optional[torch.Tensor] = None,
                    shared_w2_scale: Optional[torch.Tensor] = None, weight_only: bool = False) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] (rows: gate then up), w2 [E, D, I] -> [T, D], in two launches;
    plus the shared experts shared_w13 [2*Is, D] (gate then up) / shared_w2 [D, Is] when given
    (e4m3 with shared_w13_scale / shared_w2_scale beside fp8 experts). fp8 `weight_only`: W8A16
    whatever the table's MMA says (the tensor-core forms quantise the activations)."""
    num_tokens, hidden, num_experts, inter, fp8 = moe_shapes(x, w13, w2, w13_scale, w2_scale)
    check_shared_experts(x, fp8, shared_w13, shared_w2, shared_w13_scale, shared_w2_scale)
    check_weight_only(fp8, weight_only, None, shared_w13)
    has_shared = shared_w13 is not None
    top_k = topk_ids.shape[1]
    if topk_ids.shape[0] != num_tokens or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                         f"do not fit {num_tokens} tokens")
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    # the kernels step along D and I with unit stride
    x, w13, w2 = unit_last(x), unit_last(w13), unit_last(w2)
    s_inter = 0
    if has_shared:
        shared_w13, shared_w2 = unit_last(shared_w13), unit_last(shared_w2)
        s_inter = shared_w2.shape[1]
    # the down kernel takes every slot in one step where its table says so (ALL_SLOTS), unless a
    # shared expert that is not whole pieces of I, or fp8 scale blocks that straddle I, ask for
    # the slot-by-slot loop; MMA 1 in a kernel's rule (fp8 only) runs its tensor-core form
    # (fused_moe_small_mma.py), for the down kernel whatever ALL_SLOTS says
    n_shared = s_inter // inter if has_shared else 0
    slots_cfg = small_config("down_slots", fp8, inter, x.device)
    all_slots = (slots_cfg.pop("ALL_SLOTS") and n_shared * inter == s_inter
                 and not (fp8 and inter % FP8_BLOCK))
    slots = next_pow2(top_k + n_shared) if all_slots else 0
    gu_cfg = small_config("gate_up", fp8, inter, x.device)
    down_rule = small_config("down", fp8, inter, x.device)
    mma_gu, mma_down = gu_cfg.pop("MMA", 0), down_rule.pop("MMA", 0)
    if weight_only:
        mma_gu = mma_down = 0
    if (mma_gu or mma_down) and not fp8:
        raise ValueError(f"fused_moe_small MMA runs fp8 weights only, got {w13.dtype}")
    down_cfg = slots_cfg if slots else down_rule
    # one act row per token: its k routed acts back to back, then the shared act [k*I + Is]
    act = torch.empty(num_tokens, top_k * inter + s_inter, dtype=x.dtype, device=x.device)
    s13 = w13_scale.stride() if fp8 else (0, 0, 0)
    s2 = w2_scale.stride() if fp8 else (0, 0, 0)
    shared_fp8 = has_shared and fp8
    ss13 = shared_w13_scale if shared_fp8 else x        # (an unread pointer otherwise)
    ss2 = shared_w2_scale if shared_fp8 else (w2_scale if fp8 else x)   # one element type for both scale pointers
    common = dict(TOP_K=top_k, FP8=fp8, SCALE_BLOCK=FP8_BLOCK, HAS_SHARED=has_shared)
    n_assign = num_tokens * top_k
    gu_grid = (n_assign + (num_tokens if has_shared else 0), cdiv(max(inter, s_inter), gu_cfg["BLOCK_N"]))
    # both on the tensor cores, the down one taking act quantised: gate_up quantises it on the
    # way out where its programs hold whole 128-groups (no act_quant_fp8 launch between)
    act_q = None
    if mma_gu and mma_down and not down_rule.get("QUANT_IN", 1) and act_quantized_by_gate_up(gu_cfg, inter, s_inter):
        act_q = (torch.empty(act.shape, dtype=w13.dtype, device=x.device),
                 torch.empty(num_tokens, act.shape[1] // FP8_BLOCK, dtype=torch.float32, device=x.device))
    if mma_gu:
        gate_up_mma(x, topk_ids, w13, w13_scale, act, gu_cfg, inter, (shared_w13, ss13) if has_shared else None,
                    act_q)
    else:
        gu_cfg.pop("QUANT_IN", None)
        _small_gate_up_kernel[gu_grid](
            x, topk_ids, w13, w13_scale if fp8 else w13, shared_w13 if has_shared else w13, ss13, act,
            x.stride(0), topk_ids.stride(0), topk_ids.stride(1), w13.stride(0), w13.stride(1), *s13,
            shared_w13.stride(0) if has_shared else 0, *(ss13.stride() if shared_fp8 else (0, 0)), act.stride(0),
            inter, s_inter, hidden, num_experts, n_assign, EVEN_K=hidden % gu_cfg["BLOCK_K"] == 0, **gu_cfg,
            **common, **pdl_launch(x.device))
    if mma_down:
        down_mma(act, topk_ids, topk_weights, w2, w2_scale, out, down_rule, inter,
                 (shared_w2, ss2) if has_shared else None, act_q)
        return out
    for key in ("QUANT_IN", "GROUPS"):       # the tensor-core kernel's settings
        down_cfg.pop(key, None)
    _small_down_kernel[(num_tokens, cdiv(hidden, down_cfg["BLOCK_N"]))](
        act, topk_ids, topk_weights, w2, w2_scale if fp8 else w2, shared_w2 if has_shared else w2, ss2, out,
        act.stride(0), topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        w2.stride(0), w2.stride(1), *s2, shared_w2.stride(0) if has_shared else 0,
        *(ss2.stride() if shared_fp8 else (0, 0)), out.stride(0),
        hidden, inter, s_inter, num_experts, EVEN_K=inter % down_cfg["BLOCK_K"] == 0,
        EVEN_KS=s_inter % down_cfg["BLOCK_K"] == 0, SLOTS=slots, N_SHARED=n_shared, **down_cfg, **common,
        **pdl_launch(x.device))
    return out
