"""Varlen paged prefill attention (flash-attention tiles over query rows) as a Triton kernel.

One program owns BLOCK_M query rows of one sequence and one query head, and streams that
sequence's keys/values from the paged pool in BLOCK_N-token tiles with an online softmax
(Dao et al., FlashAttention, 2022). It serves prefill chunks and decode rows alike: row i of
a sequence with c cached tokens sees keys 0 .. c + i, so tiles wholly past the diagonal are
never loaded. Heads share KV heads by integer division (GQA/MQA), and K/V are addressed
through their strides so MLA's latent view works here too.
"""
from __future__ import annotations

import triton
import triton.language as tl

from deepserve.ops.triton.attention_decode import SEQ_ARRAYS


# bt_stride (the block tables' width) follows the step's longest context: not specialised on,
# so a new width class compiles nothing while serving (it only scales a row's address); nor
# the alignment of the per-sequence arrays (SEQ_ARRAYS: scalar loads of views that start
# after the step's decode rows)
@triton.jit(do_not_specialize=["bt_stride"], do_not_specialize_on_alignment=SEQ_ARRAYS)
def _prefill_kernel(
        q_ptr, kc_ptr, kp_ptr, vc_ptr, qsl_ptr, seq_lens_ptr, bt_ptr, out_ptr,
        q_st, q_sh, q_sd, kc_b, kc_o, kc_h, kc_d, kp_b, kp_o, kp_h, kp_d, vc_b, vc_o, vc_h, vc_d, o_st, o_sh,
        bt_stride,
        qk_scale, v_scale, group, block_size, d_pe, dv,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr,
        BLOCK_DV: tl.constexpr, SHARED_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
        DOT_DTYPE: tl.constexpr, HEAD_D: tl.constexpr):
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // group
    q_start = tl.load(qsl_ptr + b).to(tl.int64)
    q_len = (tl.load(qsl_ptr + b + 1) - q_start).to(tl.int32)
    if m_block * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens_ptr + b)
        context = seq_len - q_len
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < q_len
        offs_d = tl.arange(0, BLOCK_D)
        q_rows = q_ptr + (q_start + offs_m)[:, None] * q_st + h * q_sh
        # HEAD_D < BLOCK_D only for heads narrower than the smallest dot tile (tiny models):
        # the columns past HEAD_D read as zeros
        q = tl.load(q_rows + offs_d[None, :] * q_sd, mask=m_mask[:, None] & (offs_d < HEAD_D)[None, :],
                    other=0.0).to(DOT_DTYPE)
        if BLOCK_DPE > 0:
            offs_pe = BLOCK_D + tl.arange(0, BLOCK_DPE)
            pe_mask = offs_pe < BLOCK_D + d_pe
            q_pe = tl.load(q_rows + offs_pe[None, :] * q_sd, mask=m_mask[:, None] & pe_mask[None, :],
                           other=0.0).to(DOT_DTYPE)
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_mask = offs_dv < dv

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * bt_stride
        # the last row of this tile sees keys up to context + (its index); later keys are skipped
        kv_end = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)
        for n0 in range(0, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < kv_end
            blk = tl.load(bt_row + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
            row_off = blk * kc_b + (offs_n % block_size) * kc_o + kvh * kc_h
            k = tl.load(kc_ptr + row_off[None, :] + offs_d[:, None] * kc_d,
                        mask=n_mask[None, :] & (offs_d < HEAD_D)[:, None], other=0.0)  # [D, N]
            qk = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            if BLOCK_DPE > 0:
                # the keys' dims past the main block: the rest of the k rows, or MLA's shared k_pe
                pe_off = blk * kp_b + (offs_n % block_size) * kp_o + kvh * kp_h
                k_pe = tl.load(kp_ptr + pe_off[None, :] + (offs_pe - BLOCK_D)[:, None] * kp_d,
                               mask=n_mask[None, :] & pe_mask[:, None], other=0.0)
                qk += tl.dot(q_pe, k_pe.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            causal = offs_n[None, :] <= (context + offs_m)[:, None]
            qk = tl.where(causal & n_mask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            # rows with no visible key yet keep m = -inf; shift by 0 there to avoid inf - inf
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(qk - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if SHARED_KV:
                v = tl.trans(k)
            else:
                v_off = blk * vc_b + (offs_n % block_size) * vc_o + kvh * vc_h
                v = tl.load(vc_ptr + v_off[:, None] + offs_dv[None, :] * vc_d,
                            mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
        out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
        tl.store(out_ptr + (q_start + offs_m)[:, None] * o_st + h * o_sh + offs_dv[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])
