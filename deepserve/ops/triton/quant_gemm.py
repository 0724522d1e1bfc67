"""Block-scaled FP8 GEMM (DeepSeek-V3's W8A8 FP8 recipe) as Triton kernels.

y = x W^T with W e4m3 [N, K] and fp32 scales row-expanded to [N, ceil(K/128)], x quantized at
run time to e4m3 per token per 128 input features. Two kernels:

1. `_act_quant_kernel`: one program per (row, 128-group): amax -> scale = amax / 448,
   q = e4m3(x / scale). The division is IEEE round-to-nearest (`tl.div_rn`), as torch's, so
   the quantized activations are bit-identical to the torch reference.
2. `_fp8_gemm_kernel`: a tiled GEMM whose K step is exactly one 128-group, so each step's
   fp8 tensor-core product (fp32 accumulate) is rescaled by a_scale[m] x w_scale[n] before it
   joins the fp32 accumulator: the "per-group promotion" DeepSeek's paper describes. With A16
   (`fp8_weight_only_linear`, a checkpoint without activation quantization: W8A16) the rows
   stay in their dtype, the e4m3 weight tile is widened to it (exactly) for the MMA, and each
   step's product is rescaled by w_scale[n] alone.

The idea is that of vLLM's `w8a8_block_fp8_matmul` and DeepSeek's `fp8_gemm`; the code is
ours. Tile sizes are chosen per M (decode vs prefill), without autotuning. GPUs without fp8
tensor cores (compute capability < 8.9) and CPU tensors run the torch reference.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.quant import FP8_GROUP, check_fp8_operands
from deepserve.ops.quant import fp8_block_linear as fp8_block_linear_torch
from deepserve.ops.quant import fp8_static_linear as fp8_static_linear_torch
from deepserve.ops.quant import fp8_weight_only_linear as fp8_weight_only_linear_torch
from deepserve.ops.quant import quant_fp8_static
from deepserve.ops.registry import register
from deepserve.platforms import CudaPlatform
from deepserve.ops.triton._common import (as_rows, cdiv, dot_dtype, dot_precision, interpreting, next_pow2, pdl_begin, pdl_launch,
                                          prefetch_rows, quantize_e4m3, round_to_e4m3, unpack_by_ptx)
from deepserve.ops.triton.fp8_half2 import SCALE as SCALE_H2
from deepserve.ops.triton.fp8_half2 import quantized_row_pairs, quarters, row_pairs, word_fma16
from deepserve.ops.triton.gemm import grouped_tile
from deepserve.ops.triton.int4_half2 import pair_sum16
from deepserve.ops.triton.launch_config import launch_settings
from deepserve.ops.quant import FP8_DTYPE, FP8_MAX


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, stride_s,
                      GROUP: tl.constexpr, QMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = cols < K
    q, scale = quantize_e4m3(tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32), QMAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_s + g, scale)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_as, stride_bs,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, A16: tl.constexpr = False,
                     DOT_DTYPE: tl.constexpr = tl.bfloat16, PRECISION: tl.constexpr = "tf32"):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]   # W^T tile [BK, BN]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_as
    bs_ptrs = bs_ptr + offs_n.to(tl.int64) * stride_bs

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)                       # [BN]
        if A16:
            acc += tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION) * b_s[None, :]
        else:
            a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)                   # [BM]
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def act_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, ceil(K/128)]), as ops.quant.quant_fp8_per_token_group."""
    m, k = x.shape
    kb = cdiv(k, FP8_GROUP)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, kb), dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, kb)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0),
                                   GROUP=FP8_GROUP, QMAX=FP8_MAX, num_warps=1)
    return q, s


