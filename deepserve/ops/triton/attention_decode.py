"""Split-KV paged decode attention (flash-decoding) for GQA/MQA and MLA's absorbed decode.

Each decode row's context is cut into `num_splits` ranges along the sequence; one program
attends the query heads of one KV head group (up to BLOCK_H of them packed as the rows of a
tensor-core tile) over one range, keeping an online softmax, and writes its partial output
with its log-sum-exp. A second kernel merges the splits. Splitting keeps every SM busy when
the batch is small and the context long (Dao et al., "Flash-Decoding for long-context
inference", 2023; the same two-stage layout as vLLM's/SGLang's Triton decode kernels).

Head dims that are not a power of two (MLA: 576 = 512 latent + 64 rope) are handled as a
main block plus a tail block. When `v_cache` is a view of the first dims of `k_cache` (MLA),
the value tile is the key tile already loaded: the latent is read from memory once. That tile
is loaded token-major ([N, D]) and fed to the QK dot transposed: loaded as [D, N] and
transposed in registers for the PV dot (the earlier form), it was a use the software
pipeliner cannot stage in shared memory, so every [64, 512] tile was a blocking load into
~128 registers per thread; as [N, D] it is copied asynchronously a stage ahead (checked in
the sm_90 TTGIR: `async_copy_global_to_local`) and both dots read it from shared memory.

For MLA's many query heads (R1: 128 per latent head) BLOCK_H may be 32 or 64: at 64 the
dots become Hopper warp-group MMAs (M = 64) and the latent is read by 2 head groups instead
of 8. With 8 warps Triton lays the PV dot's [64, 512] fp32 accumulator over two warp groups
of 256 output columns each (128 registers a thread), while the QK dot chained into it is
computed by both groups alike: the work a split of the output dims over two programs would
cost, without the second read of the latent such a split needs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from deepserve.ops.triton._common import and_scalar, pdl_begin, round_to_e4m3, scalar_mask

LOG2E = 1.4426950408889634


# a step's per-sequence arrays (query starts, sequence lengths, block tables), read by scalar
# loads: kernels take no alignment class of them, since a view's offset follows the step's
# decode rows
SEQ_ARRAYS = ["qsl_ptr", "seq_lens_ptr", "bt_ptr"]


@triton.jit
def _pow2_to_range(amax, TOP_EXP: tl.constexpr):
    """2^k per row with amax * 2^k in [2^TOP_EXP, 2^(TOP_EXP+1)) (1 for an all-zero row), built
    from the exponent bits so that it is exact; k is clamped to fp32's normal exponents."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k_bits = tl.minimum(tl.maximum(127 + TOP_EXP + 127 - e, 1), 254)
    return tl.where(amax > 0, (k_bits << 23).to(tl.float32, bitcast=True), 1.0)


