"""W4A8 linear (4-bit weights, dynamic per-token int8 activations) as Triton GEMMs on int8
tensor cores; oracle: ops.int4.w4a8_linear.

The activations are quantized per token (moe_int8.quant_rows_int8: ops.quant.quant_int8_rows'
values, symmetric, amax / 127); each K step of a kernel lies inside one weight group, so the
step's product of int8 activations and the weight's signed 4-bit values (widened to int8 in
registers) is one int8 `tl.dot` with an exact int32 result, rescaled by the group's scale and
summed in fp32; the token's scale multiplies the row at the end. Weights whose groups are
narrower than the smallest K step (32), or reordered by g_idx, go to the torch op. Two kernels,
chosen by the launch table's SWAP_AB:

- `_w4a8_nt_kernel` (symmetric weights): y^T = W a^T, the unpacked weight tile the MMA's first
  operand, so a thread's share of the result spans few output rows and each step's group scales
  are a few loads. Unpacking is one LOP3 per four lanes (`_PARITY_ASM`, values 16 (u - 8),
  nibbles in parity order with the activations written in the same order), and the int32
  product becomes fp32 by an offset (`_MAGIC_I`) instead of the conversion instruction.
- `_w4a8_gemm_kernel` (any weights, zero points included): y = a W^T, the packed words unpacked
  to u - z by the thread that loaded them (`_UNPACK_ASM`, seven instructions for four lanes).

The interpreter and ROCm, which run no PTX, take join-based unpacks with the same values
(`_common.unpack_by_ptx`).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.int4 import check_int4_operands
from deepserve.ops.int4 import w4a8_linear as w4a8_linear_torch
from deepserve.ops.registry import register
from deepserve.ops.triton import _common
from deepserve.ops.triton._common import (advance_cols, as_rows, cdiv, interpreting, load_rows, repeat_words, row_tile,
                                             unpack_by_ptx)
from deepserve.ops.triton.launch_config import launch_settings
from deepserve.ops.triton.moe_int8 import quant_rows_int8


@triton.jit
def _signed_lanes(p, z, i: tl.constexpr):
    """Lane i of every packed word p [BN, C] (feature 8c + i) minus its zero point z [BN, 1]: int32 in -15 .. 15."""
    return ((p >> (4 * i)) & 0xF) - z


@triton.jit
def _unpack_tile(p, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed words [BN, BK / 8] -> int8 [BN, BK] of u - z in feature order. Each join adds an
    axis of two lanes held by the same thread, so the eight lanes of a word stay in the
    registers of the thread that loaded it and the reshape only renames them."""
    # tl.join appends its axis last, which the reshape makes the fastest: the first joins
    # pair lanes 4 apart (bit 2 of the lane), the last pairs even and odd lanes (bit 0)
    l04 = tl.join(_signed_lanes(p, z, 0), _signed_lanes(p, z, 4))
    l26 = tl.join(_signed_lanes(p, z, 2), _signed_lanes(p, z, 6))
    l15 = tl.join(_signed_lanes(p, z, 1), _signed_lanes(p, z, 5))
    l37 = tl.join(_signed_lanes(p, z, 3), _signed_lanes(p, z, 7))
    lanes = tl.join(tl.join(l04, l26), tl.join(l15, l37))        # [BN, C, 2, 2, 2]: lane 4a + 2b + c
    return tl.reshape(lanes, [BLOCK_N, BLOCK_K]).to(tl.int8)


# One asm instance turns a word's lanes 4h .. 4h + 3 (h from the first lane's index) into four
# int8 (u - z) packed in one register: the half-word's nibbles 0 and 2, and (shifted down 4) 1 and
# 3, masked into bytes 0 and 1, interleaved by PRMT, then u + 128 - z per byte (no carry: at most
# 143) and bit 7 flipped, which is u - z mod 256. Seven instructions per four nibbles.
_UNPACK_ASM = tl.constexpr("""{
.reg .b32 t, e, o;
shl.b32 t, $5, 2;
shr.u32 t, $1, t;
and.b32 e, t, 0x0F0F;
shr.u32 o, t, 4;
and.b32 o, o, 0x0F0F;
prmt.b32 t, e, o, 0x5140;
add.u32 t, t, $9;
xor.b32 $0, t, 0x80808080;
}""")