@triton.jit
def _fp8_gemv_kernel(x_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, groups_per_split, stride_wn, stride_ws,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
                     QUANT_X: tl.constexpr, QMAX: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
                     PREFETCH: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr, H2: tl.constexpr = 0,
                     ASM: tl.constexpr = 0):
    """One quantized row (e4m3 q [K], scales [Kb]) times BLOCK_N rows of the e4m3 weight: each
    step reads GROUPS 128-wide groups of the rows, sums each group's exact e4m3 x e4m3 products
    in fp32 and scales it by its activation and weight scales (the GEMM's per-group promotion,
    on the CUDA cores: at one row a tensor-core tile would be mostly padding). Program (i, s)
    covers the s-th run of groups_per_split groups and writes its fp32 partial sums to row s of
    y [splits, N] (one split: the output row itself).

    QUANT_X: x_ptr is the unquantized row and as_ptr unused; each step quantizes its groups as
    _act_quant_kernel does (the same scales and e4m3 values), so one row needs no second launch.
    The weight rows depend on no earlier kernel: with PDL they are asked into L2 before the wait
    (PREFETCH, small weights only); STAGES is the K loop's software-pipelining depth.

    H2 1 (K and the row stride multiples of 4): a thread's 16 weight bytes of a row, read as 4
    words, times the row in packed fp16 arithmetic (fp8_half2; PTX with ASM, else replayed),
    each run's sum scaled by its group's scales into an fp32 sum a thread, added across threads
    once after the loop; H2 0 converts byte by byte and sums in fp32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    w_words = w_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None, None] * (stride_wn // 4)
    x_words = x_ptr.to(tl.pointer_type(tl.int32))
    g_first = tl.program_id(1) * groups_per_split
    g_end = tl.minimum(g_first + groups_per_split, tl.cdiv(K, GROUP))
    prefetch_rows(w_ptr + tl.minimum(rows, N - 1).to(tl.int64) * stride_wn + g_first * GROUP,
                  tl.minimum(g_end * GROUP, K) - g_first * GROUP, LINE, LINES, PREFETCH)
    pdl_begin(USE_PDL)
    acc = tl.zeros([BLOCK_N], tl.float32)
    C: tl.constexpr = GROUPS * GROUP // 16          # H2: runs of 4 words (16 bytes, one thread's) of a row a step
    runs = tl.zeros([BLOCK_N, C], tl.float32)       # H2: each run's scaled sums, added across threads after the loop
    for g0 in tl.range(g_first, g_end, GROUPS, num_stages=STAGES):
        offs = g0 * GROUP + tl.arange(0, GROUPS * GROUP)
        k_ok = (offs < g_end * GROUP) & (offs < K)
        groups = g0 + tl.arange(0, GROUPS)
        g_ok = groups < g_end
        if QUANT_X:
            x = tl.reshape(tl.load(x_ptr + offs, mask=k_ok, other=0.0).to(tl.float32), [GROUPS, GROUP])
            a_s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), QMAX)            # [G]
            q = round_to_e4m3(tl.minimum(tl.maximum(tl.div_rn(x, a_s[:, None]), -QMAX), QMAX))
            q = tl.reshape(q, [GROUPS * GROUP])
        elif not H2:
            q = tl.load(x_ptr + offs, mask=k_ok, other=0.0).to(tl.float32)
        if H2:
            # words [C, 4]: the step's runs of each row; a run's group and its scales [C], [BN, C]
            wk = g0 * (GROUP // 4) + 4 * tl.arange(0, C)[:, None] + tl.arange(0, 4)[None, :]
            run_g = g0 + tl.arange(0, C) // (GROUP // 16)
            if QUANT_X:
                a_s = tl.reshape(tl.broadcast_to(a_s[:, None], [GROUPS, GROUP // 16]), [C])
            else:
                a_s = tl.load(as_ptr + run_g, mask=run_g < g_end, other=0.0)
            w_s = tl.load(ws_ptr + rows[:, None] * stride_ws + run_g[None, :],
                          mask=row_ok[:, None] & (run_g < g_end)[None, :], other=0.0)
            wk_ok = (wk < g_end * (GROUP // 4)) & (wk < K // 4)
            ww = tl.load(w_words + wk[None, :, :], mask=row_ok[:, None, None] & wk_ok[None, :, :], other=0)
            if QUANT_X:
                x01, x23 = quantized_row_pairs(tl.reshape(q, [1, C, 4, 4]), ASM)                     # [1, C, 4] each
            else:
                x01, x23 = row_pairs(tl.load(x_words + wk[None, :, :], mask=wk_ok[None, :, :], other=0), ASM)
            w0, w1, w2, w3 = quarters(ww)                                                     # [BN, C]
            a0, a1, a2, a3 = quarters(x01)                                                    # [1, C]
            b0, b1, b2, b3 = quarters(x23)
            run = word_fma16(w0, a0, b0, tl.zeros([BLOCK_N, C], tl.int32), ASM)
            run = word_fma16(w1, a1, b1, run, ASM)
            run = word_fma16(w2, a2, b2, run, ASM)
            run = word_fma16(w3, a3, b3, run, ASM)
            runs += pair_sum16(run, ASM) * (w_s * a_s[None, :])
        else:
            if not QUANT_X:
                a_s = tl.load(as_ptr + groups, mask=g_ok, other=0.0)
            w = tl.load(w_rows + offs[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            part = tl.sum(tl.reshape(w * q[None, :], [BLOCK_N, GROUPS, GROUP]), axis=2)     # [BN, G]
            w_s = tl.load(ws_ptr + rows[:, None] * stride_ws + groups[None, :], mask=row_ok[:, None] & g_ok[None, :],
                          other=0.0)
            acc += tl.sum(part * (w_s * a_s[None, :]), axis=1)
    if H2:
        acc = tl.sum(runs, axis=1) * SCALE_H2
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tl.program_id(1) * N + rows, acc.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def row_group_operand(x_row, xs_row, offs, k_ok, g, g_ok, col, cols, QDT: tl.constexpr, QUANT_IN: tl.constexpr,
                      QMAX: tl.constexpr):
    """The N side of a weights-first e4m3 product: (q_cols [GROUP, COLS] e4m3 with the row's
    128-group g (features offs) in column `col`, zeros elsewhere; its scale). QUANT_IN: x_row is
    the unquantized row, quantized here as _act_quant_kernel does; else x_row is its e4m3
    quantization, loaded straight into its column, and xs_row its group scales. A group that is
    not g_ok gives zeros and a finite scale (quantized here) or 0 (loaded)."""
    if QUANT_IN:
        q, a_s = quantize_e4m3(tl.load(x_row + offs, mask=k_ok, other=0.0).to(tl.float32), QMAX)
        q_cols = tl.where(cols[None, :] == col, q[:, None], 0.0).to(QDT)          # exact: q is an e4m3 value
    else:
        q_cols = tl.load(x_row + offs[:, None] + cols[None, :] * 0, mask=k_ok[:, None] & (cols[None, :] == col),
                         other=0.0)
        a_s = tl.load(xs_row + g, mask=g_ok, other=0.0)
    return q_cols, a_s


@triton.jit
def _fp8_gemv_mma_kernel(x_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, groups_per_split, stride_wn, stride_ws,
                         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, QUANT_X: tl.constexpr,
                         QMAX: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr,
                         LINES: tl.constexpr):
    """_fp8_gemv_kernel's sums on the tensor cores, the operands swapped: BLOCK_N weight rows are
    the M side of an e4m3 product whose N side is the quantized row padded to 16 columns (the
    row in column 0, zeros beside it), one 128-group a step, each step's fp32 product scaled
    by its weight and activation scales as in _fp8_gemm_kernel. The CUDA-core GEMV spends about
    six instructions a weight byte converting and multiplying (ten to fourteen when it also
    quantizes the row, which each program repeats); here the MMA takes the e4m3 bytes as they
    are and a program quantizes its row once a step for all its rows. The K loop is pipelined
    by the launch's num_stages. Same programs and outputs as _fp8_gemv_kernel (split s of K
    writes row s of y)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    g_first = tl.program_id(1) * groups_per_split
    g_end = tl.minimum(g_first + groups_per_split, tl.cdiv(K, GROUP))
    prefetch_rows(w_ptr + tl.minimum(rows, N - 1).to(tl.int64) * stride_wn + g_first * GROUP,
                  tl.minimum(g_end * GROUP, K) - g_first * GROUP, LINE, LINES, PREFETCH)
    pdl_begin(USE_PDL)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    cols = tl.arange(0, 16)
    kk = tl.arange(0, GROUP)
    acc = tl.zeros([BLOCK_N, 16], tl.float32)
    for g in range(g_first, g_end):
        offs = g * GROUP + kk
        k_ok = offs < K
        q_cols, a_s = row_group_operand(x_ptr, as_ptr, offs, k_ok, g, True, 0, cols, w_ptr.dtype.element_ty,
                                        QUANT_X, QMAX)                                 # [GROUP, 16]
        w = tl.load(w_rows + offs[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)   # [BN, GROUP] e4m3
        w_s = tl.load(ws_ptr + rows * stride_ws + g, mask=row_ok, other=0.0)
        acc += tl.dot(w, q_cols) * (w_s * a_s)[:, None]
    y = tl.sum(tl.where(cols[None, :] == 0, acc, 0.0), axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + tl.program_id(1) * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


# fp8_block_linear runs one row (batch-1 decode) through the GEMV where the launch table
# (configs/fp8_gemv/) sets `use` for the weight's shape, else the tensor-core GEMM; the rest
# of a rule is the GEMV's settings (docs/PERFORMANCE.md: benchmarks/bench_quant_gemm.py --m 1
# times both), QUANT_IN among them: 1 quantizes the row inside the GEMV, 0 runs the activation
# quant kernel first; MMA 1 runs _fp8_gemv_mma_kernel (tensor cores; BLOCK_N >= 16 rows a
# program, GROUPS unused, STAGES its num_stages), 0 the CUDA-core kernel; H2 1 has the CUDA-core
# kernel multiply in packed fp16 (fp8_half2; where K and the weight's row stride are multiples of
# 4 bytes, else it converts byte by byte). DEEPSERVE_FP8_GEMV=0 / 1 overrides `use` for an A/B of
# whole decode steps.
FP8_GEMV_ENV = "DEEPSERVE_FP8_GEMV"
GEMV_KEYS = ("BLOCK_N", "GROUPS", "num_warps", "SPLIT_K", "STAGES", "QUANT_IN", "MMA", "H2")


def gemv_settings(n: int, k: int, device: torch.device) -> Optional[dict]:
    """The GEMV's settings for one row times an [n, k] fp8 weight on `device`, None where the
    GEMM serves one row better."""
    cfg = launch_settings("fp8_gemv", device, n=n, k=k)
    use = os.environ.get(FP8_GEMV_ENV)
    if not (int(use) if use in ("0", "1") else cfg.get("use", 0)):
        return None
    return {key: cfg[key] for key in GEMV_KEYS}


def fp8_gemv(q: torch.Tensor, a_scale: Optional[torch.Tensor], weight: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None, settings: Optional[dict] = None
             ) -> torch.Tensor:
    """e4m3 q [1, K] (scales [1, Kb]) x e4m3 weight [N, K] (scales [N, Kb]) -> [1, N] out_dtype,
    the same sums as fp8_gemm's. a_scale None: q is the unquantized row [1, K] (unit stride),
    quantized inside the kernel as act_quant_fp8 would. SPLIT_K > 1 splits K into that many runs
    of whole steps, summed in fp32 after (more programs for a weight of few rows). `settings`
    over the launch table's."""
    k, n = q.shape[1], weight.shape[0]
    cfg = {**launch_settings("fp8_gemv", q.device, n=n, k=k), **(settings or {})}
    kb = cdiv(k, FP8_GROUP)
    mma = bool(cfg.get("MMA", 0))
    step = 1 if mma else cfg["GROUPS"]
    per_split = cdiv(cdiv(kb, max(1, cfg["SPLIT_K"])), step) * step
    split = cdiv(kb, per_split)
    out = torch.empty((split, n), dtype=out_dtype if split == 1 else torch.float32, device=q.device)
    launch = pdl_launch(q.device, weight)
    launch.update(LINES=min(next_pow2(cdiv(per_split * FP8_GROUP, launch["LINE"])), 64))
    args = (q, a_scale if a_scale is not None else q, weight, w_scale, bias if bias is not None and split == 1 else out,
            out, n, k, per_split, weight.stride(0), w_scale.stride(0))
    common = dict(HAS_BIAS=bias is not None and split == 1, BLOCK_N=cfg["BLOCK_N"], GROUP=FP8_GROUP,
                  QUANT_X=a_scale is None, QMAX=FP8_MAX, num_warps=cfg["num_warps"], **launch)
    grid = (cdiv(n, cfg["BLOCK_N"]), split)
    if mma:
        if cfg["BLOCK_N"] < 16:
            raise ValueError(f"fp8_gemv MMA needs BLOCK_N >= 16 weight rows a program, got {cfg['BLOCK_N']}")
        _fp8_gemv_mma_kernel[grid](*args, num_stages=cfg["STAGES"], **common)
    else:
        words = all(t.data_ptr() % 4 == 0 for t in (q, weight)) and k % 4 == 0 and weight.stride(0) % 4 == 0
        _fp8_gemv_kernel[grid](*args, GROUPS=cfg["GROUPS"], STAGES=cfg["STAGES"], H2=int(cfg.get("H2", 0) and words),
                               ASM=unpack_by_ptx(), **common)
    if split == 1:
        return out
    y = out.sum(0, keepdim=True)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def _tiles(m: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by M: small tiles keep decode's few rows
    from wasting a 128-row MMA and give enough CTAs to fill the GPU; prefill uses 128x128."""
    if m <= 16:
        return 16, (64 if n >= 16384 else 32), 4, 4
    if m <= 64:
        return 64, 64, 4, 4
    return 128, 128, 8, 3


def fp8_gemm(q: torch.Tensor, a_scale: Optional[torch.Tensor], weight: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """e4m3 q [M, K] (scales [M, Kb]) x e4m3 weight [N, K] (scales [N, Kb]) -> [M, N] out_dtype;
    a_scale None: q holds 16/32-bit rows, unquantized (W8A16)."""
    m, k = q.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    bm, bn, warps, stages = _tiles(m, n)
    grid = (cdiv(m, bm) * cdiv(n, bn),)
    a16 = a_scale is None
    _fp8_gemm_kernel[grid](q, weight, out, out if a16 else a_scale, w_scale, bias if bias is not None else out,
                           m, n, k, q.stride(0), weight.stride(0), out.stride(0),
                           0 if a16 else a_scale.stride(0), w_scale.stride(0), HAS_BIAS=bias is not None,
                           BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=FP8_GROUP, GROUP_M=8, A16=a16,
                           DOT_DTYPE=dot_dtype(q.dtype) if a16 else tl.bfloat16, PRECISION=dot_precision(q.dtype),
                           num_warps=warps, num_stages=stages)
    return out


def fp8_kernels_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        return CudaPlatform().supports_fp8(device)
    return interpreting()


@register("fp8_block_linear", "triton")
def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not fp8_kernels_usable(x.device):
        return fp8_block_linear_torch(x, weight, weight_scale, bias)
    check_fp8_operands(x, weight, weight_scale)
    lead = x.shape[:-1]
    x2 = as_rows(x)
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    one_row = gemv_settings(*weight.shape, x.device) if x2.shape[0] == 1 else None
    if one_row is not None and one_row["QUANT_IN"]:      # the row quantized inside the GEMV: one launch
        y = fp8_gemv(x2, None, weight, weight_scale, x.dtype, bias, one_row)
    elif one_row is not None:
        q, s = act_quant_fp8(x2)
        y = fp8_gemv(q, s, weight, weight_scale, x.dtype, bias, one_row)
    else:
        q, s = act_quant_fp8(x2)
        y = fp8_gemm(q, s, weight, weight_scale, x.dtype, bias)
    return y.reshape(*lead, weight.shape[0])


@register("fp8_weight_only_linear", "triton")
def fp8_weight_only_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W8A16 (a compressed-tensors FP8 checkpoint without input_activations): the block GEMM
    with the rows unquantized, the e4m3 weight read as stored, never expanded in memory."""
    if not fp8_kernels_usable(x.device):
        return fp8_weight_only_linear_torch(x, weight, weight_scale, bias)
    check_fp8_operands(x, weight, weight_scale)
    y = fp8_gemm(as_rows(x), None, weight.contiguous(), weight_scale.contiguous(), x.dtype, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@register("fp8_static_linear", "triton")
def fp8_static_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The block GEMM (or, for one row where the launch table says so, the GEMV) with the
    activations quantized by the checkpoint's one static scale (an elementwise torch op) instead
    of per 128-group: the kernels take any activation scales, here that one repeated for every
    row and group."""
    if not fp8_kernels_usable(x.device):
        return fp8_static_linear_torch(x, weight, weight_scale, input_scale, bias)
    check_fp8_operands(x, weight, weight_scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = as_rows(x)
    q = quant_fp8_static(x2, input_scale)
    a_scale = input_scale.to(torch.float32).reshape(1, 1).expand(x2.shape[0], cdiv(k, FP8_GROUP)).contiguous()
    weight, weight_scale = weight.contiguous(), weight_scale.contiguous()
    one_row = gemv_settings(*weight.shape, x.device) if x2.shape[0] == 1 else None
    if one_row is not None:
        y = fp8_gemv(q, a_scale, weight, weight_scale, x.dtype, bias, one_row)
    else:
        y = fp8_gemm(q, a_scale, weight, weight_scale, x.dtype, bias)
    return y.reshape(*lead, weight.shape[0])
