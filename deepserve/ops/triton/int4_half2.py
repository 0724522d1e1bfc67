"""Packed int4 words times their activations in packed fp16 arithmetic (the GEMV's DEQ 3 and
4): the unpacking of the fast weight-only GEMVs and Marlin's dequantization (4-bit fields
OR-ed into the mantissa of fp16 1024), written as one inline-PTX block a thread and row.

A word's lanes q and q + 4 sit 16 bits apart, so one LOP3 of the word (or of the word shifted
down 8 bits) with 0x000F000F / 0x00F000F0 and 0x6400 twice gives an fp16 pair of 1024 + u
(lanes 0 and 2 of each half) or 1024 + 16 u (lanes 1 and 3). One HFMA2 turns each pair into
(u - 8) / 128 exactly (p / 128 - 8.0625, or p / 2048 - 0.5625: every value a multiple of 2^-7
of at most 1/16), one HMUL2 / HFMA2 a pair multiplies it by the activations' fp16 pair and
sums the pairs, and one HADD2 adds the two halves: per word 1 SHF, 4 LOP3 and 8 HFMA2, then
per thread one HADD2 and one conversion to fp32 (against 16 FFMAs and 8 LOP3s lane by lane).
With two words a thread (adjacent, in one group: DEQ 4) both words' pairs go into one sum, so
the halves, the conversion, the scale and its load are paid once for 16 nibbles.

Precision: the (u - 8) / 128 are exact; the activations are rounded to fp16 (exact for bf16
and fp16 values in fp16's normal range, 2^-14 .. 65504; larger ones overflow, smaller ones
keep 2^-25 absolute); each product and add rounds once to fp16 (2^-11 relative) over at most
16 terms a thread, whose sum the /128 keeps below |x|max, so nothing past x's own conversion
overflows; fp32 takes over once a thread's words are summed. The caller multiplies the fp32
sums by 128 (SCALE) and the group's scale. At the 8B's shapes (bf16 x, groups of 128) the
fp16 sums move y by about 4e-4 of max |y|, a third of what the torch op's bf16 rounding
of each weight moves it (tests/ops/test_triton_int4.py bounds both).

`words_dot16` runs the PTX on NVIDIA GPUs and, under the interpreter and on ROCm
(`_common.unpack_by_ptx`) the same operations in Triton: fp16 halves by bitcast, each fp16
operation computed exactly in fp64 (a multiple of 2^-7 of at most 1/16 times an fp16 value, plus
an fp16 value, spans fewer than 53 bits) and rounded once to fp16, as the PTX rounds.
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl

F16_MAGIC = 0x64006400         # fp16 1024, twice: OR-ed onto a field at bits 0-3 (4-7), 1024 + u (+ 16 u)
LO_MUL, LO_ADD = tl.constexpr(1 / 128), tl.constexpr(-8.0625)     # (1024 + u) / 128 - 8.0625 = (u - 8) / 128
HI_MUL, HI_ADD = tl.constexpr(1 / 2048), tl.constexpr(-0.5625)    # (1024 + 16 u) / 2048 - 0.5625 = (u - 8) / 128
SCALE = tl.constexpr(128.0)    # the sums are 1/128 of sum (u - 8) x


def f16_pair_bits(v: float) -> int:
    """The bits of the fp16 pair (v, v) (v exact in fp16)."""
    (half,) = struct.unpack("<H", struct.pack("<e", v))
    return half * 0x00010001


def dot_asm(words: int) -> str:
    """The PTX of `words_dot16` for 1 or 2 words: $0 the fp32 sum / 128; $1 .. $words the words;
    then 4 fp16 activation pairs a word (lanes q, q + 4 for q = 0..3); last F16_MAGIC in a
    register (the mask is the LOP3's one immediate)."""
    lines = ["{", ".reg .b32 w8, p0, p1, p2, p3, a, ml, al, mh, ah;", ".reg .b16 l, h, s;",
             f"mov.b32 ml, {f16_pair_bits(LO_MUL.value):#010x};", f"mov.b32 al, {f16_pair_bits(LO_ADD.value):#010x};",
             f"mov.b32 mh, {f16_pair_bits(HI_MUL.value):#010x};", f"mov.b32 ah, {f16_pair_bits(HI_ADD.value):#010x};"]
    magic = f"${1 + 5 * words}"
    for i in range(words):
        w, x = f"${1 + i}", [f"${1 + words + 4 * i + q}" for q in range(4)]
        lines += [f"lop3.b32 p0, {w}, 0x000F000F, {magic}, 0xEA;", f"lop3.b32 p1, {w}, 0x00F000F0, {magic}, 0xEA;",
                  f"shr.u32 w8, {w}, 8;", f"lop3.b32 p2, w8, 0x000F000F, {magic}, 0xEA;",
                  f"lop3.b32 p3, w8, 0x00F000F0, {magic}, 0xEA;",
                  "fma.rn.f16x2 p0, p0, ml, al;", "fma.rn.f16x2 p1, p1, mh, ah;",
                  "fma.rn.f16x2 p2, p2, ml, al;", "fma.rn.f16x2 p3, p3, mh, ah;",
                  f"mul.rn.f16x2 a, p0, {x[0]};" if i == 0 else f"fma.rn.f16x2 a, p0, {x[0]}, a;"]
        lines += [f"fma.rn.f16x2 a, p{q}, {x[q]}, a;" for q in range(1, 4)]
    lines += ["mov.b32 {l, h}, a;", "add.rn.f16 s, l, h;", "cvt.f32.f16 $0, s;", "}"]
    return "\n".join(lines)


_ASM_1 = tl.constexpr(dot_asm(1))
_ASM_2 = tl.constexpr(dot_asm(2))
PACK_ASM = tl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")     # fp32 $1, $2 -> the fp16 pair ($1 low)


@triton.jit
def x_pair(x_ptr, offs_c, c_ok, q: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr):
    """Lanes q and q + 4 of the activation words offs_c [C] (x[8c + q], x[8c + q + 4]) as fp16
    pair bits (int32, lane q in the low half; one cvt.rn.f16x2.f32 with ASM), and their fp32
    sum (for zero points)."""
    if EVEN:
        lo = tl.load(x_ptr + 8 * offs_c + q).to(tl.float32)
        hi = tl.load(x_ptr + 8 * offs_c + q + 4).to(tl.float32)
    else:
        lo = tl.load(x_ptr + 8 * offs_c + q, mask=c_ok, other=0.0).to(tl.float32)
        hi = tl.load(x_ptr + 8 * offs_c + q + 4, mask=c_ok, other=0.0).to(tl.float32)
    if ASM:
        bits = tl.inline_asm_elementwise(PACK_ASM, "=r,f,f", [lo, hi], dtype=tl.int32, is_pure=True, pack=1)
        return bits, lo + hi
    bits = ((lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
            | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16))
    return bits, lo + hi


@triton.jit
def _half(p, h: tl.constexpr):
    """Half h of the fp16 pair bits p, as fp64 (exact)."""
    return ((p >> (16 * h)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)


@triton.jit
def _f16(v):
    """An exact fp64 result rounded once to fp16 (round to nearest even), back in fp64."""
    return v.to(tl.float16).to(tl.float64)


@triton.jit
def _term(w, mask: tl.constexpr, mul: tl.constexpr, add: tl.constexpr, x, a, magic16, h: tl.constexpr):
    """One pair's half h: the field (w & mask | magic) unpacked to (u - 8) / 128, times x's half,
    plus a (fp16 values in fp64)."""
    return _f16(_f16(_half((w & mask) | magic16, h) * mul + add) * _half(x, h) + a)


@triton.jit
def _replay_word(w, x04, x15, x26, x37, a, magic16, h: tl.constexpr):
    """A word's four pairs added to the half-h sum a, as `dot_asm` does (a = 0 for the first
    word: its mul.rn rounds as an fma onto 0 does)."""
    w8 = w >> 8         # (arithmetic, unlike shr.u32: the masks take bits 0-23 only)
    a = _term(w, 0x000F000F, LO_MUL, LO_ADD, x04, a, magic16, h)
    a = _term(w, 0x00F000F0, HI_MUL, HI_ADD, x15, a, magic16, h)
    a = _term(w8, 0x000F000F, LO_MUL, LO_ADD, x26, a, magic16, h)
    return _term(w8, 0x00F000F0, HI_MUL, HI_ADD, x37, a, magic16, h)


@triton.jit
def words_dot16(wa, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2, xb3, magic16, TWO: tl.constexpr, ASM: tl.constexpr):
    """fp32 [C, R]: sum over the 8 lanes of the words wa [C, R] (and wb, with TWO) of (u - 8) x / 128,
    the activations as fp16 pairs (`x_pair` bits, [C, 1]: xa0 .. xa3 for wa, xb0 .. xb3 for wb);
    magic16: F16_MAGIC. Without TWO, wb and xb0 .. xb3 are unused."""
    if ASM:
        if TWO:
            return tl.inline_asm_elementwise(_ASM_2, "=f" + ",r" * 11, [wa, wb, xa0, xa1, xa2, xa3, xb0, xb1, xb2,
                                                                       xb3, magic16],
                                             dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(_ASM_1, "=f" + ",r" * 6, [wa, xa0, xa1, xa2, xa3, magic16],
                                         dtype=tl.float32, is_pure=True, pack=1)
    lo = _replay_word(wa, xa0, xa1, xa2, xa3, 0.0, magic16, 0)
    hi = _replay_word(wa, xa0, xa1, xa2, xa3, 0.0, magic16, 1)
    if TWO:
        lo = _replay_word(wb, xb0, xb1, xb2, xb3, lo, magic16, 0)
        hi = _replay_word(wb, xb0, xb1, xb2, xb3, hi, magic16, 1)
    return _f16(lo + hi).to(tl.float32)


@triton.jit
def magic16_of(magic):
    """F16_MAGIC from the kernels' runtime `magic` (int4_gemm.MAGIC, 0x4B000000), so that it
    reaches the PTX in a register."""
    return ((magic >> 24) + 25) * 0x00010001 << 8
