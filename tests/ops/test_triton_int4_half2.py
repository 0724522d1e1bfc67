"""The W4A16 GEMV's packed fp16 arithmetic (ops/triton/int4_half2.py, launch settings DEQ 3 and
4): its PTX run instruction by instruction in Python against the Triton replay that the
interpreter and ROCm take, and the GEMV against the torch op (interpreted here; compiled at
the 8B's shapes on a GPU)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from deepserve.ops.int4 import pack_int4
from deepserve.ops.registry import resolve
from deepserve.ops.triton.int4_half2 import magic16_of, words_dot16


def _f16(v: float) -> float:
    return float(np.float64(v).astype(np.float16))


def _halves(bits: int) -> list[float]:
    return [float(np.array([(bits >> (16 * h)) & 0xFFFF], np.uint16).view(np.float16)[0]) for h in (0, 1)]


def _pair(lo: float, hi: float) -> int:
    return int(np.array([lo, hi], np.float16).view(np.uint32)[0])


def run_ptx(asm: str, args: list) -> float | int:
    """The PTX subset of int4_half2's blocks, executed: $0 is the result, $1.. the args (ints
    for .b32 / .r, floats for "f" operands); each fp16 operation exact in fp64 (every operand
    here spans < 53 bits), then rounded once to fp16 (nearest even), as the hardware rounds."""
    regs = {f"${i + 1}": a for i, a in enumerate(args)}

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
    return regs["$0"]


@triton.jit
def _replay_kernel(w_ptr, x_ptr, out_ptr, magic, C: tl.constexpr, TWO: tl.constexpr):
    c = tl.arange(0, C)
    wa = tl.load(w_ptr + 2 * c)[:, None]
    wb = tl.load(w_ptr + 2 * c + 1)[:, None]
    out = words_dot16(wa, wb, tl.load(x_ptr + 8 * c)[:, None], tl.load(x_ptr + 8 * c + 1)[:, None],
                      tl.load(x_ptr + 8 * c + 2)[:, None], tl.load(x_ptr + 8 * c + 3)[:, None],
                      tl.load(x_ptr + 8 * c + 4)[:, None], tl.load(x_ptr + 8 * c + 5)[:, None],
                      tl.load(x_ptr + 8 * c + 6)[:, None], tl.load(x_ptr + 8 * c + 7)[:, None],
                      magic16_of(magic), TWO, False)
    tl.store(out_ptr + c[:, None], out)


@pytest.mark.parametrize("words", [1, 2])
def test_half2_ptx_against_the_replay_and_the_exact_sum(triton_ops, cpu_only, words):
    """int4_half2's PTX (1 and 2 words a thread), run here instruction by instruction: with
    activations whose products and sums are exact in fp16 (multiples of 1/8 below 1), exactly
    sum (u - 8) x / 128 for every nibble value at every lane; with random bf16 activations
    (through the PTX's own fp32 -> fp16 pair conversion), bit for bit what the Triton replay
    (`words_dot16` without ASM: the interpreter's and ROCm's path) computes."""
    from deepserve.ops.triton.int4_gemm import MAGIC
    from deepserve.ops.triton.int4_half2 import F16_MAGIC, PACK_ASM, SCALE, dot_asm

    asm, n = dot_asm(words), 32
    g = torch.Generator().manual_seed(words)
    for exact in (True, False):
        u = torch.randint(0, 16, (n, 16), generator=g)
        u[0], u[1] = 0, 15
        u[2] = torch.arange(16)
        if exact:       # multiples of 1/8 below 1: every product and partial sum a multiple of 2^-10 below 1
            x = torch.randint(-7, 8, (n, 16), generator=g).double() / 8
        else:
            x = (torch.randn(n, 16, generator=g) * 3).bfloat16().double()
        x[:, 8 * words:] = 0
        word = [pack_int4(u[:, 8 * i:8 * i + 8], 1)[:, 0] for i in range(2)]
        pairs = [[run_ptx(PACK_ASM.value, [float(x[r, 8 * i + q]), float(x[r, 8 * i + q + 4])]) for i in range(2)
                  for q in range(4)] for r in range(n)]
        got = torch.tensor([run_ptx(asm, [int(word[i][r]) & 0xFFFFFFFF for i in range(words)]
                                    + pairs[r][:4 * words] + [F16_MAGIC]) for r in range(n)], dtype=torch.float64)
        if exact:
            want = ((u - 8).double() * x).sum(1) / SCALE.value
            assert torch.equal(got, want)
        else:
            words_in = torch.stack(word, 1).reshape(-1).contiguous()
            x_in = torch.tensor([p if p < 2 ** 31 else p - 2 ** 32 for r in range(n) for p in pairs[r]],
                                dtype=torch.int32)
            out = torch.empty(n, dtype=torch.float32)
            _replay_kernel[(1,)](words_in, x_in, out, MAGIC, C=n, TWO=words == 2)
            assert torch.equal(got.float(), out)
            want = ((u - 8).double() * x).sum(1) / SCALE.value
            assert (got - want).abs().max() <= 2 ** -8 * ((u - 8).abs().double() * x.abs()).sum(1).max() / SCALE.value


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


@pytest.mark.parametrize("deq", [3, 4])
@pytest.mark.parametrize("m,n,k,group,zeros,dtype,setting", [
    (1, 37, 256, 32, False, torch.bfloat16, {"SUB_C": 8, "STEPS": 1, "SPLIT_K": 1}),     # ragged N
    (2, 24, 200, 40, True, torch.float16, {"SUB_C": 4, "STEPS": 2, "SPLIT_K": 1}),       # 25 words, groups of 5: DEQ 4 takes 3
    (3, 40, 384, 64, True, torch.bfloat16, {"SUB_C": 4, "STEPS": 1, "SPLIT_K": 2}),      # split-K, the last split ragged
    (4, 19, 512, 128, False, torch.float16, {"SUB_C": 16, "STEPS": 1, "SPLIT_K": 1}),    # slices wider than K's words at DEQ 4
    (1, 16, 640, 128, True, torch.bfloat16, {"SUB_C": 8, "STEPS": 2, "SPLIT_K": 3}),
])
def test_int4_gemv_half2_matches_the_torch_op(triton_ops, cpu_only, monkeypatch, m, n, k, group, zeros, dtype,
                                              setting, deq):
    """DEQ 3 / 4 (interpreted: the replay of the PTX's fp16 operations) against the torch op, 1-4
    rows, ragged N and K, groups of 4 to 16 words, zero points, split-K, bias, nibbles 0 and 15:
    within the fp16 sums' rounding plus the reference's (its bf16 / fp16 weights and output):
    |err| <= 2^-8 (|y| + sum |w x|). DEQ 4 runs where its word pairs share a group and align."""
    from deepserve.ops.triton import int4_gemm
    from deepserve.ops.triton.launch_config import trying
    qweight, scales, z, g = _operands(n, k, group, zeros, m + n + k, dtype)
    x = (torch.randn(m, k, generator=g) * 2).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, None, group, bias).double()
    taken = []
    real = int4_gemm.gemv_deq
    monkeypatch.setattr(int4_gemm, "gemv_deq", lambda *a: taken.append(real(*a)) or taken[-1])
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": dict(setting, DEQ=deq, BLOCK_N=8)}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, z, None, group, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    assert taken == [4 if deq == 4 and k // 8 % 2 == 0 and group % 16 == 0 else 3]
    bound = 2 ** -8 * (want.abs() + _dequantized_l1(x, qweight, scales, z, group))
    assert ((got.double() - want).abs() <= bound).all(), (got.double() - want).abs().max()


def test_int4_gemv_half2_large_activations_and_fallbacks(triton_ops, cpu_only, monkeypatch):
    """Activations up to 3e4 (near fp16's range, which the fp16 pairs keep: the sums are 1/128 of
    sum (u - 8) x) stay finite and within the bound; fp32 activations take DEQ 1 (their fp16
    pairs would round them) and g_idx the lane-wise path, both the torch op's result within
    fp32 summation order."""
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
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": {"DEQ": 4, "SUB_C": 8, "STEPS": 1, "BLOCK_N": 8}}]):
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
    assert taken == [4, 1, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("deq", [3, 4])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_int4_gemv_half2_gpu_model_shapes(triton_ops, m, n, k, deq):
    """DEQ 3 / 4 compiled (the PTX) at the 8B's shapes, bf16, groups of 128, against the torch op."""
    from deepserve.ops.triton.launch_config import trying
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), generator=g, device="cuda",
                            dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(n, k // 128, generator=g, device="cuda") * 0.01 + 0.001).bfloat16()
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, 128).float()
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": {"DEQ": deq, "BLOCK_N": 8, "SUB_C": 128, "STEPS": 1,
                                                            "SPLIT_K": 1, "num_warps": 4}}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, None, None, 128).float()
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2e-3 * want.abs().max().item())
