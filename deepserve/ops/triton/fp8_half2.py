"""e4m3 weights times an e4m3 row in packed fp16 arithmetic (the one-row fp8 GEMV's H2 1), as
inline PTX: the conversions of TensorRT-LLM's and Marlin's fp8 weight-only kernels
(`cvt.rn.f16x2.e4m3x2`, sm_89+, two e4m3 bytes to an fp16 pair in one instruction) with the
fp16-pair sums of int4_half2.

A weight word's bytes 0, 1 and 2, 3 convert to two fp16 pairs (exact: every e4m3 value is an
fp16 one); one HFMA2 a pair multiplies it by the row's pair of the same bytes into an fp16-pair
sum (`word_fma16`: per word of 4 weights 2 conversions and 2 HFMA2, against 4 conversions to
fp32, 4 FFMAs and their byte extraction lane by lane); a thread sums its 4 adjacent words of a
group (16 weights) so, then one HADD2 adds the halves and one conversion gives fp32
(int4_half2.pair_sum16).

Range and precision: the row's e4m3 values go in times 2^-8 (`row_pairs`: a conversion and one
HMUL2 a pair; `quantized_row_pairs`: the in-kernel quantization's fp32 values packed), exact
down to e4m3's smallest subnormal 2^-9 (2^-17 after the prescale, among fp16's subnormals,
whose step is 2^-24). A product is then at most 448 x 448 / 256 = 784, a half's 8 products sum
to at most 6272 and the two halves to 12544 < 65504: no sum overflows. Each product-and-add rounds once to fp16 (2^-11
relative to the running sum, whose size the products' absolute sum bounds) and a product under
2^-14 keeps 2^-25 absolute; with 8 adds a half and the halves' one, a run of 16 products moves
at most by 9 x 2^-11 of its products' absolute sum plus 16 x 2^-25, i.e. scaled back (x 256 and
the block scales) at most 4.4e-3 of sum |w q| over the row. At 1 x 7168 and 1 x 1536 rows with
the bench's data (weights randn x 0.02, x randn) the fp16 runs move y by 4.4-5.2e-4 of max |y|
(the kernel equal to a numpy replay of these roundings), under the output's own bf16 rounding
(1.6-3.7e-3 of max |y| there) and far under what the row's e4m3 quantization moves it (2.5-3.8e-2).
tests/ops/test_triton_quant_gemm.py checks the bound, the 448 x 448 worst case and the PTX
against the replay bit for bit. The caller multiplies the fp32 sums by 256 (SCALE) and the
group's scales.

On NVIDIA GPUs the PTX runs; under the interpreter and on ROCm (`_common.unpack_by_ptx`) the same
operations in Triton: an e4m3 byte's fp16 times 2^-8 is the fp16 whose bits are the byte's sign
at bit 15 and its other 7 bits at bits 7-13 (exponent biases 7 and 15), each fp16 operation
computed exactly in fp64 (an e4m3 value times such an fp16 plus an fp16 spans fewer than 53
bits) and rounded once to fp16, as the PTX rounds.
"""
from __future__ import annotations

import triton
import triton.language as tl

from deepserve.ops.triton.int4_half2 import _f16, _f16_bits, _half, _pack, f16_pair_bits

X_MUL = tl.constexpr(2.0 ** -8)   # the row's prescale: keeps every product and run sum in fp16's range
SCALE = tl.constexpr(256.0)       # the sums are 1/256 of sum w q

# $0 = $4 + (bytes 0, 1 of the word $1) * $2 + (bytes 2, 3) * $3, fp16 pairs; the sum builds in
# `a`, written to $0 last, so that $0 may share a register with any input
WORD_ASM = tl.constexpr("\n".join([
    "{", ".reg .b16 l, h;", ".reg .b32 p, q, a;", "mov.b32 {l, h}, $1;",
    "cvt.rn.f16x2.e4m3x2 p, l;", "cvt.rn.f16x2.e4m3x2 q, h;",
    "fma.rn.f16x2 a, p, $2, $4;", "fma.rn.f16x2 a, q, $3, a;", "mov.b32 $0, a;", "}"]))
