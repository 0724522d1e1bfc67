"""Packed int4 words times their activations in packed fp16 arithmetic (the GEMV's DEQ 3, with
WORDS 1, 2 or 4 adjacent words a thread): the unpacking of the fast weight-only GEMVs and
Marlin's dequantization (4-bit fields OR-ed into the mantissa of fp16 1024), as inline PTX.

A word's lanes q and q + 4 sit 16 bits apart, so one LOP3 of the word (or of the word shifted
down 8 bits) with 0x000F000F / 0x00F000F0 and 0x6400 twice gives an fp16 pair of 1024 + u
(lanes 0 and 2 of each half) or 1024 + 16 u (lanes 1 and 3). One HFMA2 turns each pair into
(u - 8) / 256 exactly (p / 256 - 4.03125, or p / 4096 - 0.28125: every value a multiple of
2^-8 of at most 1/32), and one HFMA2 a pair multiplies it by the activations' fp16 pair into
an fp16-pair sum (`pairs_fma16`: per word 1 SHF, 4 LOP3, 8 HFMA2, against 16 FFMAs and 8
LOP3s lane by lane); after a thread's words one HADD2 adds the halves and one conversion
gives fp32 (`pair_sum16`), so with 2 or 4 words a thread (one group) the halves, the
conversion, the scale and its load are paid once for 16 or 32 nibbles.

Precision: the (u - 8) / 256 are exact; the activations are rounded to fp16 (exact for bf16
and fp16 values in fp16's normal range, 2^-14 .. 65504; larger ones overflow, smaller ones
keep 2^-25 absolute); each product and add rounds once to fp16 (2^-11 relative) over at most
32 terms a thread, whose sum the /256 keeps below |x|max, so nothing past x's own conversion
overflows; fp32 takes over once a thread's words are summed. The caller multiplies the fp32
sums by 256 (SCALE) and the group's scale. At the 8B's shapes (bf16 x of magnitude 0.003 to
100, groups of 128) the fp16 sums move y by 3-5e-4 (WORDS 1, 2) to 6-8e-4 (WORDS 4) of max |y|,
under half of what the torch op's own bf16 rounding of each weight moves it (1.1-1.8e-3);
tests/ops/test_triton_int4_half2.py bounds the kernel against the torch op.

On NVIDIA GPUs the PTX runs; under the interpreter and on ROCm (`_common.unpack_by_ptx`) the
same operations in Triton: fp16 halves by bitcast, each fp16 operation computed exactly in
fp64 (a multiple of 2^-8 of at most 1/32 times an fp16 value, plus an fp16 value, spans fewer
than 53 bits) and rounded once to fp16, as the PTX rounds.
"""
from __future__ import annotations

import struct

import triton
import triton.language as tl

F16_MAGIC = 0x64006400         # fp16 1024, twice: OR-ed onto a field at bits 0-3 (4-7), 1024 + u (+ 16 u)
LO_MUL, LO_ADD = tl.constexpr(1 / 256), tl.constexpr(-4.03125)    # (1024 + u) / 256 - 4.03125 = (u - 8) / 256
HI_MUL, HI_ADD = tl.constexpr(1 / 4096), tl.constexpr(-0.28125)   # (1024 + 16 u) / 4096 - 0.28125 = (u - 8) / 256
SCALE = tl.constexpr(256.0)    # the sums are 1/256 of sum (u - 8) x


def f16_pair_bits(v: float) -> int:
    """The bits of the fp16 pair (v, v) (v exact in fp16)."""
    (half,) = struct.unpack("<H", struct.pack("<e", v))
    return half * 0x00010001


