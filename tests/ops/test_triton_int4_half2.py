"""The W4A16 GEMV's packed fp16 arithmetic (ops/triton/int4_half2.py, launch setting DEQ 3 with
WORDS 1, 2, 4): its PTX run instruction by instruction in Python against the Triton replay that
the interpreter and ROCm take, and the GEMV against the torch op (interpreted here; compiled
at the 8B's shapes on a GPU)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from deepserve.ops.int4 import pack_int4
from deepserve.ops.registry import resolve
from deepserve.ops.triton.int4_half2 import magic16_of, pair_sum16, pairs_fma16


def _f16(v: float) -> float:
    return float(np.float64(v).astype(np.float16))


def _halves(bits: int) -> list[float]:
    return [float(np.array([(bits >> (16 * h)) & 0xFFFF], np.uint16).view(np.float16)[0]) for h in (0, 1)]


def _pair(lo: float, hi: float) -> int:
    return int(np.array([lo, hi], np.float16).view(np.uint32)[0])


def run_ptx(asm: str, args: list, outputs: int = 1):
    """The PTX subset of int4_half2's blocks, executed: $0 .. $(outputs - 1) are the results
    (the first alone when outputs is 1), the args follow (ints for .b32 / "r", floats for "f"
    operands); each fp16 operation exact in fp64 (every operand here spans < 53 bits), then
    rounded once to fp16 (nearest even), as the hardware rounds."""
    regs = {f"${i + outputs}": a for i, a in enumerate(args)}

    def val(tok):
        return int(tok, 16) if tok.startswith("0x") else int(tok) if tok.isdigit() else regs[tok]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):        # a pair's halves into two .b16 registers
            lo, hi, src = re.fullmatch(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = _halves(val(src))
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        if op == "mov.b32":
            regs[d] = val(a[0])
        elif op == "lop3.b32":
            assert a[3] == "0xEA"                       # (a & b) | c
            regs[d] = (val(a[0]) & val(a[1])) | val(a[2])
        elif op == "shr.u32":
            regs[d] = (val(a[0]) & 0xFFFFFFFF) >> val(a[1])
        elif op == "shl.b32":
            regs[d] = (val(a[0]) << val(a[1])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[d] = val(a[0]) & val(a[1])
        elif op in ("fma.rn.f16x2", "mul.rn.f16x2"):
            x, y = _halves(val(a[0])), _halves(val(a[1]))
            z = _halves(val(a[2])) if op.startswith("fma") else [0.0, 0.0]
            regs[d] = _pair(*(_f16(x[h] * y[h] + z[h]) for h in (0, 1)))
        elif op == "add.rn.f16":
            regs[d] = _f16(regs[a[0]] + regs[a[1]])
        elif op == "cvt.f32.f16":
            regs[d] = float(np.float32(regs[a[0]]))
        elif op == "cvt.rn.f16x2.f32":               # d = {a (high half), b (low half)}
            regs[d] = _pair(_f16(val(a[1])), _f16(val(a[0])))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return regs["$0"] if outputs == 1 else [regs[f"${i}"] for i in range(outputs)]


@triton.jit
def _replay_kernel(w_ptr, x_ptr, out_ptr, magic, C: tl.constexpr, WORDS: tl.constexpr):
    """out[c] = pair_sum16 of the WORDS words w[c, :] times their x pairs x[c, 4 j + q] (no PTX)."""
    c = tl.arange(0, C)
    acc = tl.zeros([C, 1], tl.int32)
    for j in tl.static_range(WORDS):
        acc = pairs_fma16(tl.load(w_ptr + 4 * c + j)[:, None], tl.load(x_ptr + 16 * c + 4 * j)[:, None],
                          tl.load(x_ptr + 16 * c + 4 * j + 1)[:, None], tl.load(x_ptr + 16 * c + 4 * j + 2)[:, None],
                          tl.load(x_ptr + 16 * c + 4 * j + 3)[:, None], acc, magic16_of(magic), False)
    tl.store(out_ptr + c[:, None], pair_sum16(acc, False))


@pytest.mark.parametrize("words", [1, 4])
def test_half2_ptx_against_the_replay_and_the_exact_sum(triton_ops, cpu_only, words):
    """int4_half2's PTX (WORD_ASM chained over 1 and 4 words, SUM_ASM, PACK_ASM), run here
    instruction by instruction: with activations whose products and sums are exact in fp16
    (multiples of 1/8 below 1), exactly sum (u - 8) x / 256 for every nibble value at every
    lane; with random bf16 activations up to about 10 (through the PTX's fp32 -> fp16 pair
    conversion), bit for bit what the Triton replay (the interpreter's and ROCm's path)
    computes, and within the fp16 roundings of the exact sum."""
    from deepserve.ops.triton.int4_gemm import MAGIC
    from deepserve.ops.triton.int4_half2 import F16_MAGIC, PACK_ASM, SCALE, SUM_ASM, WORD_ASM

    n = 32
    g = torch.Generator().manual_seed(words)
    for exact in (True, False):
        u = torch.randint(0, 16, (n, 8 * words), generator=g)
        u[0], u[1] = 0, 15
        u[2, :8] = torch.arange(8)
        u[3, :8] = torch.arange(8, 16)
        if exact:
            x = torch.randint(-7, 8, (n, 8 * words), generator=g).double() / 8
        else:
            x = (torch.randn(n, 8 * words, generator=g) * 3).bfloat16().double()
        word = pack_int4(u, 1)                                           # [n, words]
        pairs = [[run_ptx(PACK_ASM.value, [float(x[r, 8 * j + q]), float(x[r, 8 * j + q + 4])]) for j in range(words)
                  for q in range(4)] for r in range(n)]
        got = []
        for r in range(n):
            acc = 0
            for j in range(words):
                acc = run_ptx(WORD_ASM.value, [int(word[r, j]) & 0xFFFFFFFF] + pairs[r][4 * j:4 * j + 4]
                              + [acc, F16_MAGIC])
            got.append(run_ptx(SUM_ASM.value, [acc]))
        got = torch.tensor(got, dtype=torch.float64)
        want = ((u - 8).double() * x).sum(1) / SCALE.value
        if exact:
            assert torch.equal(got, want)
            continue
        w_in = torch.zeros(n, 4, dtype=torch.int32)
        w_in[:, :words] = word
        x_in = torch.zeros(n, 16, dtype=torch.int64)
        x_in[:, :4 * words] = torch.tensor(pairs)
        out = torch.empty(n, dtype=torch.float32)
        _replay_kernel[(1,)](w_in, x_in.to(torch.int32), out, MAGIC, C=n, WORDS=words)
        assert torch.equal(got.float(), out)
        assert ((got - want).abs() <= 2 ** -9 * ((u - 8).abs().double() * x.abs()).sum(1) / SCALE.value).all()


def test_bf16_widening_ptx():
    """BF16_ASM (the activations' bf16 pairs widened to fp32 on a GPU), run here: each half of a
    register of two bf16 values comes out as that value in fp32, signs, zeros and extremes too."""
    from deepserve.ops.triton.int4_half2 import BF16_ASM
    g = torch.Generator().manual_seed(4)
    vals = torch.cat([torch.randn(62, generator=g) * 100, torch.tensor([-0.0, 3e38])]).bfloat16()
    bits = vals.view(torch.int16).to(torch.int64) & 0xFFFF
    for i in range(0, len(vals), 2):
        lo, hi = run_ptx(BF16_ASM.value, [int(bits[i] | (bits[i + 1] << 16))], outputs=2)
        got = torch.tensor([lo, hi], dtype=torch.int64).to(torch.int32).view(torch.float32)
        assert torch.equal(got.view(torch.int32), vals[i:i + 2].float().view(torch.int32))


def _operands(n, k, group, zeros, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 16, (n, k), generator=g)
    u[0], u[1] = 0, 15                       # every nibble 0, then 15 (the sign bit of each word set)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).to(dtype)
    z = torch.randint(0, 16, (n, k // group), generator=g).to(torch.uint8) if zeros else None
    return pack_int4(u, 1), scales, z, g


def _dequantized_l1(x, qweight, scales, z, group):
    """sum_k |w[n, k] x[m, k]| [M, N] of the exactly dequantized weights (fp64)."""
    n, kw = qweight.shape
    shifts = torch.arange(0, 32, 4)
    u = ((qweight.long()[:, :, None] >> shifts) & 15).reshape(n, 8 * kw).double()
    zz = (z.double() if z is not None else torch.full_like(scales, 8, dtype=torch.float64))
    w = (u - zz.repeat_interleave(group, 1)) * scales.double().repeat_interleave(group, 1)
    return x.double().abs() @ w.abs().T


@pytest.mark.parametrize("words", [1, 2, 4])
@pytest.mark.parametrize("m,n,k,group,zeros,dtype,setting", [
    (1, 37, 256, 32, False, torch.bfloat16, {"SUB_C": 8, "STEPS": 1, "SPLIT_K": 1}),     # ragged N
    (2, 24, 200, 40, True, torch.float16, {"SUB_C": 4, "STEPS": 2, "SPLIT_K": 1}),       # 25 words, groups of 5: WORDS 1
    (3, 20, 384, 64, True, torch.bfloat16, {"SUB_C": 4, "STEPS": 1, "SPLIT_K": 2}),      # split-K, the last split ragged
    (4, 19, 512, 128, False, torch.float16, {"SUB_C": 16, "STEPS": 1, "SPLIT_K": 1}),    # slices wider than K's words
    (2, 12, 336, 48, False, torch.bfloat16, {"SUB_C": 4, "STEPS": 1, "SPLIT_K": 1}),     # 42 words, groups of 6: WORDS <= 2
    (1, 16, 640, 128, True, torch.bfloat16, {"SUB_C": 8, "STEPS": 2, "SPLIT_K": 3}),
])
def test_int4_gemv_half2_matches_the_torch_op(triton_ops, cpu_only, monkeypatch, m, n, k, group, zeros, dtype,
                                              setting, words):
    """DEQ 3 with 1, 2, 4 words a thread (interpreted: the replay of the PTX's fp16 operations)
    against the torch op, 1-4 rows, ragged N and K (a thread's last words past K), groups of 4
    to 16 words, zero points, split-K, bias, nibbles 0 and 15: within the fp16 sums' rounding
    plus the reference's (its 16-bit weights and output): |err| <= 2^-8 (|y| + sum |w x|).
    WORDS takes 1 where a thread's words would straddle groups or a row has odd words."""
    from deepserve.ops.triton import int4_gemm
    from deepserve.ops.triton.launch_config import trying
    qweight, scales, z, g = _operands(n, k, group, zeros, m + n + k, dtype)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, None, group, bias).double()
    taken = []
    real = int4_gemm.gemv_deq
    monkeypatch.setattr(int4_gemm, "gemv_deq", lambda *a: taken.append(real(*a)) or taken[-1])
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": dict(setting, DEQ=3, WORDS=words, BLOCK_N=8)}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, z, None, group, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    assert taken == [(3, words if k // 8 % 2 == 0 and group % (8 * words) == 0 else 1)]
    bound = 2 ** -8 * (want.abs() + _dequantized_l1(x, qweight, scales, z, group))
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()


def test_int4_gemv_half2_large_activations_and_fallbacks(triton_ops, cpu_only, monkeypatch):
    """Activations up to 3e4 (near fp16's range, which the fp16 pairs keep: the sums are 1/256 of
    sum (u - 8) x) stay finite and within the bound; fp32 activations take DEQ 1 (their fp16
    pairs would round them) and g_idx the lane-wise path, both the torch op's result within
    fp32 summation order; WORDS other than 1, 2, 4 is refused."""
    from deepserve.ops.triton import int4_gemm
    from deepserve.ops.triton.launch_config import trying
    n, k, group = 24, 256, 64
    qweight, scales, _, g = _operands(n, k, group, False, 1, torch.bfloat16)
    x = torch.randn(2, k, generator=g)
    x[:, ::7] *= 3e4 / x[:, ::7].abs().max()
    x = x.bfloat16()
    taken = []
    real = int4_gemm.gemv_deq
    monkeypatch.setattr(int4_gemm, "gemv_deq", lambda *a: taken.append(real(*a)) or taken[-1])
    op, ref = resolve("int4_linear", "triton")[1], resolve("int4_linear", "torch")[1]
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": {"DEQ": 3, "WORDS": 4, "SUB_C": 8, "STEPS": 1,
                                                            "BLOCK_N": 8}}]):
        got = op(x, qweight, scales, None, None, group).double()
        want = ref(x, qweight, scales, None, None, group).double()
        assert torch.isfinite(got).all()
        assert ((got - want).abs() <= 2 ** -8 * (want.abs() + _dequantized_l1(x, qweight, scales, None, group))).all()
        x32, s32 = torch.randn(1, k, generator=g), scales.float()
        torch.testing.assert_close(op(x32, qweight, s32, None, None, group), ref(x32, qweight, s32, None, None, group),
                                   rtol=1e-5, atol=1e-5)
        gi = (torch.randperm(k, generator=g) // group).int()
        torch.testing.assert_close(op(x32, qweight, s32, None, gi, group), ref(x32, qweight, s32, None, gi, group),
                                   rtol=1e-5, atol=1e-5)
    assert taken == [(3, 4), (1, 1), (1, 1)]
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": {"DEQ": 3, "WORDS": 3}}]):
        with pytest.raises(ValueError, match="WORDS must be 1, 2 or 4, got 3"):
            op(x, qweight, scales, None, None, group)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [{"WORDS": 1, "SUB_C": 128, "SPLIT_K": 1}, {"WORDS": 2, "SUB_C": 128, "SPLIT_K": 1},
                                     {"WORDS": 4, "SUB_C": 128, "SPLIT_K": 1}, {"WORDS": 4, "SUB_C": 64, "SPLIT_K": 2},
                                     {"WORDS": 2, "SUB_C": 64, "SPLIT_K": 4, "MERGE": 1}])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_int4_gemv_half2_gpu_model_shapes(triton_ops, m, n, k, setting):
    """DEQ 3 compiled (the PTX) at the 8B's shapes, bf16, groups of 128, against the torch op; split-K
    summed after the launch and merged by the last split (MERGE: atomics at GPU scope)."""
    from deepserve.ops.triton.launch_config import trying
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), generator=g, device="cuda",
                            dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(n, k // 128, generator=g, device="cuda") * 0.01 + 0.001).bfloat16()
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, 128).float()
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": dict(setting, DEQ=3, BLOCK_N=8, STEPS=1,
                                                                num_warps=setting["SUB_C"] // 32)}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, None, None, 128).float()
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("setting", [{"AHEAD": 1, "SPLIT_K": 2}, {"TILED": 1, "SPLIT_K": 1}])
def test_int4_gemv_half2_ahead_and_tiled(triton_ops, cpu_only, monkeypatch, setting):
    """DEQ 3 with each slice's words loaded a slice ahead (AHEAD) and over tile_words' layout
    (TILED): one word a thread (WORDS 4 asked, 1 taken), the torch op's result within the bound."""
    from deepserve.ops.triton import int4_gemm
    from deepserve.ops.triton.launch_config import trying
    n, k, group = 20, 384, 64
    qweight, scales, z, g = _operands(n, k, group, True, 9, torch.bfloat16)
    x = torch.randn(2, k, generator=g).bfloat16()
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, None, group, None).double()
    taken = []
    real = int4_gemm.gemv_deq
    monkeypatch.setattr(int4_gemm, "gemv_deq", lambda *a: taken.append(real(*a)) or taken[-1])
    cfg = {"DEQ": 3, "WORDS": 4, "BLOCK_N": 8, "SUB_C": 4, "STEPS": 1, "SPLIT_K": setting["SPLIT_K"],
           "AHEAD": setting.get("AHEAD", 0)}
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": cfg}]):
        tiled = int4_gemm.tile_words(qweight, 8, 4) if setting.get("TILED") else None
        got = int4_gemm.int4_gemv(x, qweight, scales, z, None, group, None, tiled=tiled).double()
    assert taken == [(3, 1)]
    assert ((got - want).abs() <= 2 ** -8 * (want.abs() + _dequantized_l1(x, qweight, scales, z, group))).all()
