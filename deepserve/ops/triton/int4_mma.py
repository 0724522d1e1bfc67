"""W4A16 products of a few rows on tensor cores (the GEMV's launch setting MMA 1): y^T = W x^T
with the dequantized weight tile as the MMA's first operand; oracle: ops.int4.int4_linear.

The CUDA-core GEMV (int4_gemm._int4_gemv_kernel) multiplies every nibble on the FP32 pipe,
about 4.8 sm_90 instructions a nibble, which at batch 1 nearly fills the issue slots that the
weight read leaves. Here a nibble costs about 1.5: a word's lanes q and q + 4 sit 16 bits apart,
so one shift and one LOP3 place them in the low bits of a bf16 pair whose exponent says 128
(0x4300: 128 + u exactly), one `sub.bf16x2` leaves u - 8 exactly (`_PAIR_ASM`), and one bf16
multiply by the group's scale gives the reference's weight (u - 8) * s rounded once; the
products and their sums are the warp-group MMA's (rows padded to 16, fp32 accumulators).
A word's lanes come out in pair order (position 2q + h holds feature 8c + q + 4h), and the
activations are read in that order. Symmetric bf16 weights in groups of whole K steps only;
everything else stays on the CUDA-core GEMV. The interpreter and ROCm take a join-based unpack
with the same values (`_common.unpack_by_ptx`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.triton import _common
from deepserve.ops.triton._common import advance_cols, cdiv, dot_dtype, load_rows, repeat_words, row_tile

# q = 0: no shift; q = 1, 2, 3: the pair moved down 4q bits; 0x4300 is bf16 128, 0x4308 bf16 136
# ($5: 0x43004300 from a runtime argument, so that the mask and the OR are one LOP3 with the
# mask as its one immediate)
_PAIR_ASM = tl.constexpr("""{
.reg .b32 t, c;
shr.u32 t, $1, $3;
lop3.b32 t, t, 0x000F000F, $5, 0xEA;
mov.b32 c, 0x43084308;
sub.rn.bf16x2 $0, t, c;
}""")

_PAIR_CONSTRAINTS = tl.constexpr("=r," + ",".join(["r"] * 6))
BF16_128_PAIR = 0x43004300

ROWS = 16        # the MMA's N side: rows of x, padded


@triton.jit
def _nibble(p, i: tl.constexpr):
    return ((p >> (4 * i)) & 0xF) - 8


@triton.jit
def unpack_pairs(p, magic, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """Packed words [BN, BK / 8] -> bf16 [BN, BK] of u - 8, each word's lanes in pair order
    (position 2q + h = nibble q + 4h). By PTX (`_PAIR_ASM`, two lanes a register) or by joins,
    whose first axis is the slowest: bit 1 of q, bit 0 of q, then h."""
    if ASM:
        words = repeat_words(p, BLOCK_N, BLOCK_K)
        shift = 4 * ((tl.arange(0, BLOCK_K) % 8) // 2)[None, :] + tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        mag = magic + tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        return tl.inline_asm_elementwise(_PAIR_ASM, _PAIR_CONSTRAINTS, [words, shift, mag], dtype=tl.bfloat16,
                                         is_pure=True, pack=2)
    lo = tl.join(tl.join(_nibble(p, 0), _nibble(p, 2)), tl.join(_nibble(p, 1), _nibble(p, 3)))
    hi = tl.join(tl.join(_nibble(p, 4), _nibble(p, 6)), tl.join(_nibble(p, 5), _nibble(p, 7)))
    return tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K]).to(tl.float32).to(tl.bfloat16)


@triton.jit
def pair_order(a, ROWS: tl.constexpr, SUB_C: tl.constexpr, PAIRS: tl.constexpr):
    """Activations [ROWS, 8 SUB_C] in feature order -> the columns of `unpack_pairs`' tile: pair
    order with PAIRS (feature q + 4h of each 8 at position 2q + h), else as they are."""
    if PAIRS:
        return tl.reshape(tl.permute(tl.reshape(a, [ROWS, SUB_C, 2, 4]), (0, 1, 3, 2)), [ROWS, 8 * SUB_C])
    return a


@triton.jit
def _int4_mma_kernel(x_ptr, qw_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym, magic,
                     GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, DOT_DTYPE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_PTR: tl.constexpr):
    """acc [BN, BM] += ((u - 8) * s)[BN, BK] @ x^T [BK, BM] over K; K is a multiple of BLOCK_K and
    every step lies inside one group. The packed words are read through a block pointer with
    BLOCK_PTR (`_common.BLOCK_PTRS`)."""
    C: tl.constexpr = BLOCK_K // 8
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = offs_n < N, offs_m < M
    p_blk = row_tile(qw_ptr, N, K // 8, stride_qn, tl.program_id(0) * BLOCK_N, BLOCK_N, C, BLOCK_PTR)
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p = load_rows(p_blk, n_ok, BLOCK_PTR)                                                       # [BN, C]
        p_blk = advance_cols(p_blk, C, BLOCK_PTR)
        s = tl.load(s_rows + k0 // GROUP, mask=n_ok, other=0.0)
        w = unpack_pairs(p, magic, BLOCK_N, BLOCK_K, ASM)                                          # bf16 [BN, BK]
        if ASM:     # one bf16x2 multiply a pair
            w = w * s[:, None]
        else:       # the same rounding, through fp32 (the interpreter multiplies bf16 wrongly)
            w = (w.to(tl.float32) * s.to(tl.float32)[:, None]).to(tl.bfloat16)
        x = tl.load(x_rows + k0, mask=m_ok[:, None], other=0.0)                                    # [BM, BK]
        x = pair_order(x, BLOCK_M, C, True)
        acc = tl.dot(w.to(DOT_DTYPE), tl.trans(x.to(DOT_DTYPE)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


def mma_block_k(x2: torch.Tensor, zeros: Optional[torch.Tensor], g_idx: Optional[torch.Tensor],
                group_size: int) -> Optional[int]:
    """The K step of the MMA path for this product (64 or 128, inside one group), or None where
    it does not apply: more than ROWS rows, activations other than bf16, zero points, g_idx."""
    m, k = x2.shape
    if m > ROWS or x2.dtype != torch.bfloat16 or zeros is not None or g_idx is not None:
        return None
    for bk in (128, 64):
        if group_size % bk == 0 and k % bk == 0:
            return bk
    return None


def int4_mma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: Optional[torch.Tensor], block_k: int, cfg: dict, asm: bool) -> torch.Tensor:
    """x2 [M <= ROWS, K] bf16 -> [M, N] (mma_block_k(...) gave block_k)."""
    m, k = x2.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    bn = cfg.get("MMA_BLOCK_N", 64)
    _int4_mma_kernel[(cdiv(n, bn),)](
        x2, qweight, scales, bias if bias is not None else y, y, m, n, k, x2.stride(0), qweight.stride(0),
        scales.stride(0), y.stride(0), BF16_128_PAIR, GROUP=group_size, HAS_BIAS=bias is not None, ASM=asm, DOT_DTYPE=dot_dtype(x2.dtype),
        BLOCK_N=bn, BLOCK_K=block_k, BLOCK_M=ROWS, BLOCK_PTR=_common.BLOCK_PTRS, num_warps=cfg.get("MMA_WARPS", 4),
        num_stages=cfg.get("MMA_STAGES", 3))
    return y
