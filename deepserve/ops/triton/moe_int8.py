"""W8A8 int8 fused MoE as Triton kernels: int8 experts with one fp32 scale per output row and
int8 per-token activations (layout and function: ops/moe_int8.py, whose torch op is the oracle).

Activation rows are quantized by `_quant_rows_kernel` (amax / 127 with IEEE divisions and
round-half-even, so the int8 values and scales equal torch's bit for bit). Every product is
then int8 x int8 summed in int32, exact in any order, and the two scales are applied in the
epilogue in the reference's order ((acc * row scale) * channel scale, fp32), so gate, up, h and
each expert's down output equal the torch op's; only the fp32 sum over a token's slots may
differ in its order.

Two paths, as the 16-bit / fp8 fused MoE (fused_moe_small.py, fused_moe.py):

- small batches (`fused_moe.use_small_path`): no sort. `_small_gate_up_kernel`, grid
  (T*k, cdiv(I, BLOCK_N)), multiplies one assignment's quantized x row by its expert's gate
  and up rows n (elementwise int32 products, reduced once) and writes h = silu(gate) * up;
  after h's rows are quantized, `_small_down_kernel`, grid (T, cdiv(D, BLOCK_N)), runs each
  token's down rows n over its k slots and sums them with the routing weights in fp32, so
  there is no [T*k, D] buffer. The time is the weights' bytes: one byte a value.
- larger batches: the assignments sorted by expert into BLOCK_M-row blocks (moe_align.py);
  `_sorted_gate_up_kernel` and `_sorted_down_kernel` are grouped GEMMs whose programs gather
  one block's int8 rows and multiply them by tiles of its expert's weight with int8 tensor-core
  dots (`tl.dot(..., out_dtype=int32)`), the scales and silu(gate) * up in the epilogue; the
  slots are summed by fused_moe.py's `_sum_slots_kernel`.

All grids come from host sizes (no device sync; CUDA-graph safe). Assignments whose expert
lies outside [0, E) (another EP rank's) read nothing and add zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.ops.moe_int8 import check_moe_int8_operands
from deepserve.ops.moe_int8 import fused_moe_int8 as fused_moe_int8_torch
from deepserve.ops.quant import INT8_MAX
from deepserve.ops.registry import register
from deepserve.ops.triton._common import cdiv, interpreting, next_pow2
from deepserve.ops.triton.fused_moe import _sum_slots_kernel, use_small_path
from deepserve.ops.triton.moe_align import align_by_expert

_ROUND_MAGIC = 12582912.0      # 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 half to even


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr, QMAX: tl.constexpr,
                       MAGIC: tl.constexpr, PARITY_LANES: tl.constexpr):
    """Row r of x [R, K] -> int8 q[r] and its fp32 scale s[r] = max(amax, 1e-12) / QMAX, as
    ops.quant.quant_int8_rows: divisions rounded to nearest, values rounded half to even.
    PARITY_LANES writes each 8-column group's even columns first: column 8c + 2j + h lands at
    8c + 4h + j (the lane order of w4a8_gemm's parity unpack; K a multiple of 8)."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), QMAX)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.div_rn(x, scale)
        v = (v + MAGIC) - MAGIC
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        if PARITY_LANES:
            dst = (offs & -8) | ((offs & 1) << 2) | ((offs >> 1) & 3)
        else:
            dst = offs
        tl.store(q_ptr + row * stride_q + dst, v.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


def quant_rows_int8(x: torch.Tensor, parity_lanes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (int8 [R, K], fp32 scale [R]), one symmetric scale per row; parity_lanes:
    the columns of each 8-column group reordered even ones first (`_quant_rows_kernel`)."""
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    s = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block = min(next_pow2(k), 128 if interpreting() else 2048)
        _quant_rows_kernel[(rows,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, QMAX=INT8_MAX,
                                    MAGIC=_ROUND_MAGIC, PARITY_LANES=parity_lanes, num_warps=4)
    return q, s


@triton.jit
def _rows_dot_int8(a_row, w_rows, row_ok, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 [BLOCK_N]: int8 rows w_rows [BLOCK_N, 1] (pointers) times the int8 vector a_row [K], exact."""
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_row + offs_k, mask=k_ok, other=0).to(tl.int32)
        w = tl.load(w_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
        acc += w * a[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _swiglu_epilogue(acc_g, acc_u, a_scale, s_gate, s_up, dt: tl.constexpr):
    """silu(gate) * up in fp32 from the int32 sums, gate and up rounded to dt as the reference's
    int8_linear outputs, and silu(gate) too."""
    gate = (acc_g.to(tl.float32) * a_scale * s_gate).to(dt).to(tl.float32)
    up = (acc_u.to(tl.float32) * a_scale * s_up).to(dt).to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * up


@triton.jit
def _small_gate_up_kernel(xq_ptr, xs_ptr, ids_ptr, w_ptr, ws_ptr, h_ptr, E, I, D, top_k,
                          stride_xq, stride_we, stride_wn, stride_se, stride_ha,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    a = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    e = tl.load(ids_ptr + a).to(tl.int64)
    if (e >= 0) & (e < E):
        tok = (a // top_k).to(tl.int64)
        x_row = xq_ptr + tok * stride_xq
        g_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
        acc_g = _rows_dot_int8(x_row, g_rows, n_ok, D, BLOCK_N, BLOCK_K)
        acc_u = _rows_dot_int8(x_row, g_rows + I * stride_wn, n_ok, D, BLOCK_N, BLOCK_K)
        s = ws_ptr + e * stride_se
        sg = tl.load(s + offs_n, mask=n_ok, other=0.0)
        su = tl.load(s + I + offs_n, mask=n_ok, other=0.0)
        dt = h_ptr.dtype.element_ty
        h = _swiglu_epilogue(acc_g, acc_u, tl.load(xs_ptr + tok), sg, su, dt)
        tl.store(h_ptr + a.to(tl.int64) * stride_ha + offs_n, h.to(dt), mask=n_ok)


@triton.jit
def _small_down_kernel(hq_ptr, hs_ptr, ids_ptr, wts_ptr, w_ptr, ws_ptr, out_ptr, E, I, D,
                       stride_hq, stride_we, stride_wn, stride_se, stride_out,
                       TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    dt = out_ptr.dtype.element_ty
    out = tl.zeros([BLOCK_N], tl.float32)
    for j in tl.static_range(TOP_K):
        a = tok * TOP_K + j
        e = tl.load(ids_ptr + a).to(tl.int64)
        if (e >= 0) & (e < E):
            w_rows = w_ptr + e * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn
            acc = _rows_dot_int8(hq_ptr + a * stride_hq, w_rows, n_ok, I, BLOCK_N, BLOCK_K)
            s = tl.load(ws_ptr + e * stride_se + offs_n, mask=n_ok, other=0.0)
            y = (acc.to(tl.float32) * tl.load(hs_ptr + a) * s).to(dt).to(tl.float32)   # the expert's output
            out += y * tl.load(wts_ptr + a).to(tl.float32)
    tl.store(out_ptr + tok * stride_out + offs_n, out.to(dt), mask=n_ok)


@triton.jit
def _sorted_tile(sorted_ptr, block_expert_ptr, n_assign, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's expert (E past the last segment), its assignment rows (safe indices) and
    their mask, and its output columns and their mask."""
    expert = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    rows = tl.load(sorted_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < n_assign
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, tl.where(row_ok, rows, 0).to(tl.int64), row_ok, offs_n, offs_n < N


@triton.jit
def _tile_dot_int8(a_rows, w_cols, row_ok, n_ok, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N]: gathered int8 rows a_rows [BLOCK_M, 1] times int8 weight rows
    w_cols [1, BLOCK_N] (pointers; the weight is [N, K], read as its transpose), on int8 tensor cores."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
    return acc


@triton.jit
def _sorted_gate_up_kernel(xq_ptr, xs_ptr, sorted_ptr, block_expert_ptr, w_ptr, ws_ptr, h_ptr, n_assign, E, I, D,
                           stride_xq, stride_we, stride_wn, stride_se, stride_ha,
                           TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, rows, row_ok, offs_n, n_ok = _sorted_tile(sorted_ptr, block_expert_ptr, n_assign, I, BLOCK_M, BLOCK_N)
    if expert < E:
        tok = rows // TOP_K
        a_rows = xq_ptr + tok[:, None] * stride_xq
        g_cols = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        u_cols = g_cols + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
        for k0 in range(0, D, BLOCK_K):          # one gathered activation tile for gate and up
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < D
            a = tl.load(a_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
            w_ok = k_ok[:, None] & n_ok[None, :]
            acc_g += tl.dot(a, tl.load(g_cols + offs_k[:, None], mask=w_ok, other=0), out_dtype=tl.int32)
            acc_u += tl.dot(a, tl.load(u_cols + offs_k[:, None], mask=w_ok, other=0), out_dtype=tl.int32)
        s = ws_ptr + expert * stride_se
        sg = tl.load(s + offs_n, mask=n_ok, other=0.0)
        su = tl.load(s + I + offs_n, mask=n_ok, other=0.0)
        xs = tl.load(xs_ptr + tok, mask=row_ok, other=0.0)
        dt = h_ptr.dtype.element_ty
        h = _swiglu_epilogue(acc_g, acc_u, xs[:, None], sg[None, :], su[None, :], dt)
        tl.store(h_ptr + rows[:, None] * stride_ha + offs_n[None, :], h.to(dt), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sorted_down_kernel(hq_ptr, hs_ptr, sorted_ptr, block_expert_ptr, w_ptr, ws_ptr, y_ptr, n_assign, E, I, D,
                        stride_hq, stride_we, stride_wn, stride_se, stride_ya,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, rows, row_ok, offs_n, n_ok = _sorted_tile(sorted_ptr, block_expert_ptr, n_assign, D, BLOCK_M, BLOCK_N)
    if expert < E:
        w_cols = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        acc = _tile_dot_int8(hq_ptr + rows[:, None] * stride_hq, w_cols, row_ok, n_ok, I, BLOCK_M, BLOCK_N, BLOCK_K)
        hs = tl.load(hs_ptr + rows, mask=row_ok, other=0.0)
        s = tl.load(ws_ptr + expert * stride_se + offs_n, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * hs[:, None] * s[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ya + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def _sorted_tiles(n_assign: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): row blocks sized to the rows per
    expert (an expert's last block is padding), 128-byte K steps of int8."""
    if interpreting():
        return 16, 16, 32, 1, 1
    if n_assign / max(num_experts, 1) <= 16:
        return 16, 64, 128, 4, 4
    if n_assign / max(num_experts, 1) <= 64:
        return 64, 64, 128, 4, 4
    return 128, 128, 128, 8, 3


def _sorted_path(xq, xs, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, dtype):
    num_tokens, top_k = topk_ids.shape
    e, two_i, d = w13.shape
    i = two_i // 2
    n_assign = num_tokens * top_k
    bm, bn, bk, warps, stages = _sorted_tiles(n_assign, e)
    aligned = align_by_expert(topk_ids, e, bm)
    # rows of other EP ranks' assignments are never written: zeros keep their quantization finite
    h = torch.zeros(n_assign, i, dtype=dtype, device=xq.device)
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    _sorted_gate_up_kernel[(aligned.num_blocks, cdiv(i, bn))](
        xq, xs, aligned.sorted_ids, aligned.block_expert, w13, w13_scale, h, n_assign, e, i, d,
        xq.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), h.stride(0), TOP_K=top_k, **kw)
    hq, hs = quant_rows_int8(h)
    y = torch.empty(n_assign, d, dtype=dtype, device=xq.device)
    _sorted_down_kernel[(aligned.num_blocks, cdiv(d, bn))](
        hq, hs, aligned.sorted_ids, aligned.block_expert, w2, w2_scale, y, n_assign, e, i, d,
        hq.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), y.stride(0), **kw)
    out = torch.empty(num_tokens, d, dtype=dtype, device=xq.device)
    block = min(next_pow2(d), 1024)
    _sum_slots_kernel[(num_tokens, cdiv(d, block))](
        y, topk_ids.to(torch.int32).contiguous(), topk_weights.reshape(-1).float().contiguous(), out, out, d, e,
        TOP_K=top_k, BLOCK=block, ADD=False, num_warps=4)
    return out


def _small_path(xq, xs, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, dtype):
    num_tokens, top_k = topk_ids.shape
    e, two_i, d = w13.shape
    i = two_i // 2
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    bn, bk, warps = (16, 32, 1) if interpreting() else (16, 256, 4)
    h = torch.zeros(ids.numel(), i, dtype=dtype, device=xq.device)
    _small_gate_up_kernel[(ids.numel(), cdiv(i, bn))](
        xq, xs, ids, w13, w13_scale, h, e, i, d, top_k, xq.stride(0), w13.stride(0), w13.stride(1),
        w13_scale.stride(0), h.stride(0), BLOCK_N=bn, BLOCK_K=min(bk, next_pow2(d)), num_warps=warps)
    hq, hs = quant_rows_int8(h)
    out = torch.empty(num_tokens, d, dtype=dtype, device=xq.device)
    _small_down_kernel[(num_tokens, cdiv(d, bn))](
        hq, hs, ids, wts, w2, w2_scale, out, e, i, d, hq.stride(0), w2.stride(0), w2.stride(1),
        w2_scale.stride(0), out.stride(0), TOP_K=top_k, BLOCK_N=bn, BLOCK_K=min(bk, next_pow2(i)),
        num_warps=warps)
    return out


@register("fused_moe_int8", "triton")
def fused_moe_int8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    if (not (x.is_cuda or interpreting()) or num_tokens == 0
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return fused_moe_int8_torch(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    check_moe_int8_operands(x, w13, w13_scale, w2, w2_scale)
    w13, w2 = w13.contiguous(), w2.contiguous()
    w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    xq, xs = quant_rows_int8(x.contiguous())
    path = _small_path if use_small_path(num_tokens, top_k, w13.shape[0]) else _sorted_path
    return path(xq, xs, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, x.dtype)