_UNPACK_CONSTRAINTS = tl.constexpr("=r," + ",".join(["r"] * 12))


@triton.jit
def _unpack_tile_asm(p, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_unpack_tile` by PTX: each word repeated over its 8 lanes (joins: in the loading thread),
    every four lanes one `_UNPACK_ASM` instance given the word, the lane index and
    (128 - z) in every byte."""
    words = repeat_words(p, BLOCK_N, BLOCK_K)
    lane = (tl.arange(0, BLOCK_K) % 8)[None, :] + tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    zc = (128 - z) * 0x01010101 + tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
    return tl.inline_asm_elementwise(_UNPACK_ASM, _UNPACK_CONSTRAINTS, [words, lane, zc], dtype=tl.int8,
                                     is_pure=True, pack=4)


@triton.jit
def _tile_operands(a_ptr, qw_ptr, s_ptr, M, N, K, stride_am, stride_qn, stride_sn, pid_m, pid_n,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_PTR: tl.constexpr):
    """Tile (pid_m, pid_n)'s row and column indices, tiles of its activations [BM, BK] and packed
    words [BN, BK / 8] at K = 0 (`_common.row_tile`: block pointers with BLOCK_PTR, stepped along
    K without per-element pointer tensors held across the loop, which spilled on sm_90) and its
    rows' scale pointers."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_blk = row_tile(a_ptr, M, K, stride_am, pid_m * BLOCK_M, BLOCK_M, BLOCK_K, BLOCK_PTR)
    p_blk = row_tile(qw_ptr, N, K // 8, stride_qn, pid_n * BLOCK_N, BLOCK_N, BLOCK_K // 8, BLOCK_PTR)
    return offs_m, offs_n, a_blk, p_blk, s_ptr + offs_n.to(tl.int64) * stride_sn


@triton.jit
def _w4a8_gemm_kernel(a_ptr, as_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K,
                      stride_am, stride_qn, stride_sn, stride_ym,
                      GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_PTR: tl.constexpr):
    """y = (a_q @ (u - z)^T per group * s) * a_scale (+ b). K is a multiple of BLOCK_K and every
    K step lies inside one group. The weight tile is read as [BLOCK_N, BLOCK_K / 8] packed words
    (each row's words contiguous: whole 32-byte sectors, every word once) and unpacked in
    registers; its int8 dot with the activations is exact in int32 and scaled by the group's
    scale once per output column and step."""
    C: tl.constexpr = BLOCK_K // 8
    offs_m, offs_n, a_blk, p_blk, s_rows = _tile_operands(a_ptr, qw_ptr, s_ptr, M, N, K, stride_am, stride_qn,
                                                          stride_sn, tl.program_id(0), tl.program_id(1),
                                                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_PTR)
    m_ok, n_ok = offs_m < M, offs_n < N
    z_rows = z_ptr + offs_n.to(tl.int64) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = load_rows(a_blk, m_ok, BLOCK_PTR)                                                       # int8 [BM, BK]
        p = load_rows(p_blk, n_ok, BLOCK_PTR)                                                       # [BN, C]
        a_blk = advance_cols(a_blk, BLOCK_K, BLOCK_PTR)
        p_blk = advance_cols(p_blk, C, BLOCK_PTR)
        g = k0 // GROUP
        if HAS_ZP:
            z = tl.load(z_rows + g, mask=n_ok, other=8).to(tl.int32)[:, None]
        else:
            z = tl.full([1, 1], 8, tl.int32)
        if ASM:
            w = _unpack_tile_asm(p, z, BLOCK_N, BLOCK_K)                                            # [BN, BK]
        else:
            w = _unpack_tile(p, z, BLOCK_N, BLOCK_K)
        s = tl.load(s_rows + g, mask=n_ok, other=0.0).to(tl.float32)
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32).to(tl.float32) * s[None, :]
    acc *= tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


# The parity unpack: a word's odd nibbles already sit in the high halves of its four bytes and
# its even nibbles move there with one shift, so (t & 0xF0F0F0F0) ^ 0x80808080 is four int8 of
# 16 (u - 8) in one LOP3 (`_PARITY_ASM`; the shift is 4 for the even half, 0 for the odd). The
# lanes come out even nibbles first (position 4h + j of a word holds feature 8c + 2j + h), so the
# activations are written in that order too (moe_int8.quant_rows_int8(parity_lanes=True)), and
# the dot is 16 times the true one: every product |127 x 128| and a 128-wide sum stay below
# 2^22, which the int32 -> fp32 conversion by offset (`_MAGIC_I`) needs.
_PARITY_ASM = tl.constexpr("""{
.reg .b32 t;
shl.b32 t, $1, $5;
and.b32 t, t, 0xF0F0F0F0;
xor.b32 $0, t, 0x80808080;
}""")

_PARITY_CONSTRAINTS = tl.constexpr("=r," + ",".join(["r"] * 8))

# int32 d with |d| < 2^22 read as fp32 after adding the bits of 1.5 x 2^23 is 1.5 x 2^23 + d
# exactly; subtracting 1.5 x 2^23 leaves d: an integer add and a float add, where the
# conversion instruction (I2F) runs at an eighth of the FP32 rate on sm_90.
_MAGIC_I = tl.constexpr(0x4B400000)
_MAGIC_F = tl.constexpr(12582912.0)


@triton.jit
def _parity_lane(p, i: tl.constexpr):
    """16 (u - 8) of nibble i of every packed word p [BN, C], int32 in -128 .. 112."""
    return (((p >> (4 * i)) & 0xF) - 8) * 16


@triton.jit
def _unpack_parity_tile(p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """Packed words [BN, BK / 8] -> int8 [BN, BK] of 16 (u - 8), each word's lanes in parity order
    (position 4h + j = nibble 2j + h). By PTX (`_PARITY_ASM`, four lanes a register) or by joins,
    whose first axis is the slowest: h, then the two bits of j."""
    if ASM:
        words = repeat_words(p, BLOCK_N, BLOCK_K)
        shift = 4 - (tl.arange(0, BLOCK_K) % 8)[None, :] + tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        return tl.inline_asm_elementwise(_PARITY_ASM, _PARITY_CONSTRAINTS, [words, shift], dtype=tl.int8,
                                         is_pure=True, pack=4)
    n04 = tl.join(tl.join(_parity_lane(p, 0), _parity_lane(p, 1)), tl.join(_parity_lane(p, 4), _parity_lane(p, 5)))
    n26 = tl.join(tl.join(_parity_lane(p, 2), _parity_lane(p, 3)), tl.join(_parity_lane(p, 6), _parity_lane(p, 7)))
    return tl.reshape(tl.join(n04, n26), [BLOCK_N, BLOCK_K]).to(tl.int8)


@triton.jit
def _w4a8_nt_kernel(a_ptr, as_ptr, qw_ptr, s_ptr, b_ptr, y_ptr, M, N, K,
                    stride_am, stride_qn, stride_sn, stride_ym,
                    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, OVERLAP: tl.constexpr,
                    ONE_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_PTR: tl.constexpr):
    """Symmetric weights, y^T tile by tile: acc [BN, BM] += (w16 [BN, BK] @ a^T [BK, BM]) * s[:, None]
    per K step (one group), w16 = 16 (u - 8) unpacked in registers as the dot's first operand
    and the parity-ordered int8 activations as its second; a thread's rows of the result are
    few, so each step's group scales are a few loads. The int32 dot becomes fp32 by offset
    (`_MAGIC_I`), the 1/16 joins the token's scale at the end. OVERLAP rescales each step's
    product in the next step, after its MMA is issued (registers for a second int32 tile).
    ONE_GROUP (a group spans K: channel scales): one int32 accumulator over K, one rescale."""
    C: tl.constexpr = BLOCK_K // 8
    offs_m, offs_n, a_blk, p_blk, s_rows = _tile_operands(a_ptr, qw_ptr, s_ptr, M, N, K, stride_am, stride_qn,
                                                          stride_sn, tl.program_id(1), tl.program_id(0),
                                                          BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_PTR)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    d_prev = tl.zeros([BLOCK_N, BLOCK_M], tl.int32)
    s_prev = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = load_rows(a_blk, m_ok, BLOCK_PTR)                                                       # int8 [BM, BK]
        p = load_rows(p_blk, n_ok, BLOCK_PTR)                                                       # [BN, C]
        a_blk = advance_cols(a_blk, BLOCK_K, BLOCK_PTR)
        p_blk = advance_cols(p_blk, C, BLOCK_PTR)
        w = _unpack_parity_tile(p, BLOCK_N, BLOCK_K, ASM)                                           # [BN, BK]
        if ONE_GROUP:
            # one scale a row (channel scales): the int32 sum runs over all of K, exact
            # (|16 (u - 8) a| <= 16,256 a product: K up to 2^17), and is rescaled once
            d_prev = tl.dot(w, tl.trans(a), d_prev, out_dtype=tl.int32)
        else:
            d = tl.dot(w, tl.trans(a), out_dtype=tl.int32)                                          # [BN, BM]
            s = tl.load(s_rows + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            if OVERLAP:
                # rescale the previous step's product while this step's MMA runs
                acc += ((d_prev + _MAGIC_I).to(tl.float32, bitcast=True) - _MAGIC_F) * s_prev[:, None]
                d_prev, s_prev = d, s
            else:
                acc += ((d + _MAGIC_I).to(tl.float32, bitcast=True) - _MAGIC_F) * s[:, None]
    if ONE_GROUP:
        acc = d_prev.to(tl.float32) * tl.load(s_rows, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    elif OVERLAP:
        acc += ((d_prev + _MAGIC_I).to(tl.float32, bitcast=True) - _MAGIC_F) * s_prev[:, None]
    acc *= tl.load(as_ptr + offs_m, mask=m_ok, other=0.0)[None, :] * 0.0625
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=n_ok[:, None] & m_ok[None, :])


def _block_k(group: int, k: int) -> Optional[int]:
    """The largest K step (32..128) inside one group, or None (an int8 dot on sm_90 takes K >= 32)."""
    for bk in (128, 64, 32):
        if group % bk == 0 and (bk <= k or bk == 32):
            return bk
    return None


@register("w4a8_linear", "triton")
def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                g_idx: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    bk = _block_k(group_size, x.shape[-1])
    if not (x.is_cuda or interpreting()) or g_idx is not None or bk is None:
        return w4a8_linear_torch(x, qweight, scales, zeros, g_idx, group_size, bias)
    check_int4_operands(x, qweight, scales, zeros, g_idx, group_size)
    lead, n = x.shape[:-1], qweight.shape[0]
    x2 = as_rows(x)
    m, k = x2.shape
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    # tiles from the launch table (configs/int4/, kernel "w4a8"; benchmarks/sweep_int4.py --kernels
    # w4a8 measures them; benchmarks/sass_int4.py w4a8 shows each tile's registers, shared memory and loop)
    cfg = launch_settings("int4", x.device, kernel="w4a8", m=m, n=n, k=k, groups=k // group_size)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_PTR=_common.BLOCK_PTRS, num_warps=cfg["num_warps"],
                  num_stages=cfg.get("num_stages", 3))
    b = bias if bias is not None else y
    if zeros is None and cfg.get("SWAP_AB", 0):
        xq, xs = quant_rows_int8(x2, parity_lanes=True)
        grid = (cdiv(n, bn), cdiv(m, bm))
        _w4a8_nt_kernel[grid](xq, xs, qweight.contiguous(), scales.contiguous(), b, y, m, n, k, xq.stride(0),
                              qweight.stride(0), scales.stride(0), y.stride(0), GROUP=group_size,
                              HAS_BIAS=bias is not None, ASM=unpack_by_ptx(), OVERLAP=cfg.get("OVERLAP", 0),
                              ONE_GROUP=group_size >= k,
                              **common)
        return y.reshape(*lead, n)
    xq, xs = quant_rows_int8(x2)
    grid = (cdiv(m, bm), cdiv(n, bn))
    _w4a8_gemm_kernel[grid](xq, xs, qweight.contiguous(), scales.contiguous(),
                            zeros.contiguous() if zeros is not None else scales, b,
                            y, m, n, k, xq.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
                            GROUP=group_size, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None, ASM=unpack_by_ptx(),
                            **common)
    return y.reshape(*lead, n)