def _word_asm() -> str:
    """$0 = $6 + sum over q of (u_q - 8) / 256 * $(2 + q), as fp16 pairs (lanes q, q + 4): $1 the
    word, $2 .. $5 the activation pairs, $6 the running pair sum, $7 F16_MAGIC in a register
    (the mask is the LOP3's one immediate). The sum builds in `a`, written to $0 last, so that
    $0 may share a register with any input."""
    return "\n".join([
        "{", ".reg .b32 w8, p0, p1, p2, p3, a, ml, al, mh, ah;",
        f"mov.b32 ml, {f16_pair_bits(LO_MUL.value):#010x};", f"mov.b32 al, {f16_pair_bits(LO_ADD.value):#010x};",
        f"mov.b32 mh, {f16_pair_bits(HI_MUL.value):#010x};", f"mov.b32 ah, {f16_pair_bits(HI_ADD.value):#010x};",
        "lop3.b32 p0, $1, 0x000F000F, $7, 0xEA;", "lop3.b32 p1, $1, 0x00F000F0, $7, 0xEA;", "shr.u32 w8, $1, 8;",
        "lop3.b32 p2, w8, 0x000F000F, $7, 0xEA;", "lop3.b32 p3, w8, 0x00F000F0, $7, 0xEA;",
        "fma.rn.f16x2 p0, p0, ml, al;", "fma.rn.f16x2 p1, p1, mh, ah;",
        "fma.rn.f16x2 p2, p2, ml, al;", "fma.rn.f16x2 p3, p3, mh, ah;",
        "fma.rn.f16x2 a, p0, $2, $6;", "fma.rn.f16x2 a, p1, $3, a;",
        "fma.rn.f16x2 a, p2, $4, a;", "fma.rn.f16x2 a, p3, $5, a;", "mov.b32 $0, a;", "}"])


WORD_ASM = tl.constexpr(_word_asm())
SUM_ASM = tl.constexpr("{\n.reg .b16 l, h, s;\nmov.b32 {l, h}, $1;\nadd.rn.f16 s, l, h;\ncvt.f32.f16 $0, s;\n}")
PACK_ASM = tl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")     # fp32 $1, $2 -> the fp16 pair ($1 low)
# a bf16 pair $2 -> fp32 $0 (its low half) and $1 (its high half): a bf16 is an fp32's high 16 bits
BF16_ASM = tl.constexpr("{\nshl.b32 $0, $2, 16;\nand.b32 $1, $2, 0xFFFF0000;\n}")


