"""fused_moe_small's two fp8 kernels on the tensor cores (the launch setting MMA 1), W8A8.

The CUDA-core kernels of fused_moe_small.py multiply each e4m3 weight by the unquantised
activation: a conversion and an FMA per weight byte plus the reductions, about six
instructions a byte in the sm_90 SASS, more than an H200 SM can issue while it reads its share
of 4.8 TB/s. Here the operands are swapped, as in quant_gemm._fp8_gemv_mma_kernel: BLOCK_N
weight rows are the M side of an e4m3 x e4m3 product (fp8 wgmma on sm_90, the weight tiles
staged by cp.async over the launch's num_stages) and the activation, quantised to e4m3 per
128-wide group, is the N side, one column of a 16-wide (or wider) operand with zeros beside it.
Each step is one 128-group along K; its fp32 product is scaled by the weight block's scale
times the activation group's before it joins the fp32 accumulator (DeepSeek-V3's per-group
promotion).

- `_gate_up_mma_kernel`: the grid and act layout of _small_gate_up_kernel (routed (token,
  slot) programs, then the shared expert's); a program's BLOCK_N gate rows and the same up
  rows are two products with the token's row in column 0; silu(gate) * up as there.
- `_down_mma_kernel`: the grid of _small_down_kernel, (T, cdiv(D, BLOCK_N)). One loop runs over
  every slot's groups back to back (the routed slots', then the shared expert's), so cp.async
  keeps streaming across slot boundaries; slot j's act goes in column j of the N side (the
  shared expert's in column k), so each column of the accumulator collects one slot's rows and
  the slots are weighted and summed once, after the loop.

Numbers: this path is W8A8 where the CUDA-core one is W8A16. The token's row (gate_up) and
every slot's act row (down) are quantised per 128-group as quant_gemm._act_quant_kernel does
(scale = amax / 448 by IEEE division, e4m3 round to nearest even: the same scales and values),
and the products of e4m3 pairs are exact in fp32. e4m3 keeps 3 mantissa bits: each activation
element moves by up to 2^-4 of itself (~2.5% RMS), and a sum of such products by about as much
relative to its size; with the row quantised for gate_up and the act again for down, outputs
differ from the W8A16 ones by ~4% relative on random data (tests/ops/test_moe_small_mma.py),
as those of the sorted fused-MoE path (also W8A8) do. DeepSeek-V3 was trained with this
recipe. The rounding order of gate, up, silu and the down outputs follows fused_moe_small.

QUANT_IN 1 quantises inside the kernels, once a step for the program's 2*BLOCK_N (gate_up) or
BLOCK_N (down) rows; QUANT_IN 0 quantises the row(s) before with quant_gemm.act_quant_fp8 (one
more small launch per kernel) and loads the e4m3 bytes straight into their column. Where both
kernels run here and gate_up's programs hold 128 rows (whole groups of act), gate_up also
writes act quantised on its way out and the down kernel needs no launch before it.
"""
# The K loops in sm_90 SASS at R1's sizes (benchmarks/sass_moe_small_mma.py, Triton 3.6; no
# spills; instructions x 32 lanes x warps over the step's weight bytes; an H200 SM can issue
# ~7.8 a byte at full bandwidth, the CUDA-core kernels take ~6):
#   gate_up, QUANT_IN 0: BLOCK_N 64 / 4 warps 0.98 (60 registers), 128 / 4: 0.68, 128 / 8: 1.00
#   gate_up, QUANT_IN 1: 64 / 4: 4.8, 128 / 4: 2.5
#   down, QUANT_IN 0: 64 / 4: 2.25, with GROUPS 2: 1.66, GROUPS 4: 1.40; 128 / 4: 1.49, GROUPS 2: 1.13
#   down, QUANT_IN 1: 64 / 4: 9.7, 128 / 4: 5.2
# Quantising inside costs ~600 instructions a 128-group a thread: the group's values reach the
# [GROUP, 16] operand's layout replicated, 16 divisions (div_rn) a thread where one would do.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.quant import FP8_GROUP, FP8_MAX
from deepserve.ops.triton._common import and_scalar, cdiv, next_pow2, pdl_begin, pdl_launch, quantize_e4m3, scalar_mask
from deepserve.ops.triton.quant_gemm import act_quant_fp8, row_group_operand


