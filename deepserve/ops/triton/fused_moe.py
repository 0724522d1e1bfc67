"""Fused MoE experts as two grouped-GEMM Triton kernels over tokens sorted by expert.

After `align_by_expert`, program (m, n) of the first kernel multiplies BLOCK_M rows routed
to one expert by that expert's gate and up columns n at once and writes
silu(gate) * up (the activation fused into the GEMM epilogue, so the 2I-wide intermediate
never reaches memory). The second kernel multiplies by the expert's down projection,
scales each row by its routing weight and writes it to its (token, slot) row; a small
kernel then sums each token's k rows in fp32. The grid is fixed by host-known bounds, so
nothing syncs and the whole op can sit in a CUDA graph. Batches of a few tokens
(`use_small_path`) run fused_moe_small.py instead: two GEMV launches, no sort. The layout
follows vLLM's/SGLang's fused_moe (sorted token ids + per-block expert ids).

fp8 weights (e4m3 with one fp32 scale_inv per 128x128 block, DeepSeek-V3's format) run as
W8A8: each BLOCK_K=128 slice of an activation row is quantised to e4m3 in registers with
its own scale (per-token-group quantisation, as DeepSeek-V3's inference does), the product
runs on fp8 tensor cores, and both scales are applied to the partial sums.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deepserve.ops.moe import check_shared_experts
from deepserve.ops.registry import register
from deepserve.ops.triton.activation import silu_and_mul
from deepserve.ops.triton._common import dot_dtype, interpreting, next_pow2, unit_last
from deepserve.ops.triton.fused_moe_small import fused_moe_small, moe_shapes
from deepserve.ops.triton.moe_align import align_by_expert

FP8_BLOCK = 128
FP8_MAX = 448.0


@triton.jit
def _quant_group(a, FP8_MAX_C: tl.constexpr):
    """Row-wise e4m3 quantisation of an activation tile [M, 128] -> (values, scales [M])."""
    amax = tl.maximum(tl.max(tl.abs(a), axis=1), 1e-10)
    scale = amax / FP8_MAX_C
    return (a / scale[:, None]).to(tl.float8e4nv), scale


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ws_ptr, sorted_ptr, block_expert_ptr, out_ptr,
                    x_stride, w_se, w_sn, w_sk, ws_se, ws_sn, ws_sk, out_stride,
                    n_assign, inter, hidden, n_experts,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    FP8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP8:
                a_q, a_s = _quant_group(a.to(tl.float32), 448.0)
                kb = k0 // BLOCK_K
                s_base = ws_ptr + expert * ws_se + kb * ws_sk
                sg = tl.load(s_base + (offs_n // BLOCK_K) * ws_sn, mask=n_ok, other=0.0)
                su = tl.load(s_base + ((offs_n + inter) // BLOCK_K) * ws_sn, mask=n_ok, other=0.0)
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


@triton.jit
def _down_kernel(h_ptr, w_ptr, ws_ptr, sorted_ptr, block_expert_ptr, topk_w_ptr, out_ptr,
                 h_stride, w_se, w_sn, w_sk, ws_se, ws_sn, ws_sk, out_stride,
                 n_assign, hidden, inter, n_experts,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 FP8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
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
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if FP8:
                a_q, a_s = _quant_group(a.to(tl.float32), 448.0)
                s = tl.load(ws_ptr + expert * ws_se + (k0 // BLOCK_K) * ws_sk + (offs_n // BLOCK_K) * ws_sn,
                            mask=n_ok, other=0.0)
                acc += tl.dot(a_q, w) * a_s[:, None] * s[None, :]
            else:
                acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * w_sk
        y = acc.to(out_ptr.dtype.element_ty).to(tl.float32)      # the reference's bf16 linear output
        y = y * tl.load(topk_w_ptr + safe_rows, mask=row_ok, other=0.0)[:, None]
        tl.store(out_ptr + safe_rows[:, None] * out_stride + offs_n[None, :], y,
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_slots_kernel(y_ptr, ids_ptr, out_ptr, hidden, n_experts, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum over the token's k slots routed to a local expert of y[t*k + j] (fp32)."""
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + tok * TOP_K + j)
        local = (e >= 0) & (e < n_experts)
        acc += tl.load(y_ptr + (tok * TOP_K + j) * hidden + offs, mask=mask & local, other=0.0)
    tl.store(out_ptr + tok * hidden + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def use_small_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether `fused_moe_small` (two GEMV launches, no sort) runs this batch.

    It reads an expert's weights once per (token, slot) routed to it, so two tokens sharing
    an expert read it twice, where the sorted grouped GEMM reads it once for both. That is
    rare while the assignments are few against the experts (T*k <= E/2), and the ~20 small
    launches the sort costs dominate there; the floor of 8 keeps tiny expert counts (tests,
    EP shards) on the launch-light path for a single token."""
    return num_tokens * top_k <= max(8, num_experts // 2)


# launch settings merged over _tiles' choice when set, for timing candidates
# (benchmarks/sweep_fused_moe.py): {"BLOCK_M": m, "gate_up": {...}, "down": {...}}, each
# kernel's keys among BLOCK_N, BLOCK_K, num_warps, num_stages
TILE_OVERRIDE: dict | None = None


def _tiles(n_assign: int, num_experts: int, fp8: bool, elem_bytes: int = 2) -> tuple[int, dict, dict]:
    """BLOCK_M by rows per expert, and each kernel's BLOCK_N, BLOCK_K, num_warps, num_stages:
    (BLOCK_M, gate_up settings, down settings). fp32 activations and weights take twice the
    shared memory per stage: half the K tile and at most 2 stages keep the 64x128 tiles under
    Hopper's 227 KB.

    64-row blocks (over 48 rows per expert, where the GEMMs turn compute-bound) were timed on
    an H100 at R1's experts and 8192 tokens (benchmarks/sweep_fused_moe.py, 2026-11-23):
    gate_up with 8 warps (bf16 also 256 columns) and down with 256 columns and 8 warps took
    the whole op from 22.5 to 18.7 ms (bf16, 32% -> 39% of the bf16 matmul rate) and from
    41.2 to 18.8 ms (fp8; at 4 warps its gate_up alone was twice as slow). Fewer rows per
    expert keep the settings from before, which that sweep did not cover."""
    if interpreting():
        cfg = dict(BLOCK_N=32, BLOCK_K=FP8_BLOCK if fp8 else 32, num_warps=4, num_stages=1)
        return 16, cfg, dict(cfg)
    per_expert = n_assign / max(num_experts, 1)
    block_m = 16 if per_expert <= 16 else (32 if per_expert <= 48 else 64)
    block_k = 128 if fp8 else (64 if elem_bytes <= 2 else 32)
    stages = (4 if block_m <= 32 else 3) if elem_bytes <= 2 else 2
    cfg = dict(BLOCK_N=64 if block_m <= 32 else 128, BLOCK_K=block_k, num_warps=4, num_stages=stages)
    gate_up, down = dict(cfg), dict(cfg)
    if block_m == 64 and elem_bytes <= 2:
        gate_up.update(num_warps=8, BLOCK_N=128 if fp8 else 256)
        down.update(num_warps=8, BLOCK_N=256)
    return block_m, gate_up, down


@register("fused_moe", "triton")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: Optional[torch.Tensor] = None,
              w2_scale: Optional[torch.Tensor] = None, shared_w13: Optional[torch.Tensor] = None,
              shared_w2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] (rows: gate then up), w2 [E, D, I] -> [T, D]; plus the shared
    experts shared_w13 [2*Is, D] / shared_w2 [D, Is] when given: fused into the small path's
    two launches, a torch MLP added after the sorted path (it streams its weights once there)."""
    num_tokens, hidden, num_experts, inter, fp8 = moe_shapes(x, w13, w2, w13_scale, w2_scale)
    check_shared_experts(x, fp8, shared_w13, shared_w2)
    top_k = topk_ids.shape[1]
    if num_tokens and use_small_path(num_tokens, top_k, num_experts):
        return fused_moe_small(x, w13, w2, topk_weights, topk_ids, w13_scale=w13_scale, w2_scale=w2_scale,
                               shared_w13=shared_w13, shared_w2=shared_w2)
    if shared_w13 is not None:   # LlamaMLP's ops: cuBLAS GEMMs around the Triton SiLU-and-mul
        shared = F.linear(silu_and_mul(F.linear(x, shared_w13)), shared_w2)
        return fused_moe(x, w13, w2, topk_weights, topk_ids) + shared
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    n_assign = num_tokens * top_k
    block_m, gu, dn = _tiles(n_assign, num_experts, fp8, w13.element_size())
    over = TILE_OVERRIDE or {}
    block_m = over.get("BLOCK_M", block_m)
    aligned = align_by_expert(topk_ids, num_experts, block_m)
    x = unit_last(x)
    act = torch.empty(n_assign, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(n_assign, hidden, dtype=torch.float32, device=x.device)
    s13 = w13_scale.stride() if fp8 else (0, 0, 0)
    s2 = w2_scale.stride() if fp8 else (0, 0, 0)
    common = dict(BLOCK_M=block_m, FP8=fp8, DOT_DTYPE=dot_dtype(x.dtype))
    gu, dn = {**common, **gu, **over.get("gate_up", {})}, {**common, **dn, **over.get("down", {})}
    _gate_up_kernel[(aligned.num_blocks, triton.cdiv(inter, gu["BLOCK_N"]))](
        x, w13, w13_scale if fp8 else w13, aligned.sorted_ids, aligned.block_expert, act,
        x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), *s13, act.stride(0),
        n_assign, inter, hidden, num_experts, TOP_K=top_k, **gu)
    _down_kernel[(aligned.num_blocks, triton.cdiv(hidden, dn["BLOCK_N"]))](
        act, w2, w2_scale if fp8 else w2, aligned.sorted_ids, aligned.block_expert,
        topk_weights.reshape(-1).float().contiguous(), y,
        act.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), *s2, y.stride(0),
        n_assign, hidden, inter, num_experts, **dn)
    block = min(next_pow2(hidden), 1024)
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block))](
        y, topk_ids.contiguous(), out, hidden, num_experts, TOP_K=top_k, BLOCK=block, num_warps=4)
    return out