@triton.jit
def _pack(lo, hi, ASM: tl.constexpr):
    """fp32 lo, hi -> the bits of the fp16 pair (lo, hi) (int32, lo in the low half)."""
    if ASM:
        return tl.inline_asm_elementwise(PACK_ASM, "=r,f,f", [lo, hi], dtype=tl.int32, is_pure=True, pack=1)
    return ((lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
            | (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16))


@triton.jit
def _lanes(t):
    """A [C, 8] tile of words' lanes -> its 8 columns [C]: lanes 0..3, then 4..7 (split in the
    loading thread's registers)."""
    lo, hi = tl.split(tl.permute(tl.reshape(t, [t.shape[0], 2, 4]), (0, 2, 1)))     # [C, 4]: lanes q, q + 4
    l02, l13 = tl.split(tl.reshape(lo, [t.shape[0], 2, 2]))
    h02, h13 = tl.split(tl.reshape(hi, [t.shape[0], 2, 2]))
    l0, l2 = tl.split(l02)
    l1, l3 = tl.split(l13)
    h0, h2 = tl.split(h02)
    h1, h3 = tl.split(h13)
    return l0, l1, l2, l3, h0, h1, h2, h3


@triton.jit
def x_pairs(x_ptr, offs_c, c_ok, EVEN: tl.constexpr, ASM: tl.constexpr):
    """The activations of the words offs_c [C] as the fp16 pairs of lanes (q, q + 4), q = 0..3
    (x[8c + q] in the low half; int32 bits [C] each), and their fp32 sum (for zero points). A
    word's 8 activations are one [C, 8] load (16 bytes a thread where aligned), split into
    lanes in the loading thread's registers: fp16 ones are the pairs' halves as they are, bf16
    ones widened to fp32 (by `BF16_ASM` on a GPU) and rounded in pairs (`_pack`)."""
    ptrs = x_ptr + 8 * offs_c[:, None] + tl.arange(0, 8)[None, :]
    if EVEN:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=c_ok[:, None], other=0.0)
    if x.dtype == tl.float16:
        l0, l1, l2, l3, h0, h1, h2, h3 = _lanes(x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
        return l0 | (h0 << 16), l1 | (h1 << 16), l2 | (h2 << 16), l3 | (h3 << 16), tl.sum(x.to(tl.float32), axis=1)
    if ASM and x.dtype == tl.bfloat16:      # two instructions a register of two (cvt takes a PRMT more)
        x = tl.inline_asm_elementwise(BF16_ASM, "=r,=r,r", [x], dtype=tl.float32, is_pure=True, pack=2)
    else:
        x = x.to(tl.float32)
    l0, l1, l2, l3, h0, h1, h2, h3 = _lanes(x)
    return _pack(l0, h0, ASM), _pack(l1, h1, ASM), _pack(l2, h2, ASM), _pack(l3, h3, ASM), tl.sum(x, axis=1)


@triton.jit
def _half(p, h: tl.constexpr):
    """Half h of the fp16 pair bits p, as fp64 (exact)."""
    return ((p >> (16 * h)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float64)


@triton.jit
def _f16(v):
    """An exact fp64 result rounded once to fp16 (round to nearest even), back in fp64."""
    return v.to(tl.float16).to(tl.float64)


@triton.jit
def _f16_bits(v):
    """fp64 holding an fp16 value -> its 16 bits (int32)."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _term(w, mask: tl.constexpr, mul: tl.constexpr, add: tl.constexpr, x, a, magic16, h: tl.constexpr):
    """One pair's half h: the field (w & mask | magic) unpacked to (u - 8) / 256, times x's half,
    plus a (fp16 values in fp64)."""
    return _f16(_f16(_half((w & mask) | magic16, h) * mul + add) * _half(x, h) + a)


@triton.jit
def _replay_half(w, x04, x15, x26, x37, acc, magic16, h: tl.constexpr):
    w8 = w >> 8         # (arithmetic, unlike shr.u32: the masks take bits 0-23 only)
    a = _term(w, 0x000F000F, LO_MUL, LO_ADD, x04, _half(acc, h), magic16, h)
    a = _term(w, 0x00F000F0, HI_MUL, HI_ADD, x15, a, magic16, h)
    a = _term(w8, 0x000F000F, LO_MUL, LO_ADD, x26, a, magic16, h)
    return _term(w8, 0x00F000F0, HI_MUL, HI_ADD, x37, a, magic16, h)


@triton.jit
def pairs_fma16(w, x04, x15, x26, x37, acc, magic16, ASM: tl.constexpr):
    """acc + the word w's (u - 8) / 256 times x, lanes q and q + 4 as one fp16 pair (int32 bits
    [C, R]); w [C, R]; x04 .. x37 the activation pairs (`x_pair` bits, [C, 1]); magic16:
    F16_MAGIC. By `WORD_ASM` with ASM, else its operations replayed."""
    if ASM:
        return tl.inline_asm_elementwise(WORD_ASM, "=r" + ",r" * 7, [w, x04, x15, x26, x37, acc, magic16],
                                         dtype=tl.int32, is_pure=True, pack=1)
    lo = _replay_half(w, x04, x15, x26, x37, acc, magic16, 0)
    hi = _replay_half(w, x04, x15, x26, x37, acc, magic16, 1)
    return _f16_bits(lo) | (_f16_bits(hi) << 16)


@triton.jit
def pair_sum16(acc, ASM: tl.constexpr):
    """fp32 [C, R]: the two halves of the fp16-pair sums acc added in fp16 (`SUM_ASM`)."""
    if ASM:
        return tl.inline_asm_elementwise(SUM_ASM, "=f,r", [acc], dtype=tl.float32, is_pure=True, pack=1)
    return _f16(_half(acc, 0) + _half(acc, 1)).to(tl.float32)


@triton.jit
def magic16_of(magic):
    """F16_MAGIC from the kernels' runtime `magic` (int4_gemm.MAGIC, 0x4B000000), so that it
    reaches the PTX in a register."""
    return ((magic >> 24) + 25) * 0x00010001 << 8
