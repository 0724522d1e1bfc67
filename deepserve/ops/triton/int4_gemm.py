"""W4A16 linear (4-bit weights, 16-bit activations) as Triton kernels, weights dequantized in
registers: `qweight` int32 [N, K/8] (input features packed, nibble i of column c = feature
8c + i), scales [N, S], optional uint8 zeros [N, S] (else 8), optional g_idx [K] (layout:
ops/int4.py, whose torch op is the oracle these kernels are tested against).

Unpacking (`lane_minus`): nibble q of a word, masked in place and OR-ed into the
mantissa of 2^23, reads as fp32 exactly 2^23 + 16^(q % 4) u (one LOP3; lanes 4-7 come from the
word shifted down 16 bits once); no shift or int-to-float conversion per nibble.

Kernels:

1. `_int4_gemv_kernel` (one to `GEMV_ROWS` rows, decode): program (m, n) streams BLOCK_N
   weight rows over K (optionally the s-th of SPLIT_K K slices: then fp32 partial sums that
   one reduction adds) through `int4_rows_dot`: [SUB_C, BLOCK_N] tiles of words, the words
   along the threads (a warp reads 32 consecutive words of a row, whole lines) and the rows in
   each thread's registers; each lane is its own 2-D tensor and x's lane q (x[8c + q]) a vector
   in the same thread order, so the lane products are elementwise (no layout conversion in the
   loop; sm_90 SASS of the 16-row setting: about 4.8 instructions a nibble, no barriers or
   shared memory before the final reduction). Per word and row: the 8 lanes' (u - z) x, times
   the group's scale into an fp32 accumulator reduced once at the end; per nibble one LOP3 and
   two FFMAs (u - z exact, times x). No tensor cores: a matrix-vector product is bound by the
   packed weight read. Launch setting DEQ 3 (16-bit activations) unpacks and multiplies in
   packed fp16 arithmetic instead (ops/triton/int4_half2.py; with WORDS 2 or 4 words a thread,
   2.2-2.7 instructions a nibble at 4-16 rows).
2. `_int4_gemm_kernel` (prefill, larger batches): a tiled GEMM whose K step dequantizes a
   [BLOCK_N, BLOCK_K] weight tile in feature order (`dequant_tile`: (u - z) * s in fp32,
   rounded to the activations' dtype, exactly the torch reference's weight; the lanes joined
   in the loading threads' registers) and feeds it to one `tl.dot` with the contiguous
   activation tile.

Rounding: the GEMM rounds each dequantized weight to the activations' dtype as the reference
does; with groups of whole words the GEMV multiplies each word's fp32 sum by its scale instead
of rounding every weight (the fp8 small-batch MoE does the same), which moves bf16 results by
about one bf16 rounding; with g_idx or groups that split words it rounds every weight.
Launch settings: configs/int4/ (benchmarks/sweep_int4.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.int4 import PACK, check_int4_operands
from deepserve.ops.int4 import int4_linear as int4_linear_torch
from deepserve.ops.registry import register
from deepserve.ops.triton._common import (and_scalar, as_rows, cdiv, dot_dtype, interpreting, next_pow2, pdl_begin, pdl_launch,
                                          prefetch_rows, unpack_by_ptx)
from deepserve.ops.triton.int4_half2 import SCALE as SCALE16
from deepserve.ops.triton.int4_half2 import magic16_of, pair_sum16, pairs_fma16, x_pairs
from deepserve.ops.triton.int4_mma import int4_mma, mma_block_k, pair_order, unpack_pairs
from deepserve.ops.triton.launch_config import launch_settings

GEMV_ROWS = 4   # up to this many rows take the GEMV


@triton.jit
def _load_words(qw_rows, offs_c, n_ok, c_ok, EVEN: tl.constexpr):
    """Packed words [BN, C] of the rows at qw_rows [BN] (0 outside the masks)."""
    if EVEN:
        return tl.load(qw_rows[:, None] + offs_c[None, :], mask=n_ok[:, None], other=0)
    return tl.load(qw_rows[:, None] + offs_c[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0)


MAGIC = 0x4B000000        # the bits of 2^23 (fp32): OR-ed onto a nibble field, the float is 2^23 + field


@triton.jit
def lane_minus(src, magic, q: tl.constexpr, ZERO: tl.constexpr):
    """Lane q (feature 8c + q) of the words [C, R] as the exact fp32 u - ZERO; src is the word
    for q < 4, the word shifted down 16 bits for q >= 4. (field | 2^23 bits) reads 2^23 + 16^(q % 4) u,
    one LOP3 with `magic` in a register (a runtime argument, so it is not an immediate beside the
    mask); times 16^-(q % 4) minus (2^23 16^-(q % 4) + ZERO), both exact, is one FFMA."""
    p: tl.constexpr = 4 * (q % 4)
    field = ((src & (15 << p)) | magic).to(tl.float32, bitcast=True)
    return field * (1.0 / (1 << p)) - (8388608.0 / (1 << p) + ZERO)


@triton.jit
def _word_scales(s_rows, z_rows, offs_c, c_ok, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, EVEN: tl.constexpr):
    """The scales (and zero points, 8 without) [C, R] of the words offs_c of the rows at s_rows /
    z_rows, groups of whole words."""
    grp = (8 * offs_c) // GROUP
    if EVEN:
        s = tl.load(s_rows[None, :] + grp[:, None]).to(tl.float32)
    else:
        s = tl.load(s_rows[None, :] + grp[:, None], mask=c_ok[:, None], other=0.0).to(tl.float32)
    z = 8.0
    if HAS_ZP:
        z = tl.load(z_rows[None, :] + grp[:, None], mask=c_ok[:, None], other=8).to(tl.float32)
    return s, z


@triton.jit
def _pair_fields(src, magic):
    """DEQ 2: the two nibbles at bits 15-18 and 19-22 of `src` as fp32 2^23 + 2^15 u and
    2^23 + 2^19 u (one LOP3 each: the field OR-ed into the mantissa of 2^23, no conversion)."""
    lo = ((src & 0x78000) | magic).to(tl.float32, bitcast=True)
    hi = ((src & 0x780000) | magic).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _word_pair(qw_rows, offs_c, c_end, EVEN: tl.constexpr):
    """WORDS 2 / 4: the words offs_c and offs_c + 1 (offs_c even; rows of an even number of
    words, 8-byte aligned) of the rows at qw_rows [BN] as int64 [C, BN], one 8-byte load each."""
    pairs = (qw_rows[None, :] + offs_c[:, None]).to(tl.pointer_type(tl.int64))
    if EVEN:
        return tl.load(pairs)
    return tl.load(pairs, mask=(offs_c < c_end)[:, None], other=0)


@triton.jit
def _half2_dot(w, qw_rows, x_ptr, s_rows, z_rows, offs_c, c_end, magic16, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
               EVEN: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr):
    """DEQ 3: the sums (u - z) x s / 256 [C, BN] of the WORDS words offs_c .. offs_c + WORDS - 1
    of each thread (one group; int4_half2): w, the words [C, BN] (WORDS 1) or the first pair
    as int64 (WORDS 2, 4: `_word_pair`; the second pair loaded here)."""
    if WORDS == 4:
        w2 = _word_pair(qw_rows, offs_c + 2, c_end, EVEN)
    acc = tl.zeros(w.shape, tl.int32)                       # fp16 pairs (0.0, 0.0)
    xs = tl.zeros(offs_c.shape, tl.float32)
    for j in tl.static_range(WORDS):
        if WORDS == 1:
            wj = w
        elif j < 2:
            wj = (w >> (32 * j)).to(tl.int32)
        else:
            wj = (w2 >> (32 * (j - 2))).to(tl.int32)
        x04, x15, x26, x37, xsum = x_pairs(x_ptr, offs_c + j, offs_c + j < c_end, EVEN, ASM)
        xs += xsum
        acc = pairs_fma16(wj, x04[:, None], x15[:, None], x26[:, None], x37[:, None], acc, magic16, ASM)
    t = pair_sum16(acc, ASM)
    s, z = _word_scales(s_rows, z_rows, offs_c, offs_c < c_end, GROUP, HAS_ZP, EVEN)
    if HAS_ZP:
        t -= (z - 8.0) * (xs * (1.0 / SCALE16))[:, None]
    return t * s


@triton.jit
def _slice_words(qw_rows, c0, perm, c_end, BLOCK_N: tl.constexpr, TILED: tl.constexpr, EVEN: tl.constexpr):
    """The [SUB_C, BLOCK_N] words of the slice starting at word c0 (int4_rows_dot's order,
    `perm`); words at or past c_end read 0 unless EVEN (the caller knows there are none)."""
    offs_c = c0 + perm
    c_ok = offs_c < c_end
    if TILED:       # rows padded to whole blocks by tile_words: no row masks
        words = qw_rows + c0 * BLOCK_N + perm[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]     # [C, BN]
    else:
        words = qw_rows[None, :] + offs_c[:, None]                                                   # [C, BN]
    if EVEN:
        return tl.load(words)
    return tl.load(words, mask=c_ok[:, None], other=0)


@triton.jit
def int4_rows_dot(qw_rows, x_ptr, s_rows, z_rows, g_ptr, c_start, c_end, magic, GROUP: tl.constexpr,
                  HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                  SUB_C: tl.constexpr, STEPS: tl.constexpr, X_DTYPE: tl.constexpr, DEQ: tl.constexpr,
                  TILED: tl.constexpr = 0, AHEAD: tl.constexpr = 0, ASM: tl.constexpr = 0,
                  WORDS: tl.constexpr = 1):
    """fp32 [BLOCK_N]: the rows of a packed matrix at qw_rows [BLOCK_N] (scales / zeros at s_rows
    / z_rows) times the vector x over the packed columns [c_start, c_end) (features 8 c_start
    .. 8 c_end). Every row pointer must be in bounds (callers repeat the last row for rows past
    the end, and do not store those): the loads carry no row masks. Steps of STEPS slices of SUB_C words;
    EVEN: every slice lies inside [c_start, c_end); magic: MAGIC.

    A slice is a [SUB_C, BLOCK_N] tile of words, words along the threads (one word per thread
    and row, a warp reading 32 consecutive words of a row: whole 128-byte lines) and the
    BLOCK_N rows in each thread's registers. Each lane q of the words is its own 2-D tensor
    (shift and mask, no reshape or join), and x's lane q, x[8c + q], is loaded as a [SUB_C]
    vector in the same thread order, so every product is elementwise in registers; one load of
    x serves BLOCK_N rows. Word order: the words are visited as c ^ 1 (neighbour pairs swapped),
    which keeps the warp on the same lines but stops the compiler from widening the weight
    load to 4 words a thread, which would no longer match x's lanes.

    Scales and zeros (groups of whole words, no g_idx): each word's (u - z) x summed over its 8
    lanes, with symmetric weights z = 8 folded into the lanes' FFMA and zero points as
    z * (x summed over the word), not per lane; then times its group's scale, once per word and
    row, into an fp32 [SUB_C, BLOCK_N] accumulator reduced once at the end. With g_idx or groups
    that split words, every lane reads its own group's scale and zero and the dequantized weight
    is rounded to X_DTYPE as the reference's.

    DEQ (a launch setting) picks the unpacking of groups of whole words: 1, each lane as the
    exact u - z (`lane_minus`: LOP3 + FFMA) times x (FFMA), 3 instructions a nibble; 2, the lanes in
    pairs shifted to bits 15-18 / 19-22 (one SHF a pair) and read as 2^23 + 2^15 u / 2^23 +
    2^19 u (`_pair_fields`: one LOP3 each), multiplied by x and x / 16 (one FFMA each), the
    offsets 2^23 x + 2^19 x (and z x) taken out once a word from a per-column sum of x that
    every row shares: 2.5 a nibble plus that sum. The offsets are at most 2^8 times the
    nibbles' terms, so fp32 keeps the products to about 2^-16 relative; the sum is
    2^15 times the dot, undone once at the end; 3 (16-bit activations), packed fp16 arithmetic
    (`int4_half2`: a word's lanes q, q + 4 as one fp16 pair of (u - 8) / 256, times x's pair,
    summed in fp16 pairs: 1.7-1.9 instructions a nibble for the unpacking and products; by
    PTX with ASM, else the same operations replayed), x's lanes converted to fp16 pairs once a
    column for every row, zero points as (z - 8) times x summed over the words. DEQ 3 takes
    WORDS (1, 2 or 4) adjacent words a thread, one group (the host's `gemv_deq` checks; read
    as 8-byte pairs), summed in fp16 before fp32 and the scale; a slice is then WORDS SUB_C
    words. WORDS is the launch's (the GEMV's and the small-batch MoE's hosts size the slices for it).

    TILED (the weights repacked by `tile_words` for this BLOCK_N and SUB_C): qw_rows is the
    scalar start of the program's row block, whose slices of SUB_C words lie one after another,
    each word's BLOCK_N rows adjacent; a thread's words of a slice are then one contiguous run
    (16-byte loads at 4 rows) and the program reads one linear stretch. Visited in order (no
    swap: x's lanes follow the words' thread order either way).

    AHEAD (STEPS 1): each slice's words are loaded one slice ahead, so a slice's reads are in
    flight while the one before is unpacked and multiplied (the load past the last slice is
    masked off)."""
    LANE_WISE: tl.constexpr = HAS_GIDX or GROUP % 8 != 0    # a scale and zero point a lane, not a word
    SLICE: tl.constexpr = WORDS * SUB_C     # words a slice
    if WORDS > 1:
        tl.static_assert(DEQ == 3 and not (LANE_WISE or TILED or AHEAD), "WORDS > 1: DEQ 3, whole groups, plain layout")
        perm = WORDS * tl.arange(0, SUB_C)
    elif TILED:
        perm = tl.arange(0, SUB_C)
    else:
        perm = tl.arange(0, SUB_C) ^ 1
    acc = tl.zeros([SUB_C, BLOCK_N], tl.float32)
    if DEQ == 3:
        magic16 = magic16_of(magic)
    if AHEAD:
        tl.static_assert(STEPS == 1, "AHEAD loads one slice ahead: STEPS must be 1")
        w_next = _slice_words(qw_rows, c_start, perm, c_end, BLOCK_N, TILED, False)
    for c_step in range(c_start, c_end, SLICE * STEPS):
        for sub in tl.static_range(STEPS):
            offs_c = c_step + sub * SLICE + perm
            c_ok = offs_c < c_end
            if WORDS > 1:   # a thread's first two words as one int64
                w = _word_pair(qw_rows, offs_c, c_end, EVEN)
            elif AHEAD:       # this slice's words came with the last one; ask for the next slice's now
                w = w_next
                w_next = _slice_words(qw_rows, c_step + SUB_C, perm, c_end, BLOCK_N, TILED, False)
            else:
                w = _slice_words(qw_rows, c_step + sub * SUB_C, perm, c_end, BLOCK_N, TILED, EVEN)
            hi = w >> 16
            if LANE_WISE:
                for q in tl.static_range(8):
                    f = 8 * offs_c + q
                    x = tl.load(x_ptr + f, mask=c_ok, other=0.0).to(tl.float32)
                    if HAS_GIDX:
                        grp = tl.load(g_ptr + f, mask=c_ok, other=0)
                    else:
                        grp = f // GROUP
                    s = tl.load(s_rows[None, :] + grp[:, None], mask=c_ok[:, None], other=0.0).to(tl.float32)
                    if HAS_ZP:
                        z = tl.load(z_rows[None, :] + grp[:, None], mask=c_ok[:, None], other=8).to(tl.float32)
                    else:
                        z = 8.0
                    u = lane_minus(w if q < 4 else hi, magic, q, 0.0)
                    acc += ((u - z) * s).to(X_DTYPE).to(tl.float32) * x[:, None]
            elif DEQ == 3:
                acc += _half2_dot(w, qw_rows, x_ptr, s_rows, z_rows, offs_c, c_end, magic16, GROUP, HAS_ZP, EVEN,
                                  WORDS, ASM)
            elif DEQ == 2:
                t = tl.zeros([SUB_C, BLOCK_N], tl.float32)
                off = tl.zeros([SUB_C], tl.float32)        # the offsets' sum (and 2^15 z x when symmetric)
                xs = tl.zeros([SUB_C], tl.float32)
                for j in tl.static_range(4):
                    # lanes 2j, 2j + 1 (bits 8j .. 8j + 7) moved to bits 15-22
                    if j < 2:
                        src = w << (15 - 8 * j)
                    else:
                        src = w >> (8 * j - 15)
                    if EVEN:
                        x_lo = tl.load(x_ptr + 8 * offs_c + 2 * j).to(tl.float32)
                        x_hi = tl.load(x_ptr + 8 * offs_c + 2 * j + 1).to(tl.float32)
                    else:
                        x_lo = tl.load(x_ptr + 8 * offs_c + 2 * j, mask=c_ok, other=0.0).to(tl.float32)
                        x_hi = tl.load(x_ptr + 8 * offs_c + 2 * j + 1, mask=c_ok, other=0.0).to(tl.float32)
                    f_lo, f_hi = _pair_fields(src, magic)
                    x_hi16 = x_hi * 0.0625
                    t += f_lo * x_lo[:, None]           # one FFMA a nibble
                    t += f_hi * x_hi16[:, None]
                    if HAS_ZP:
                        off += (x_lo + x_hi16) * 8388608.0
                        xs += x_lo + x_hi
                    else:
                        off += x_lo * (8388608.0 + 8.0 * 32768.0) + x_hi * (524288.0 + 8.0 * 32768.0)
                t -= off[:, None]
                s, z = _word_scales(s_rows, z_rows, offs_c, c_ok, GROUP, HAS_ZP, EVEN)
                if HAS_ZP:
                    t -= (z * 32768.0) * xs[:, None]
                acc += t * s
            else:
                t = tl.zeros([SUB_C, BLOCK_N], tl.float32)
                xs = tl.zeros([SUB_C], tl.float32)
                for q in tl.static_range(8):
                    if EVEN:
                        x = tl.load(x_ptr + 8 * offs_c + q).to(tl.float32)
                    else:
                        x = tl.load(x_ptr + 8 * offs_c + q, mask=c_ok, other=0.0).to(tl.float32)
                    if HAS_ZP:
                        t += lane_minus(w if q < 4 else hi, magic, q, 0.0) * x[:, None]
                        xs += x
                    else:
                        t += lane_minus(w if q < 4 else hi, magic, q, 8.0) * x[:, None]
                s, z = _word_scales(s_rows, z_rows, offs_c, c_ok, GROUP, HAS_ZP, EVEN)
                if HAS_ZP:
                    t -= z * xs[:, None]
                acc += t * s
    if DEQ == 2 and not LANE_WISE:
        return tl.sum(acc, axis=0) * (1.0 / 32768.0)
    if DEQ == 3 and not LANE_WISE:
        return tl.sum(acc, axis=0) * SCALE16
    return tl.sum(acc, axis=0)


@triton.jit
def _int4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, o_ptr, count_ptr, N, KW, kw_per_split, magic,
                      stride_xm, stride_qn, stride_sn, stride_ys, stride_ym,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                      HAS_BIAS: tl.constexpr, EVEN: tl.constexpr,
                      BLOCK_N: tl.constexpr, SUB_C: tl.constexpr, STEPS: tl.constexpr, DEQ: tl.constexpr,
                      USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr, LINES: tl.constexpr,
                      TILED: tl.constexpr = 0, AHEAD: tl.constexpr = 0, ASM: tl.constexpr = 0,
                      WORDS: tl.constexpr = 1, MERGE: tl.constexpr = 0):
    """y[split, m, rows] = W[rows, K slice `split`] x[m] (+ bias); y is the output itself
    (x's dtype) without split-K, else the fp32 partial sums. TILED: qw_ptr holds the words as
    `tile_words` lays them out for this BLOCK_N and SUB_C (stride_qn: a row block's words).
    MERGE (split-K): the last of a row block's splits to finish (a counter a row and row block
    at count_ptr, zero before the launch) adds the partial sums in split order and the bias,
    and stores o[m, rows] (x's dtype, rows of N) itself: no reduction launch after the GEMV."""
    m, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    r = tl.minimum(rows, N - 1).to(tl.int64)          # rows past N read the last row's words, not stored
    c_start = split * kw_per_split
    c_end = tl.minimum(c_start + kw_per_split, KW)
    if TILED:
        qw_rows = qw_ptr + pid_n.to(tl.int64) * stride_qn
    else:
        qw_rows = qw_ptr + r * stride_qn
        prefetch_rows(qw_rows + c_start, c_end - c_start, LINE, LINES, PREFETCH)
    pdl_begin(USE_PDL)
    y = int4_rows_dot(qw_rows, x_ptr + m * stride_xm, s_ptr + r * stride_sn, z_ptr + r * stride_sn, g_ptr,
                      c_start, c_end, magic, GROUP, HAS_ZP,
                      HAS_GIDX, EVEN, BLOCK_N, SUB_C, STEPS, x_ptr.dtype.element_ty, DEQ, TILED, AHEAD, ASM,
                      WORDS)
    if HAS_BIAS and not MERGE:
        y += tl.load(b_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + split * stride_ys + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=n_ok)
    if MERGE:
        # every thread's store above comes before the barrier; the counter's release publishes
        # them at GPU scope, and the split that takes the count to the last acquires the others'
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + m * tl.num_programs(1) + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == tl.num_programs(2) - 1:
            total = tl.zeros([BLOCK_N], tl.float32)
            for s in range(0, tl.num_programs(2)):
                total += tl.load(y_ptr + s * stride_ys + m * stride_ym + rows, mask=n_ok, other=0.0)
            if HAS_BIAS:
                total += tl.load(b_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(o_ptr + m * N + rows, total.to(o_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _lane_weight(src, magic, q: tl.constexpr, s, zs, HAS_ZP: tl.constexpr, DTYPE: tl.constexpr):
    """Lane q of the words [BN, C] dequantized, (u - z) * s in fp32 rounded once to DTYPE (the
    reference's weight); s and zs = z * s broadcast against [BN, C]. Symmetric: (u - 8) from the
    lane's FFMA, times s; zero points: u * s - z * s in one FFMA, exact as (u - z) * s is (both
    products fit fp32's mantissa)."""
    if HAS_ZP:
        return (lane_minus(src, magic, q, 0.0) * s - zs).to(DTYPE)
    return (lane_minus(src, magic, q, 8.0) * s).to(DTYPE)


@triton.jit
def dequant_tile(qw_rows, s_rows, z_rows, g_ptr, n_ok, c0, c_end, magic, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                 HAS_GIDX: tl.constexpr, SCALES: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                 SUB_C: tl.constexpr, DTYPE: tl.constexpr, PAIRS: tl.constexpr = 0):
    """The weight tile of words c0 ... c0 + SUB_C (those below c_end) as [BLOCK_N, 8 SUB_C] in
    DTYPE, column j = feature 8 c0 + j, each (u - z) * s in fp32 rounded once (the reference's
    weight). Each lane is unpacked as its own [BLOCK_N, SUB_C] tensor in the layout the words
    were loaded in, and tl.join (which adds an axis held by one thread) interleaves the eight
    lanes, so the tile stays in the loading threads' registers and the activations are read as
    one contiguous [rows, 8 SUB_C] tile. Scales (SCALES): ROW, one per row (the slice inside one
    group); WORD, one per row and word; LANE, one per row and feature (g_idx, or groups that
    split words).

    PAIRS (symmetric bf16 weights, ROW scales; a launch setting): the tile in bf16 arithmetic,
    each word's lanes q and q + 4 as one bf16 pair (int4_mma.unpack_pairs: shift, LOP3,
    sub.bf16x2; 1 by PTX, 2 by joins), times the scale in bf16 (the same rounding once), no
    fp32 -> bf16 conversions; the columns come in pair order (position 2q + h = feature
    q + 4h of each word), so the caller reads its activations that way (`pair_order`)."""
    offs_c = c0 + tl.arange(0, SUB_C)
    c_ok = offs_c < c_end
    w = _load_words(qw_rows, offs_c, n_ok, c_ok, EVEN)
    if PAIRS:
        ok = and_scalar(n_ok, c0 < c_end)
        s = tl.load(s_rows + (8 * c0) // GROUP, mask=ok, other=0.0)
        # 0x43004300 (bf16 128, twice) derived from the runtime `magic` (0x4B000000), so that it
        # reaches the PTX in a register beside the mask's immediate
        pair_magic = ((magic >> 24) - 8) * 0x01000100
        t = unpack_pairs(w, pair_magic, BLOCK_N, 8 * SUB_C, PAIRS == 1)
        if PAIRS == 1:
            return t * s[:, None]
        return (t.to(tl.float32) * s.to(tl.float32)[:, None]).to(tl.bfloat16)
    hi = w >> 16
    if SCALES == 0:              # LANE
        return _join_lanes(
            _lane_weight_grouped(w, magic, 0, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(w, magic, 1, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(w, magic, 2, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(w, magic, 3, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(hi, magic, 4, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(hi, magic, 5, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(hi, magic, 6, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            _lane_weight_grouped(hi, magic, 7, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP, HAS_ZP, HAS_GIDX, DTYPE),
            BLOCK_N, SUB_C)
    if SCALES == 1:              # ROW
        g = (8 * c0) // GROUP
        ok = and_scalar(n_ok, c0 < c_end)                # (a slice wholly past the end reads no scale)
        s = tl.load(s_rows + g, mask=ok, other=0.0).to(tl.float32)[:, None]
        zs = tl.load(z_rows + g, mask=ok, other=8).to(tl.float32)[:, None] * s if HAS_ZP else 0.0
    else:                        # WORD
        g = (8 * offs_c) // GROUP
        mask = n_ok[:, None] & c_ok[None, :]
        s = tl.load(s_rows[:, None] + g[None, :], mask=mask, other=0.0).to(tl.float32)
        zs = tl.load(z_rows[:, None] + g[None, :], mask=mask, other=8).to(tl.float32) * s if HAS_ZP else 0.0
    return _join_lanes(_lane_weight(w, magic, 0, s, zs, HAS_ZP, DTYPE), _lane_weight(w, magic, 1, s, zs, HAS_ZP, DTYPE),
                       _lane_weight(w, magic, 2, s, zs, HAS_ZP, DTYPE), _lane_weight(w, magic, 3, s, zs, HAS_ZP, DTYPE),
                       _lane_weight(hi, magic, 4, s, zs, HAS_ZP, DTYPE), _lane_weight(hi, magic, 5, s, zs, HAS_ZP, DTYPE),
                       _lane_weight(hi, magic, 6, s, zs, HAS_ZP, DTYPE), _lane_weight(hi, magic, 7, s, zs, HAS_ZP, DTYPE),
                       BLOCK_N, SUB_C)


@triton.jit
def _join_lanes(l0, l1, l2, l3, l4, l5, l6, l7, BLOCK_N: tl.constexpr, SUB_C: tl.constexpr):
    """Lanes [BN, C] each -> [BN, 8 C], column 8c + q = lane q of word c. tl.join appends its axis
    last, which the reshape makes the fastest: the first joins pair lanes 4 apart (bit 2 of the
    lane), the last pairs even and odd lanes (bit 0)."""
    lanes = tl.join(tl.join(tl.join(l0, l4), tl.join(l2, l6)), tl.join(tl.join(l1, l5), tl.join(l3, l7)))
    return tl.reshape(lanes, [BLOCK_N, 8 * SUB_C])


@triton.jit
def _lane_weight_grouped(src, magic, q: tl.constexpr, offs_c, s_rows, z_rows, g_ptr, n_ok, c_ok, GROUP: tl.constexpr,
                         HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr, DTYPE: tl.constexpr):
    """`_lane_weight` with lane q's own group per word (feature 8c + q: g_idx, or // GROUP)."""
    f = 8 * offs_c + q
    g = tl.load(g_ptr + f, mask=c_ok, other=0) if HAS_GIDX else f // GROUP
    mask = n_ok[:, None] & c_ok[None, :]
    s = tl.load(s_rows[:, None] + g[None, :], mask=mask, other=0.0).to(tl.float32)
    zs = tl.load(z_rows[:, None] + g[None, :], mask=mask, other=8).to(tl.float32) * s if HAS_ZP else 0.0
    return _lane_weight(src, magic, q, s, zs, HAS_ZP, DTYPE)


@triton.jit
def _int4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, KW, magic,
                      stride_xm, stride_qn, stride_sn, stride_ym,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                      SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr):
    SUB_C: tl.constexpr = BLOCK_K // 8
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64) * stride_xm
    qw_rows = qw_ptr + offs_n.to(tl.int64) * stride_qn
    s_rows = s_ptr + offs_n.to(tl.int64) * stride_sn
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_sn
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for c0 in range(0, KW, SUB_C):
        w = dequant_tile(qw_rows, s_rows, z_rows, g_ptr, n_ok, c0, KW, magic, GROUP, HAS_ZP, HAS_GIDX, SCALES, EVEN,
                         BLOCK_N, SUB_C, dt, PAIRS)
        f = 8 * c0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows[:, None] + f[None, :], mask=m_ok[:, None] & (f < 8 * KW)[None, :], other=0.0)
        a = pair_order(a, BLOCK_M, SUB_C, PAIRS)
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


LANE, ROW, WORD = 0, 1, 2     # how a K slice reads its scales (the kernels' SCALES)


def slice_words(k: int, group_size: int, has_gidx: bool, words: int) -> tuple[int, int]:
    """(SUB_C, SCALES): the packed words of one K slice (`words`, a power of two, at most K's
    words rounded up to one), and how it reads scales: ROW where every slice lies inside one
    group, else WORD where groups are whole words, else (or with g_idx) LANE."""
    sub = min(words, next_pow2(k // PACK))
    if has_gidx:
        return sub, LANE
    if group_size % (PACK * sub) == 0:
        return sub, ROW
    return sub, WORD if group_size % PACK == 0 else LANE


def int4_settings(kernel: str, m: int, n: int, k: int, device: torch.device) -> dict:
    """Launch settings of `kernel` ("gemv", "gemm", or the MoE's "moe_gate_up", "moe_down",
    "moe_sorted") for an [m, k] x [n, k]^T product, from the launch table (configs/int4/;
    benchmarks/sweep_int4.py measures them)."""
    return launch_settings("int4", device, kernel=kernel, m=m, n=n, k=k)


def gemv_slice_words(cfg: dict, kw: int) -> int:
    """The words of a K slice the GEMV takes for this setting and K (of `kw` words)."""
    return max(2, min(cfg["SUB_C"], next_pow2(kw)))


def tile_words(qweight: torch.Tensor, block_n: int, sub_c: int) -> torch.Tensor:
    """The packed words [N, KW] relaid for the GEMV's TILED reads: row blocks of block_n, each
    its slices of sub_c words one after another, a word's block_n rows adjacent (flat index
    ((row block * slices + slice) * sub_c + word in slice) * block_n + row in block); rows and
    words past the matrix are 0. Returns [row blocks, slices * sub_c * block_n]."""
    n, kw = qweight.shape
    blocks, words = tiled_shape(n, kw, block_n, sub_c)
    slices = words // (sub_c * block_n)
    padded = qweight.new_zeros(blocks * block_n, slices * sub_c)
    padded[:n, :kw] = qweight
    tiled = padded.view(blocks, block_n, slices, sub_c).permute(0, 2, 3, 1)   # [blocks, slices, sub_c, block_n]
    return tiled.reshape(blocks, words).contiguous()


def tiled_shape(n: int, kw: int, block_n: int, sub_c: int) -> tuple[int, int]:
    """[row blocks, words a block] of `tile_words`' layout of [n, kw] words."""
    return -(-n // block_n), -(-kw // sub_c) * sub_c * block_n


def int4_gemv(x2: torch.Tensor, qweight, scales, zeros, g_idx, group_size: int,
              bias: Optional[torch.Tensor], tiled: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x2 [M <= GEMV_ROWS, K] -> [M, N] in x's dtype (split-K where the table says so).
    `tiled`: the same words as `tile_words` lays them out for the table's BLOCK_N and slice
    words here (the GEMV then reads each program's row block as one stretch)."""
    m, k = x2.shape
    n, kw = qweight.shape
    cfg = int4_settings("gemv", m, n, k, x2.device)
    sub = gemv_slice_words(cfg, kw)
    if tiled is not None:
        want = tiled_shape(n, kw, cfg["BLOCK_N"], sub)
        if tuple(tiled.shape) != want:
            raise ValueError(f"int4_gemv: tiled words of shape {tuple(tiled.shape)}; the setting (BLOCK_N "
                             f"{cfg['BLOCK_N']}, {sub} words a slice) needs {want}")
    elif cfg.get("MMA", 0):
        bk = mma_block_k(x2, zeros, g_idx, group_size)
        if bk is not None:
            return int4_mma(x2, qweight, scales, group_size, bias, bk, cfg, unpack_by_ptx())
    ahead = cfg.get("AHEAD", 0) and min(cfg["STEPS"], cdiv(kw, sub)) == 1
    deq, words_a_thread = gemv_deq(cfg, x2.dtype, group_size, g_idx is not None, qweight, tiled is not None or ahead)
    per = sub * words_a_thread                 # words a slice
    steps = max(1, min(cfg["STEPS"], cdiv(kw, per)))
    split = max(1, min(cfg["SPLIT_K"], cdiv(kw, per * steps)))
    kw_per_split = cdiv(cdiv(kw, split), per * steps) * per * steps      # whole steps per split
    split = cdiv(kw, kw_per_split)
    merge = split > 1 and bool(cfg.get("MERGE", 0))
    if split > 1:
        y = torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    else:
        y = torch.empty(1, m, n, dtype=x2.dtype, device=x2.device)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device) if merge else y
    counts = torch.zeros(m * cdiv(n, cfg["BLOCK_N"]), dtype=torch.int32, device=x2.device) if merge else y
    launch = pdl_launch(x2.device, qweight)
    launch["LINES"] = min(next_pow2(cdiv(kw_per_split, launch["LINE"])), 64)
    words = qweight if tiled is None else tiled
    _int4_gemv_kernel[(m, cdiv(n, cfg["BLOCK_N"]), split)](
        x2, words, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, y, out, counts, n, kw, kw_per_split, MAGIC, x2.stride(0),
        words.stride(0), scales.stride(0), y.stride(0), y.stride(1), GROUP=group_size, HAS_ZP=zeros is not None,
        HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None and (split == 1 or merge), MERGE=int(merge),
        EVEN=kw % (per * steps) == 0 and kw_per_split % (per * steps) == 0, BLOCK_N=cfg["BLOCK_N"], SUB_C=sub,
        STEPS=steps, DEQ=deq, ASM=unpack_by_ptx(), WORDS=words_a_thread, num_warps=cfg["num_warps"], num_stages=1,
        TILED=int(tiled is not None), AHEAD=int(ahead), **launch)
    if split == 1:
        return y[0]
    if merge:
        return out
    y = y.sum(0)
    if bias is not None:
        y = y + bias.float()
    return y.to(x2.dtype)


def gemv_deq(cfg: dict, dtype: torch.dtype, group_size: int, has_gidx: bool, qweight: torch.Tensor,
             other_layout: bool) -> tuple[int, int]:
    """The GEMV's (DEQ, WORDS) for a launch: the table's, except that fp32 activations take DEQ
    1 for 3 (their fp16 pairs would round them), and that WORDS (DEQ 3's words a thread, read
    as 8-byte pairs) is 1 where a thread's words could straddle groups or a pair be misaligned
    (odd words a row), with g_idx, the tiled layout or AHEAD (other_layout), and for other DEQs."""
    deq, words = cfg["DEQ"], cfg.get("WORDS", 1)
    if words not in (1, 2, 4):
        raise ValueError(f"int4 GEMV launch setting WORDS must be 1, 2 or 4, got {words}")
    if deq == 3 and dtype == torch.float32:
        deq = 1
    if deq != 3 or group_size % (PACK * words) or has_gidx or other_layout or qweight.shape[1] % 2 \
            or qweight.data_ptr() % 8:
        words = 1
    return deq, words


def int4_gemm(x2: torch.Tensor, qweight, scales, zeros, g_idx, group_size: int,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    m, k = x2.shape
    n, kw = qweight.shape
    cfg = int4_settings("gemm", m, n, k, x2.device)
    sub, mode = slice_words(k, group_size, g_idx is not None, cfg["BLOCK_K"] // PACK)
    if sub < 4:                           # a step feeds tl.dot at least 32 columns
        sub, mode = slice_words(max(k, 32), group_size, g_idx is not None, 4)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]))
    _int4_gemm_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
        bias if bias is not None else y, y, m, n, kw, MAGIC, x2.stride(0), qweight.stride(0), scales.stride(0),
        y.stride(0), GROUP=group_size, HAS_ZP=zeros is not None, HAS_GIDX=g_idx is not None,
        SCALES=mode, HAS_BIAS=bias is not None, EVEN=kw % sub == 0, DOT_DTYPE=dot_dtype(x2.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=PACK * sub, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], PAIRS=pairs_mode(cfg, x2.dtype, zeros is not None, mode))
    return y


def pairs_mode(cfg: dict, dtype: torch.dtype, has_zp: bool, scales_mode: int) -> int:
    """dequant_tile's PAIRS for a launch: 0 unless the table asks (setting PAIRS) and the
    product allows (bf16 activations, symmetric weights, a scale a row a slice); then 1 where
    the PTX unpack runs, 2 by joins."""
    if not cfg.get("PAIRS", 0) or dtype != torch.bfloat16 or has_zp or scales_mode != ROW:
        return 0
    return 1 if unpack_by_ptx() else 2


@register("int4_linear", "triton")
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                g_idx: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernels on a Triton device (GEMV up to GEMV_ROWS rows, GEMM beyond), else the torch op."""
    if not (x.is_cuda or interpreting()) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return int4_linear_torch(x, qweight, scales, zeros, g_idx, group_size, bias)
    check_int4_operands(x, qweight, scales, zeros, g_idx, group_size)
    lead, n = x.shape[:-1], qweight.shape[0]
    x2 = as_rows(x)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n)
    args = (x2, qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(),
            None if g_idx is None else g_idx.contiguous(), group_size, bias)
    y = int4_gemv(*args) if x2.shape[0] <= GEMV_ROWS else int4_gemm(*args)
    return y.reshape(*lead, n)


__all__ = ["int4_linear", "int4_gemv", "int4_gemm", "PACK"]