# the e4m3 word $2 -> its bytes 0, 1 ($0) and 2, 3 ($1) as fp16 pairs times 2^-8
ROW_ASM = tl.constexpr("\n".join([
    "{", ".reg .b16 l, h;", ".reg .b32 s, p, q;", "mov.b32 {l, h}, $2;",
    f"mov.b32 s, {f16_pair_bits(X_MUL.value):#010x};",
    "cvt.rn.f16x2.e4m3x2 p, l;", "cvt.rn.f16x2.e4m3x2 q, h;",
    "mul.rn.f16x2 $0, p, s;", "mul.rn.f16x2 $1, q, s;", "}"]))


@triton.jit
def _e4m3_f16_bits(w, i: tl.constexpr):
    """Byte i of the int32 words w -> the bits of its e4m3 value times 2^-8 as an fp16 (int32)."""
    b = (w >> (8 * i)) & 0xFF
    return ((b & 0x7F) << 7) | ((b & 0x80) << 8)


@triton.jit
def _e4m3(w, i: tl.constexpr):
    """Byte i of the int32 words w as its e4m3 value (fp64, exact)."""
    return _half(_e4m3_f16_bits(w, i), 0) * SCALE


@triton.jit
def quarters(t):
    """[A, B, 4] -> its four [A, B] slices along the last dimension (split in the owning thread's
    registers)."""
    a, b = tl.split(tl.reshape(t, [t.shape[0], t.shape[1], 2, 2]))      # elements 0, 2 and 1, 3
    t0, t2 = tl.split(a)
    t1, t3 = tl.split(b)
    return t0, t1, t2, t3


@triton.jit
def quantized_row_pairs(q, ASM: tl.constexpr):
    """`row_pairs` of the in-kernel quantization's e4m3 values (fp32 [1, C, 4, 4], the last
    dimension a word's bytes), packed exactly."""
    ev, od = tl.split(tl.reshape(q * X_MUL, [1, q.shape[1], 4, 2, 2]))    # bytes 0, 2 and 1, 3
    e0, e2 = tl.split(ev)
    o1, o3 = tl.split(od)
    return _pack(e0, o1, ASM), _pack(e2, o3, ASM)


@triton.jit
def row_pairs(q, ASM: tl.constexpr):
    """The row's e4m3 words q (int32 [1, C, 4]) times 2^-8 as fp16 pairs (bits in int32 [1, C, 4]):
    (bytes 0, 1; bytes 2, 3) of each word, converted by `ROW_ASM` with ASM."""
    if ASM:
        return tl.inline_asm_elementwise(ROW_ASM, "=r,=r,r", [q], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    return (_e4m3_f16_bits(q, 0) | (_e4m3_f16_bits(q, 1) << 16),
            _e4m3_f16_bits(q, 2) | (_e4m3_f16_bits(q, 3) << 16))


@triton.jit
def _replay_half(w, x01, x23, acc, h: tl.constexpr):
    a = _f16(_e4m3(w, h) * _half(x01, h) + _half(acc, h))
    return _f16(_e4m3(w, 2 + h) * _half(x23, h) + a)


@triton.jit
def word_fma16(w, x01, x23, acc, ASM: tl.constexpr):
    """acc + the e4m3 words w [R, C] times the row's pairs x01, x23 (`row_pairs`, [1, C]), as fp16
    pairs (int32 bits [R, C]): half 0 sums bytes 0 and 2, half 1 bytes 1 and 3. By `WORD_ASM`
    with ASM, else its operations replayed."""
    if ASM:
        return tl.inline_asm_elementwise(WORD_ASM, "=r,r,r,r,r", [w, x01, x23, acc], dtype=tl.int32, is_pure=True,
                                         pack=1)
    return _f16_bits(_replay_half(w, x01, x23, acc, 0)) | (_f16_bits(_replay_half(w, x01, x23, acc, 1)) << 16)