@triton.jit
def _silu_mul_store(rows_g, rows_u, a_ptrs, n_ok, dt: tl.constexpr):
    """a_ptrs[:] = silu(gate) * up, gate, up and silu rounded to dt as the reference's are."""
    gate = rows_g.to(dt).to(tl.float32)
    up = rows_u.to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up
    tl.store(a_ptrs, act.to(dt), mask=n_ok)
    return act.to(dt).to(tl.float32)


@triton.jit
def _swiglu_mma(x_row, xs_row, w_base, s_base, offs_n, inter, hidden, w_sn, ws_sn, ws_sk, a_ptrs, q_ptrs, qs_ptr,
                dt: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                ROW_SCALES: tl.constexpr, QUANT_IN: tl.constexpr, QUANT_OUT: tl.constexpr, QMAX: tl.constexpr):
    """Gate rows offs_n of w_base (up rows `inter` further) times the row, one 128-group a step.
    Weight scales: one per GROUP x GROUP block, or with ROW_SCALES one per row and GROUP columns.
    EVEN_N: every row of the block exists (I and Is multiples of BLOCK_N). QUANT_OUT (BLOCK_N
    = GROUP, the block one whole group of the act row): also the act block quantised as
    _act_quant_kernel would, e4m3 to q_ptrs and its scale to qs_ptr."""
    n_ok = offs_n < inter
    g_rows = w_base + offs_n.to(tl.int64)[:, None] * w_sn                   # [BN, 1]
    u_rows = g_rows + inter * w_sn
    if ROW_SCALES:
        sg_rows = s_base + offs_n * ws_sn
        su_rows = s_base + (offs_n + inter) * ws_sn
    else:
        sg_rows = s_base + (offs_n // GROUP) * ws_sn
        su_rows = s_base + ((offs_n + inter) // GROUP) * ws_sn
    cols = tl.arange(0, 16)
    kk = tl.arange(0, GROUP)
    acc_g = tl.zeros([BLOCK_N, 16], tl.float32)
    acc_u = tl.zeros([BLOCK_N, 16], tl.float32)
    for g in range(0, tl.cdiv(hidden, GROUP)):
        offs = g * GROUP + kk
        if EVEN_K:
            k_ok = kk < GROUP
            w_ok = n_ok[:, None] | EVEN_N
        else:
            k_ok = offs < hidden
            w_ok = (n_ok[:, None] | EVEN_N) & k_ok[None, :]
        q_cols, a_s = row_group_operand(x_row, xs_row, offs, k_ok, g, True, 0, cols, w_base.dtype.element_ty, QUANT_IN,
                                 QMAX)
        wg = tl.load(g_rows + offs[None, :], mask=w_ok, other=0.0)                 # [BN, GROUP] e4m3
        wu = tl.load(u_rows + offs[None, :], mask=w_ok, other=0.0)
        s_g = tl.load(sg_rows + g * ws_sk, mask=n_ok | EVEN_N, other=0.0)
        s_u = tl.load(su_rows + g * ws_sk, mask=n_ok | EVEN_N, other=0.0)
        acc_g += tl.dot(wg, q_cols) * (s_g * a_s)[:, None]
        acc_u += tl.dot(wu, q_cols) * (s_u * a_s)[:, None]
    rows_g = tl.sum(tl.where(cols[None, :] == 0, acc_g, 0.0), axis=1)
    rows_u = tl.sum(tl.where(cols[None, :] == 0, acc_u, 0.0), axis=1)
    act = _silu_mul_store(rows_g, rows_u, a_ptrs, n_ok, dt)
    if QUANT_OUT:
        q, a_s = quantize_e4m3(act, QMAX)
        tl.store(q_ptrs, q.to(q_ptrs.dtype.element_ty))
        tl.store(qs_ptr, a_s)


@triton.jit
def _routed_slot(ids_ptr, ids_s0, ids_s1, n_experts, TOP_K: tl.constexpr):
    """(token, slot, expert, whether the expert is one of this rank's) of gate_up program
    pid < T*k: (token, slot) pid, act columns [slot*I, (slot+1)*I) of the token's row."""
    pid = tl.program_id(0)
    tok = pid // TOP_K
    slot = pid % TOP_K
    expert = tl.load(ids_ptr + tok * ids_s0 + slot * ids_s1).to(tl.int64)
    return tok.to(tl.int64), slot, expert, (expert >= 0) & (expert < n_experts)


@triton.jit(do_not_specialize=["n_assign"])
def _gate_up_mma_kernel(x_ptr, xs_ptr, ids_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, act_ptr, qa_ptr, qs_ptr,
                        x_stride, xs_stride, ids_s0, ids_s1, w_se, w_sn, ws_se, ws_sn, ws_sk, sw_sn, sws_sn, sws_sk,
                        act_stride, qa_stride, qs_stride, inter, s_inter, hidden, n_experts, n_assign,
                        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, EVEN_K: tl.constexpr,
                        EVEN_N: tl.constexpr, HAS_SHARED: tl.constexpr, QUANT_IN: tl.constexpr, QUANT_OUT: tl.constexpr,
                        QMAX: tl.constexpr, USE_PDL: tl.constexpr):
    """QUANT_OUT: act also quantised per 128-group into qa_ptr (e4m3, the act's layout) and
    qs_ptr (one scale a group), for the down kernel; BLOCK_N = GROUP and I, Is multiples of it."""
    pdl_begin(USE_PDL)
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    blk = tl.arange(0, BLOCK_N)
    if tl.program_id(0) < n_assign:
        tok, slot, expert, local = _routed_slot(ids_ptr, ids_s0, ids_s1, n_experts, TOP_K)
        if local & (n0 < inter):
            col = slot * inter + n0                   # the block's first act column
            _swiglu_mma(x_ptr + tok * x_stride, xs_ptr + tok * xs_stride, w_ptr + expert * w_se,
                        ws_ptr + expert * ws_se, offs_n, inter, hidden, w_sn, ws_sn, ws_sk,
                        act_ptr + tok * act_stride + col + blk, qa_ptr + tok * qa_stride + col + blk,
                        qs_ptr + tok * qs_stride + col // GROUP, act_ptr.dtype.element_ty, BLOCK_N, GROUP, EVEN_K,
                        EVEN_N, False, QUANT_IN, QUANT_OUT, QMAX)
    else:
        if HAS_SHARED:
            s_tok = (tl.program_id(0) - n_assign).to(tl.int64)
            if n0 < s_inter:
                col = TOP_K * inter + n0
                _swiglu_mma(x_ptr + s_tok * x_stride, xs_ptr + s_tok * xs_stride, sw_ptr, sws_ptr, offs_n, s_inter,
                            hidden, sw_sn, sws_sn, sws_sk, act_ptr + s_tok * act_stride + col + blk,
                            qa_ptr + s_tok * qa_stride + col + blk, qs_ptr + s_tok * qs_stride + col // GROUP,
                            act_ptr.dtype.element_ty, BLOCK_N, GROUP, EVEN_K, EVEN_N, True, QUANT_IN, QUANT_OUT, QMAX)


@triton.jit
def _down_step(acc, x_row, xs_row, g, col, use, k_len, w_rows, s_ptrs, n_ok, cols, kk, GROUP: tl.constexpr,
               EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, QUANT_IN: tl.constexpr, QMAX: tl.constexpr):
    """acc + one 128-group of the rows w_rows [BN, 1] (scales at s_ptrs) times group g of the act
    row at x_row, in column `col`; nothing is read where not `use`. EVEN_N: every row exists."""
    offs = g * GROUP + kk
    if EVEN_K:
        k_ok = and_scalar(kk < GROUP, use)
        if EVEN_N:
            w_ok = scalar_mask(use, offs[None, :])
        else:
            w_ok = and_scalar(n_ok[:, None], use)
    else:
        k_ok = and_scalar(offs < k_len, use)
        if EVEN_N:
            w_ok = k_ok[None, :]
        else:
            w_ok = n_ok[:, None] & k_ok[None, :]
    q_cols, a_s = row_group_operand(x_row, xs_row, offs, k_ok, g, use, col, cols, w_rows.dtype.element_ty, QUANT_IN, QMAX)
    w = tl.load(w_rows + offs[None, :], mask=w_ok, other=0.0)                          # [BN, GROUP] e4m3
    if EVEN_N:
        w_s = tl.load(s_ptrs, mask=scalar_mask(use, s_ptrs), other=0.0)
    else:
        w_s = tl.load(s_ptrs, mask=and_scalar(n_ok, use), other=0.0)
    return acc + tl.dot(w, q_cols) * (w_s * a_s)[:, None]


@triton.jit
def _down_mma_kernel(act_ptr, as_ptr, ids_ptr, tw_ptr, w_ptr, ws_ptr, sw_ptr, sws_ptr, out_ptr,
                     act_stride, as_stride, ids_s0, ids_s1, tw_s0, tw_s1, w_se, w_sn, ws_se, ws_sn, ws_sk,
                     sw_sn, sws_sn, sws_sk, out_stride, hidden, inter, s_inter, n_experts,
                     TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, G_SLOT: tl.constexpr,
                     G_SHARED: tl.constexpr, GROUPS: tl.constexpr, COLS: tl.constexpr, EVEN_K: tl.constexpr,
                     EVEN_N: tl.constexpr, QUANT_IN: tl.constexpr, QMAX: tl.constexpr, USE_PDL: tl.constexpr):
    """Token t's down rows offs_n. The first loop runs over the routed slots' groups, GROUPS a
    step (G_SLOT = cdiv(I, GROUP) a slot, its last step masked where GROUPS does not divide it),
    the second over the shared expert's G_SHARED groups (column TOP_K). Slots whose expert
    lies outside [0, E) load nothing. EVEN_K: I and Is are multiples of GROUP; EVEN_N: D of
    BLOCK_N. Without QUANT_IN, slot j's scales start at column j * G_SLOT of as_ptr's row (I a
    multiple of GROUP)."""
    pdl_begin(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    dt = out_ptr.dtype.element_ty          # the activations' dtype (act_ptr is e4m3 without QUANT_IN)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    rows = offs_n.to(tl.int64)[:, None]
    act_row = act_ptr + tok * act_stride
    as_row = as_ptr + tok * as_stride
    ids_row = ids_ptr + tok * ids_s0
    cols = tl.arange(0, COLS)
    kk = tl.arange(0, GROUP)
    # each column's expert, read once (-1 where the slot reads nothing): a load inside the loop
    # would feed the weights' addresses and hold up its cp.async pipeline
    slot_expert = tl.load(ids_row + cols * ids_s1, mask=cols < TOP_K, other=-1).to(tl.int32)
    routed_col = (cols < TOP_K) & (slot_expert >= 0) & (slot_expert < n_experts)
    col_expert = tl.where(routed_col, slot_expert, -1)
    w_rows = w_ptr + rows * w_sn                                     # a routed expert's rows: one scale
    s_rows = ws_ptr + (offs_n // GROUP) * ws_sn                      # per GROUP x GROUP block
    acc = tl.zeros([BLOCK_N, COLS], tl.float32)                      # column j: slot j's rows
    S_SLOT: tl.constexpr = (G_SLOT + GROUPS - 1) // GROUPS            # steps a routed slot
    for i in range(0, TOP_K * S_SLOT):
        slot = i // S_SLOT
        g0 = (i % S_SLOT) * GROUPS
        expert = tl.sum(tl.where(cols == slot, col_expert, 0), axis=0)
        use = expert >= 0
        expert = tl.maximum(expert, 0).to(tl.int64)
        for sub in tl.static_range(GROUPS):
            g = g0 + sub
            acc = _down_step(acc, act_row + slot * inter, as_row + slot * G_SLOT, g, slot, use & (g < G_SLOT), inter,
                             w_rows + expert * w_se, s_rows + expert * ws_se + g * ws_sk, n_ok, cols, kk, GROUP,
                             EVEN_K, EVEN_N, QUANT_IN, QMAX)
    if G_SHARED > 0:
        # Fp8BlockLinear's layout: one scale per row and GROUP columns
        sw_rows = sw_ptr + rows * sw_sn
        ss_rows = sws_ptr + offs_n * sws_sn
        for g0 in range(0, G_SHARED, GROUPS):
            for sub in tl.static_range(GROUPS):
                g = g0 + sub
                acc = _down_step(acc, act_row + TOP_K * inter, as_row + TOP_K * G_SLOT, g, TOP_K, g < G_SHARED,
                                 s_inter, sw_rows, ss_rows + g * sws_sk, n_ok, cols, kk, GROUP, EVEN_K, EVEN_N,
                                 QUANT_IN, QMAX)
    tw = tl.load(tw_ptr + tok * tw_s0 + cols * tw_s1, mask=routed_col, other=0.0).to(tl.float32)
    # each routed output rounded to dt before its weight; the shared one rounded, weight 1
    y = acc.to(dt).to(tl.float32)
    out = tl.sum(tl.where(routed_col[None, :], y * tw[None, :], 0.0), axis=1)
    if G_SHARED > 0:
        out += tl.sum(tl.where(cols[None, :] == TOP_K, y, 0.0), axis=1)
    tl.store(out_ptr + tok * out_stride + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def _mma_settings(cfg: dict, kernel: str) -> tuple[dict, bool]:
    """(launch keywords, QUANT_IN) of an MMA rule: BLOCK_N, num_warps, num_stages (the K loop's
    cp.async depth); GROUPS (down: 128-groups a loop step, default 1) is read apart; BLOCK_K and
    LOOP_STAGES are the CUDA-core kernels'."""
    if cfg["BLOCK_N"] < 16:
        raise ValueError(f"fused_moe_small MMA ({kernel}) needs BLOCK_N >= 16 weight rows a program, "
                         f"got {cfg['BLOCK_N']}")
    launch = {key: cfg[key] for key in ("BLOCK_N", "num_warps", "num_stages")}
    return launch, bool(cfg.get("QUANT_IN", 1))


def act_quantized_by_gate_up(cfg: dict, inter: int, s_inter: int) -> bool:
    """Whether gate_up_mma with these settings can also quantise act for the down kernel (each
    program's rows one whole 128-group of it), saving act_quant_fp8's launch."""
    return cfg["BLOCK_N"] == FP8_GROUP and inter % FP8_GROUP == 0 and s_inter % FP8_GROUP == 0


def gate_up_mma(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor,
                act: torch.Tensor, cfg: dict, inter: int, shared: Optional[tuple[torch.Tensor, torch.Tensor]],
                quant_out: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """act [T, k*I + Is] = silu(gate) * up of every (token, slot) and of the shared expert
    (shared = (shared_w13, its scales) or None), as _small_gate_up_kernel writes it; with
    quant_out = (e4m3 [T, k*I + Is], fp32 [T, (k*I + Is) / 128]) also act quantised into them
    as act_quant_fp8 would (where act_quantized_by_gate_up)."""
    launch, quant_in = _mma_settings(cfg, "gate_up")
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    q, qs = (x, x) if quant_in else act_quant_fp8(x)
    sw, sws = shared if shared is not None else (w13, w13_scale)
    s_inter = sw.shape[0] // 2 if shared is not None else 0
    if quant_out is not None and not act_quantized_by_gate_up(cfg, inter, s_inter):
        raise ValueError(f"gate_up_mma quantises act only with BLOCK_N {FP8_GROUP} and I, Is multiples of it, "
                         f"got BLOCK_N {cfg['BLOCK_N']}, I {inter}, Is {s_inter}")
    qa, qas = quant_out if quant_out is not None else (act, act)
    n_assign = num_tokens * top_k
    grid = (n_assign + (num_tokens if shared is not None else 0), cdiv(max(inter, s_inter), launch["BLOCK_N"]))
    _gate_up_mma_kernel[grid](
        q, qs, topk_ids, w13, w13_scale, sw, sws, act, qa, qas, q.stride(0), 0 if quant_in else qs.stride(0),
        topk_ids.stride(0), topk_ids.stride(1), w13.stride(0), w13.stride(1), *w13_scale.stride(),
        sw.stride(0), *(sws.stride() if shared is not None else (0, 0)), act.stride(0), qa.stride(0), qas.stride(0),
        inter, s_inter, hidden, w13.shape[0], n_assign, TOP_K=top_k, GROUP=FP8_GROUP, QUANT_OUT=quant_out is not None,
        EVEN_K=hidden % FP8_GROUP == 0, EVEN_N=inter % launch["BLOCK_N"] == 0 and s_inter % launch["BLOCK_N"] == 0,
        HAS_SHARED=shared is not None, QUANT_IN=quant_in, QMAX=FP8_MAX,
        **launch, **pdl_launch(x.device))


def down_mma(act: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor,
             w2_scale: torch.Tensor, out: torch.Tensor, cfg: dict, inter: int,
             shared: Optional[tuple[torch.Tensor, torch.Tensor]],
             quantized: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
    """out [T, D] = sum over slots of weight x (w2[expert] @ act slot) + the shared expert's
    down (shared = (shared_w2, its scales) or None). QUANT_IN 0 quantises act beforehand only
    where every slot's act starts on a 128-group (I and Is multiples of 128), else inside;
    `quantized` is act so quantised already (gate_up_mma's quant_out)."""
    launch, quant_in = _mma_settings(cfg, "down")
    num_tokens, hidden = out.shape
    top_k = topk_ids.shape[1]
    sw, sws = shared if shared is not None else (w2, w2_scale)
    s_inter = sw.shape[1] if shared is not None else 0
    quant_in = (quant_in or inter % FP8_GROUP != 0 or s_inter % FP8_GROUP != 0) and quantized is None
    q, qs = (act, act) if quant_in else (quantized if quantized is not None else act_quant_fp8(act))
    g_shared = cdiv(s_inter, FP8_GROUP)
    groups = cfg.get("GROUPS", 1)
    _down_mma_kernel[(num_tokens, cdiv(hidden, launch["BLOCK_N"]))](
        q, qs, topk_ids, topk_weights, w2, w2_scale, sw, sws, out, q.stride(0), 0 if quant_in else qs.stride(0),
        topk_ids.stride(0), topk_ids.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        w2.stride(0), w2.stride(1), *w2_scale.stride(), sw.stride(0), *(sws.stride() if shared is not None else (0, 0)),
        out.stride(0), hidden, inter, s_inter, w2.shape[0], TOP_K=top_k, GROUP=FP8_GROUP,
        G_SLOT=cdiv(inter, FP8_GROUP), G_SHARED=g_shared, GROUPS=groups, COLS=max(16, next_pow2(top_k + 1)),
        EVEN_K=inter % FP8_GROUP == 0 and s_inter % FP8_GROUP == 0, EVEN_N=hidden % launch["BLOCK_N"] == 0,
        QUANT_IN=quant_in, QMAX=FP8_MAX, **launch, **pdl_launch(act.device))