@triton.jit
def _dv_order(r, JL: tl.constexpr, WG: tl.constexpr):
    """The latent dim that row r of the permuted V^T holds (_mla_decode_fp8_kernel's DV_RUN =
    2 * JL, over WG warp groups). Hopper's 16-bit A fragment gives 64-row MMA tile j to warp
    group g = j % WG, and in it the thread of warp w and lane 4 * i + c rows 16w + i + 8h
    (h = 0, 1). With r = ((j * 4 + w) * 2 + h) * 8 + i, j = (jj * JL + jl) * WG + g, row r
    takes dim ((((jj * WG + g) * 4 + w) * 8 + i) * JL + jl) * 2 + h: the thread's rows of JL
    of its warp group's tiles are 2 * JL consecutive dims."""
    i = r % 8
    h = (r // 8) % 2
    w = (r // 16) % 4
    j = r // 64
    g = j % WG
    jq = j // WG
    return (((((jq // JL) * WG + g) * 4 + w) * 8 + i) * JL + jq % JL) * 2 + h


@triton.jit
def _split_bounds(qsl_ptr, seq_lens_ptr, b, split, num_splits, BLOCK_N: tl.constexpr):
    """(row b's first query row, this split's first key, its end): the context cut into
    num_splits whole tiles of BLOCK_N keys."""
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    has_row = tl.load(qsl_ptr + b + 1) > q_start
    seq_len = tl.where(has_row, tl.load(seq_lens_ptr + b), 0)
    # the host sizes num_splits from max_seq_len (under CUDA graphs: the captured maximum);
    # splits past a shorter row's end stay empty and store nothing. (A floor of 256 tokens
    # per split here, to use fewer splits on short rows, cost parallelism at batch 1: the 8B
    # decode kernel went from 161 to 374 us per step on an H100.)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    return q_start, start, tl.minimum(start + split_len, seq_len)


@triton.jit
def _store_split_lse(mid_lse_ptr, m_i, l_i, nonempty, b, heads, h_mask, n_heads, split, num_splits):
    """Store one split's log-sum-exp per head (-inf for an empty split); return the heads' rows
    of the mid buffers ([B, H, num_splits, (DV)]) and the softmax sums to divide by."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
    mid_row = (b.to(tl.int64) * n_heads + heads) * num_splits + split
    tl.store(mid_lse_ptr + mid_row, lse, mask=h_mask)
    return mid_row, l_safe


# num_splits varies with the batch size and bt_stride (the block tables' width) with the longest
# context of the step; specialising on them (== 1, divisible by 16) would only compile more
# variants of the same code while serving (each is a scalar in an address or a loop bound);
# nor on the alignment of the per-sequence arrays, read by scalar loads, whose views start
# where the step's decode rows end
@triton.jit(do_not_specialize=["num_splits", "bt_stride"], do_not_specialize_on_alignment=SEQ_ARRAYS)
def _decode_split_kernel(
        q_ptr, kc_ptr, vc_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, mid_o_ptr, mid_lse_ptr,
        q_st, q_sh, q_sd, kc_b, kc_o, kc_h, kc_d, vc_b, vc_o, vc_h, vc_d, bt_stride,
        qk_scale, v_scale, n_heads, group, n_head_groups, block_size, d_pe, dv, num_splits,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr,
        BLOCK_DV: tl.constexpr, SHARED_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PAGE_TILE: tl.constexpr, HEAD_D: tl.constexpr,
        USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1) // n_head_groups
    hg = tl.program_id(1) % n_head_groups
    split = tl.program_id(2)

    q_start, start, end = _split_bounds(qsl_ptr, seq_lens_ptr, b, split, num_splits, BLOCK_N)

    h_in_group = hg * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h_in_group < group
    heads = kvh * group + h_in_group
    offs_d = tl.arange(0, BLOCK_D)
    # HEAD_D < BLOCK_D only for heads narrower than the smallest dot tile (tiny models)
    q = tl.load(q_ptr + q_start * q_st + heads[:, None] * q_sh + offs_d[None, :] * q_sd,
                mask=h_mask[:, None] & (offs_d < HEAD_D)[None, :], other=0.0).to(DOT_DTYPE)  # [H, D]
    if BLOCK_DPE > 0:
        offs_pe = BLOCK_D + tl.arange(0, BLOCK_DPE)
        pe_mask = offs_pe < BLOCK_D + d_pe
        q_pe = tl.load(q_ptr + q_start * q_st + heads[:, None] * q_sh + offs_pe[None, :] * q_sd,
                       mask=h_mask[:, None] & pe_mask[None, :], other=0.0).to(DOT_DTYPE)  # [H, DPE]
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < dv

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * bt_stride
    if PAGE_TILE:
        # BLOCK_N divides the page size and tiles start at multiples of BLOCK_N, so a tile is
        # BLOCK_N consecutive rows of one page: one page id per tile, loaded a tile ahead. The
        # tile's addresses are then one scalar base plus fixed offsets, not a page-table lookup
        # per key feeding a per-element address (MLA at batch 64, 4k context, H100: 165.6 ->
        # 128.3 us; per-key ids loaded a tile ahead did not help: GQA went from 97% to 79%).
        page_next = tl.load(bt_row + start // block_size, mask=start < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        if PAGE_TILE:
            blk = page_next.to(tl.int64)
            page_next = tl.load(bt_row + (n0 + BLOCK_N) // block_size, mask=n0 + BLOCK_N < end, other=0)
            slot = n0 % block_size + tl.arange(0, BLOCK_N)
        else:
            blk = tl.load(bt_row + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
            slot = offs_n % block_size
        row_off = blk * kc_b + slot * kc_o + kvh * kc_h                                # [N]
        if SHARED_KV:
            # token-major [N, D]: both dots read this one tile (trans for QK, as is for PV),
            # so the compiler can stage it in shared memory with async copies
            kv = tl.load(kc_ptr + row_off[:, None] + offs_d[None, :] * kc_d,
                         mask=n_mask[:, None], other=0.0)                            # [N, D]
            qk = tl.dot(q, tl.trans(kv.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        else:
            k = tl.load(kc_ptr + row_off[None, :] + offs_d[:, None] * kc_d,
                        mask=n_mask[None, :] & (offs_d < HEAD_D)[:, None], other=0.0)  # [D, N]
            qk = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        if BLOCK_DPE > 0:
            # token-major as well: the rope tail of the same rows, staged like the latent
            k_pe = tl.load(kc_ptr + row_off[:, None] + offs_pe[None, :] * kc_d,
                           mask=n_mask[:, None] & pe_mask[None, :], other=0.0)       # [N, DPE]
            qk += tl.dot(q_pe, tl.trans(k_pe.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))               # log2 units
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SHARED_KV:
            v = kv                                                                   # [N, DV]
        else:
            v_off = blk * vc_b + slot * vc_o + kvh * vc_h
            v = tl.load(vc_ptr + v_off[:, None] + offs_dv[None, :] * vc_d,
                        mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    nonempty = end > start
    mid_row, l_safe = _store_split_lse(mid_lse_ptr, m_i, l_i, nonempty, b, heads, h_mask, n_heads, split, num_splits)
    tl.store(mid_o_ptr + mid_row[:, None] * BLOCK_DV + offs_dv[None, :],
             (acc * (v_scale / l_safe)[:, None]).to(mid_o_ptr.dtype.element_ty),
             mask=and_scalar(h_mask[:, None], nonempty))


@triton.jit
def _merge_program(qsl_ptr, n_heads, num_splits):
    """A merge program's head, its row's first query row, whether the row has one, and the
    row's first entry in the mid buffers ([B, H, num_splits, ...])."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    has_row = tl.load(qsl_ptr + b + 1) > q_start
    return h, q_start, has_row, (b.to(tl.int64) * n_heads + h) * num_splits


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(mid_o_ptr, mid_lse_ptr, qsl_ptr, out_ptr, o_st, o_sh, n_heads, dv, num_splits,
                          BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr):
    """Merge the splits of one (row, head): weights 2^(lse_s - max lse), renormalised."""
    pdl_begin(USE_PDL)
    h, q_start, has_row, base = _merge_program(qsl_ptr, n_heads, num_splits)
    offs_s = tl.arange(0, BLOCK_S)
    lse = tl.load(mid_lse_ptr + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)        # every split empty: output zeros, not NaN
    total = tl.sum(tl.exp2(lse - m), axis=0)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(0, num_splits):
        lse_s = tl.load(mid_lse_ptr + base + s)
        # an empty split stored no output: do not read it
        part = tl.load(mid_o_ptr + (base + s) * BLOCK_DV + offs_dv, mask=scalar_mask(lse_s > float("-inf"), offs_dv),
                       other=0.0).to(tl.float32)
        acc += tl.exp2(lse_s - m) * part
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + q_start * o_st + h * o_sh + offs_dv, out.to(out_ptr.dtype.element_ty),
             mask=and_scalar(offs_dv < dv, has_row))


@triton.jit
def _merge_weights(m, lse_max, lse):
    """One online step of a split merge in log2 units: the new running maximum (m and lse_max
    its old value and the step's largest lse), the factor that rescales what was summed so
    far, and each split's weight 2^(lse - max) (0 for an empty split, lse -inf). While every
    split so far is empty the reference point is 0, not -inf (no NaN)."""
    m_new = tl.maximum(m, lse_max)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m - m_ref), tl.exp2(lse - m_ref)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(mid_o_ptr, mid_lse_ptr, qsl_ptr, out_ptr, o_st, o_sh, n_heads, dv, num_splits,
                         CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr):
    """Merge the splits of one (row, head) as _decode_reduce_kernel does, CHUNK_S splits at a
    time: a chunk's outputs ([CHUNK_S, DV]) are loaded in one go beside their log-sum-exps and
    weighted with an online maximum, so a merge of up to CHUNK_S splits is one memory round
    trip, where a loop over splits that loads each output after its lse waits for two per
    split (MLA at batch 64: 8-9 splits, ~18 round trips a program)."""
    pdl_begin(USE_PDL)
    h, q_start, has_row, base = _merge_program(qsl_ptr, n_heads, num_splits)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < dv
    m = float("-inf")
    total = 0.0
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        offs_s = s0 + tl.arange(0, CHUNK_S)
        s_mask = offs_s < num_splits
        lse = tl.load(mid_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
        part = tl.load(mid_o_ptr + (base + offs_s)[:, None] * BLOCK_DV + offs_dv[None, :],
                       mask=s_mask[:, None] & dv_mask[None, :], other=0.0).to(tl.float32)   # [S, DV]
        m, alpha, w = _merge_weights(m, tl.max(lse, axis=0), lse)
        # an empty split stored no output: its rows are whatever the buffer held, not zero
        acc = acc * alpha + tl.sum(tl.where(lse[:, None] > float("-inf"), w[:, None] * part, 0.0), axis=0)
        total = total * alpha + tl.sum(w, axis=0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + q_start * o_st + h * o_sh + offs_dv, out.to(out_ptr.dtype.element_ty), mask=and_scalar(dv_mask, has_row))


@triton.jit
def _merge_heads(mid_o_ptr, mid_lse_ptr, out_ptr, qsl_ptr, o_st, o_sh, b, heads, h_mask, n_heads, dv, num_splits,
                 BLOCK_D: tl.constexpr):
    """Row b's splits merged for `heads` ([H]) as _merge_splits_kernel does, one split at a time
    with an online maximum, read past the L1 cache (other programs wrote them during this
    kernel); written to the row's output."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < dv
    rows = (b.to(tl.int64) * n_heads + heads) * num_splits                           # [H]
    m = tl.full(heads.shape, float("-inf"), tl.float32)
    total = tl.zeros(heads.shape, tl.float32)
    acc = tl.zeros([heads.shape[0], BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        lse = tl.load(mid_lse_ptr + rows + split, mask=h_mask, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(mid_o_ptr + (rows + split)[:, None] * BLOCK_D + offs_d[None, :],
                       mask=h_mask[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
        m, alpha, w = _merge_weights(m, lse, lse)
        # an empty split stored no output: its rows are whatever the buffer held, not zero
        acc = acc * alpha[:, None] + tl.where(lse[:, None] > float("-inf"), w[:, None] * part, 0.0)
        total = total * alpha + w
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    has_row = tl.load(qsl_ptr + b + 1) > q_start
    tl.store(out_ptr + q_start * o_st + heads[:, None] * o_sh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=and_scalar(h_mask[:, None] & d_ok[None, :], has_row))


@triton.jit(do_not_specialize=["num_splits", "bt_stride"], do_not_specialize_on_alignment=SEQ_ARRAYS)
def _mla_decode_fp8_kernel(
        q_ptr, kc_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, mid_o_ptr, mid_lse_ptr, out_ptr, count_ptr,
        q_st, q_sh, q_sd, kc_b, kc_o, kc_d, bt_stride, o_st, o_sh, qk_scale, v_scale, n_heads, block_size, d_pe, dv,
        num_splits, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr,
        QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, DV_RUN: tl.constexpr,
        DV_WG: tl.constexpr, FUSED_MERGE: tl.constexpr, USE_PDL: tl.constexpr, QK_PROMOTE: tl.constexpr = 0):
    """One split of MLA's absorbed decode over an e4m3 latent pool, with the tokens as the M
    side of both products: S^T = K q^T ([N, D] x [D, H]) and O^T += V^T P^T ([DV, N] x [N, H]).
    The latent tile is the A operand of the first, K-major as stored, so e4m3 x e4m3 warp-group
    MMAs read it from shared memory as copied (no conversion), with BLOCK_N >= 64 rows even
    for 16 heads (R1 under TP8), where the head-major form has M = 16 and falls back to
    16-bit MMAs fed through registers. The page size is a multiple of BLOCK_N.

    The second product's A operand, V^T, comes from the token-major tile in registers: each
    thread holds pairs of tokens (K) for a few latent dims (M), one byte each, a token row
    (576 bytes) apart. With the dims in their stored order a thread's rows are 8 bytes apart
    in a row and sm_90 reads them one byte at a time (256 LDS.U8 a thread a 64-key tile at 16
    heads and 4 warps, a third of the loop's instructions). DV_RUN = 2, 4 or 16 (BLOCK_D a
    multiple of 32 * DV_RUN * DV_WG) feeds the product the dims in the order _dv_order gives
    for DV_WG warp groups (num_warps / 4), so that a thread reads DV_RUN adjacent bytes at once, and stores each output row at its dim: the
    sum over tokens is the same, only which row computes which dim changes. 1: stored order.
    QK_PROMOTE (0, or dims: 64, 128, 256): the e4m3 QK^T product's partial sums moved from the
    MMA's accumulator into fp32 every QK_PROMOTE latent dims (Triton's max_num_imprecise_acc;
    0 keeps Triton's sm_90 default, the whole product in the MMA's accumulator)."""
    pdl_begin(USE_PDL)
    b = tl.program_id(0)
    split = tl.program_id(2)
    q_start, start, end = _split_bounds(qsl_ptr, seq_lens_ptr, b, split, num_splits, BLOCK_N)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                        # of the one latent head
    h_mask = heads < n_heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_pe = BLOCK_D + tl.arange(0, BLOCK_DPE)
    pe_mask = offs_pe < BLOCK_D + d_pe
    q_row = q_ptr + q_start * q_st + heads * q_sh                                     # [H]
    q_t = tl.load(q_row[None, :] + offs_d[:, None] * q_sd, mask=h_mask[None, :], other=0.0).to(tl.float32)
    q_pe_t = tl.load(q_row[None, :] + offs_pe[:, None] * q_sd, mask=h_mask[None, :] & pe_mask[:, None],
                     other=0.0).to(tl.float32)                                        # [DPE, H]
    amax = tl.maximum(tl.max(tl.abs(q_t), axis=0), tl.max(tl.abs(q_pe_t), axis=0))   # [H]
    # e4m3 q per head: a power of two puts the head's largest |q| in [128, 256) (e4m3 tops
    # out at 448), undone exactly on the logits
    q_mul = _pow2_to_range(amax, 7)
    q_t = round_to_e4m3(q_t * q_mul[None, :]).to(QK_DTYPE)                            # [D, H]
    q_pe_t = round_to_e4m3(q_pe_t * q_mul[None, :]).to(QK_DTYPE)
    col_scale = qk_scale / q_mul                                                      # [H], log2 units

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_H], tl.float32)                                    # O^T
    bt_row = bt_ptr + b.to(tl.int64) * bt_stride
    page_next = tl.load(bt_row + start // block_size, mask=start < end, other=0)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = page_next.to(tl.int64)
        page_next = tl.load(bt_row + (n0 + BLOCK_N) // block_size, mask=n0 + BLOCK_N < end, other=0)
        row_off = blk * kc_b + (n0 % block_size + tl.arange(0, BLOCK_N)) * kc_o          # [N]
        kv = tl.load(kc_ptr + row_off[:, None] + offs_d[None, :] * kc_d, mask=n_mask[:, None], other=0.0)
        k_pe = tl.load(kc_ptr + row_off[:, None] + offs_pe[None, :] * kc_d,
                       mask=n_mask[:, None] & pe_mask[None, :], other=0.0)           # [N, DPE]
        if QK_PROMOTE:
            # sm_90's e4m3 MMAs sum in a narrower accumulator than fp32 (Triton's default lets
            # the whole 512-dim product run in it): promote every QK_PROMOTE dims into fp32,
            # and add the rope part's product in fp32
            s = tl.dot(kv.to(QK_DTYPE), q_t, max_num_imprecise_acc=QK_PROMOTE)        # [N, H]
            s += tl.dot(k_pe.to(QK_DTYPE), q_pe_t)
        else:
            s = tl.dot(kv.to(QK_DTYPE), q_t)                                          # [N, H]
            s = tl.dot(k_pe.to(QK_DTYPE), q_pe_t, s)
        s = tl.where(n_mask[:, None], s * col_scale[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])                                               # [N, H]
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if DV_RUN > 1:
            # the latent's dims in _dv_order's order: a thread's rows of V^T (its A fragment)
            # are DV_RUN consecutive bytes of a token's row
            JL: tl.constexpr = DV_RUN // 2
            kv = tl.reshape(tl.permute(tl.reshape(kv, [BLOCK_N, BLOCK_D // (64 * JL * DV_WG), DV_WG, 4, 8, JL, 2]),
                                       (0, 1, 5, 2, 3, 6, 4)), [BLOCK_N, BLOCK_D])
        acc = acc * alpha[None, :] + tl.dot(tl.trans(kv).to(PV_DTYPE), p.to(PV_DTYPE))  # [DV, H]
        m_i = m_new

    nonempty = end > start
    mid_row, l_safe = _store_split_lse(mid_lse_ptr, m_i, l_i, nonempty, b, heads, h_mask, n_heads, split, num_splits)
    out_d = _dv_order(offs_d, DV_RUN // 2, DV_WG) if DV_RUN > 1 else offs_d             # acc row -> latent dim
    tl.store(mid_o_ptr + mid_row[None, :] * BLOCK_D + out_d[:, None],
             (acc * (v_scale / l_safe)[None, :]).to(mid_o_ptr.dtype.element_ty),
             mask=and_scalar(h_mask[None, :] & (out_d[:, None] < dv), nonempty))
    if FUSED_MERGE:
        # the row's last split to finish merges them all: every thread's stores above come
        # before the barrier, the counter's release publishes them at GPU scope, and the
        # program that takes the count to num_splits acquires the others'
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + b * tl.num_programs(1) + tl.program_id(1), 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            _merge_heads(mid_o_ptr, mid_lse_ptr, out_ptr, qsl_ptr, o_st, o_sh, b, heads, h_mask, n_heads, dv,
                         num_splits, BLOCK_D)
