"""The Triton block-scaled FP8 GEMM against the torch reference, under the CPU interpreter.

The interpreter (Triton 3.6) rounds fp32 -> e4m3 wrongly when rounding up crosses a power of
two (124.3 becomes 64, not 128); the kernels round with `_common.round_to_e4m3` before they
cast, so their e4m3 values are checked bit for bit here, and again compiled on a GPU
(tests/quant/test_serving.py, `gpu`).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from deepserve.ops.quant import quant_fp8_per_token_group
from deepserve.ops.registry import op_backends
from deepserve.ops.triton.fp8_half2 import quantized_row_pairs, quarters, row_pairs, word_fma16
from deepserve.ops.triton.int4_half2 import pair_sum16
from deepserve.ops.triton.launch_config import trying
from deepserve.quant.fp8 import quant_fp8_block


def test_fp8_kernel_registered(triton_ops):
    assert op_backends()["fp8_block_linear"] == ["torch", "triton"]


def _operands(m: int, n: int, k: int, seed: int):
    """x [m, k], its e4m3 quantization (q, s), an e4m3 weight [n, k] with row-expanded block
    scales, a bias, and the dequantized product plus bias (the reference)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    wq, grid = quant_fp8_block(torch.randn(n, k, generator=g) * 0.05)
    ws = grid.repeat_interleave(128, 0)[:n].contiguous()
    q, s = quant_fp8_per_token_group(x)
    bias = torch.randn(n, generator=g)
    want = ((q.float() * s.repeat_interleave(128, 1)[:, :k])
            @ (wq.float() * ws.repeat_interleave(128, 1)[:, :k]).t() + bias)
    return x, q, s, wq, ws, bias, want


def test_fp8_gemm_kernel_equals_dequantized_matmul(triton_ops, cpu_only):
    """Partial M/N tiles, K = 300 (a partial last 128-group), bias, fp32 and bf16 outputs."""
    _, q, s, wq, ws, bias, want = _operands(20, 72, 300, 0)
    y = triton_ops.quant_gemm.fp8_gemm(q, s, wq, ws, torch.float32, bias)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y16 = triton_ops.quant_gemm.fp8_gemm(q[:3], s[:3], wq, ws, torch.bfloat16)
    torch.testing.assert_close(y16.float(), (want - bias)[:3], rtol=1e-2, atol=1e-2)


def test_act_quant_kernel_scales_exact(triton_ops, cpu_only):
    """Scales and e4m3 values bit-identical to the torch quantization, ties that round up
    into the next power of two included (the kernel rounds with round_to_e4m3 before its
    cast: the interpreter's own cast gets those wrong)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 200, generator=g)
    x[0, :9] = torch.tensor([448.0, 124.3, 31.26, -15.9, 7.99, 0.0, 1e-3, -240.0, -1e-4])  # ties; -0.0
    q_ref, s_ref = quant_fp8_per_token_group(x)
    q, s = triton_ops.quant_gemm.act_quant_fp8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_fp8_gemv_kernel_equals_the_gemm_on_one_row(triton_ops, cpu_only, monkeypatch):
    """The one-row GEMV: partial row blocks (N = 70), K = 700 (a partial last 128-group and a
    partial step of 4 groups), bias, at two tiles, split over K (fp32 partials summed after) and
    pipelined, on a quantized row and quantizing the row itself (the op's one-row path); the op
    takes it for one row where the launch table (or DEEPSERVE_FP8_GEMV) says so, with the
    table's settings, and keeps the GEMM for more rows."""
    qg = triton_ops.quant_gemm
    x, q, s, wq, ws, bias, want = _operands(1, 70, 700, 2)
    for settings in ({}, {"BLOCK_N": 8, "GROUPS": 2, "num_warps": 2}, {"GROUPS": 1, "SPLIT_K": 3},
                     {"BLOCK_N": 2, "GROUPS": 2, "SPLIT_K": 2, "STAGES": 2}):
        for row, scales in ((q, s), (x, None), (x.to(torch.bfloat16), None)):
            y = qg.fp8_gemv(row, scales, wq, ws, torch.float32, bias, settings)
            if row.dtype == torch.bfloat16:     # the row's own rounding moves its quantization
                torch.testing.assert_close(y, want, rtol=0.05, atol=0.05)
            else:
                torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    calls, gemv = [], qg.fp8_gemv
    monkeypatch.setattr(qg, "fp8_gemv", lambda *a: calls.append((a[1] is None, a[-1])) or gemv(*a))
    monkeypatch.delenv(qg.FP8_GEMV_ENV, raising=False)
    rule = {"use": 1, "BLOCK_N": 2, "GROUPS": 1, "num_warps": 2, "SPLIT_K": 2, "STAGES": 2, "QUANT_IN": 1, "MMA": 0,
            "H2": 0}
    with trying("fp8_gemv", [{"if": {"n": 70, "k": 700}, "set": rule}]):
        y = qg.fp8_block_linear(x, wq, ws, bias)                 # one row: the table's GEMV settings
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    with trying("fp8_gemv", [{"if": {"n": 70, "k": 700}, "set": {**rule, "QUANT_IN": 0}}]):
        qg.fp8_block_linear(x, wq, ws, bias)                     # the activation quant kernel first
        qg.fp8_block_linear(torch.randn(2, 700), wq, ws)         # two: the GEMM
        monkeypatch.setenv(qg.FP8_GEMV_ENV, "0")
        qg.fp8_block_linear(x, wq, ws)                           # switched off by the environment
    with trying("fp8_gemv", [{"set": {"use": 0}}]):
        monkeypatch.setenv(qg.FP8_GEMV_ENV, "1")
        qg.fp8_block_linear(x, wq, ws)                           # switched on by the environment
        monkeypatch.delenv(qg.FP8_GEMV_ENV)
        qg.fp8_block_linear(x, wq, ws)                           # the table's GEMM
    table = {k: rule[k] for k in qg.GEMV_KEYS}
    # (the row quantized inside the GEMV, the settings)
    assert calls == [(True, table), (False, {**table, "QUANT_IN": 0}),
                     (True, {"BLOCK_N": 4, "GROUPS": 4, "num_warps": 4, "SPLIT_K": 1, "STAGES": 1, "QUANT_IN": 1,
                             "MMA": 0, "H2": 0})]


def test_fp8_gemv_on_tensor_cores_equals_the_dequantized_product(triton_ops, cpu_only):
    """MMA 1: the weight rows as the M side of the e4m3 product, the row padded to 16 columns:
    partial row blocks (N = 70 over 16- and 32-row programs), K = 700 (a partial last group),
    bias, split over K, on a quantized row and quantizing the row itself; through the op too."""
    qg = triton_ops.quant_gemm
    x, q, s, wq, ws, bias, want = _operands(1, 70, 700, 3)
    for settings in ({"BLOCK_N": 16}, {"BLOCK_N": 32, "SPLIT_K": 3, "STAGES": 2}):
        settings = {"MMA": 1, "num_warps": 4, **settings}
        for row, scales in ((q, s), (x, None)):
            y = qg.fp8_gemv(row, scales, wq, ws, torch.float32, bias, settings)
            torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    with trying("fp8_gemv", [{"set": {"use": 1, "MMA": 1, "BLOCK_N": 16, "QUANT_IN": 1}}]):
        torch.testing.assert_close(qg.fp8_block_linear(x, wq, ws, bias), want, rtol=1e-5, atol=1e-5)
    try:
        qg.fp8_gemv(q, s, wq, ws, torch.float32, settings={"MMA": 1, "BLOCK_N": 8})
        raise AssertionError("an 8-row MMA program was accepted")
    except ValueError as exc:
        assert "BLOCK_N >= 16" in str(exc)


def _h2_bound(q, s, wq, ws, want):
    """H2's worst-case error: 9 x 2^-11 of the products' absolute sum (8 fp16 adds a half and
    the halves' one a run), 2^-25 x 256 a product in fp16's subnormals, and fp32's own roundings."""
    k = q.shape[1]
    sums = ((q.float().abs() * s.repeat_interleave(128, 1)[:, :k])
            @ (wq.float().abs() * ws.repeat_interleave(128, 1)[:, :k]).t())
    tiny = k * 2.0 ** -17 * (s.max() * ws.max()).item()
    return 9 * 2.0 ** -11 * sums + tiny + 1e-5 * (1 + want.abs())


def test_fp8_gemv_in_packed_fp16_within_its_rounding_bound(triton_ops, cpu_only):
    """H2 1 (fp8_half2: each thread's 16 products of a row summed in fp16 pairs, then fp32):
    partial row blocks (N = 70), K = 700 (a partial last group and step), bias, two tiles,
    split over K, on a quantized row and quantizing the row itself; through the op's table too.
    Each run of 16 products rounds at most 9 times by 2^-11 of its products' absolute sum (8
    fp16 adds a half and the halves' one) plus 2^-25 (x 256) a product under fp16's normal
    range: the bound below, scaled by the block scales. K = 702 (not whole words) takes the
    byte-wise sums, exact."""
    qg = triton_ops.quant_gemm
    x, q, s, wq, ws, bias, want = _operands(1, 70, 700, 4)
    bound = _h2_bound(q, s, wq, ws, want)
    for settings, row, scales in (({"H2": 1}, q, s), ({"H2": 1, "BLOCK_N": 8, "GROUPS": 2, "num_warps": 2}, x, None),
                                  ({"H2": 1, "BLOCK_N": 2, "GROUPS": 1, "SPLIT_K": 3, "STAGES": 2}, q, s),
                                  ({"H2": 1, "BLOCK_N": 2, "GROUPS": 1, "SPLIT_K": 3}, x, None)):
        y = qg.fp8_gemv(row, scales, wq, ws, torch.float32, bias, settings)
        assert ((y - want).abs() <= bound).all(), (settings, (y - want).abs().max().item())
    with trying("fp8_gemv", [{"set": {"use": 1, "H2": 1, "QUANT_IN": 0}}]):
        y = qg.fp8_block_linear(x, wq, ws, bias)
        assert ((y - want).abs() <= bound).all()
    x, q, s, wq, ws, bias, want = _operands(1, 9, 702, 5)
    torch.testing.assert_close(qg.fp8_gemv(q, s, wq, ws, torch.float32, bias, {"H2": 1}), want, rtol=1e-5, atol=1e-5)


def test_fp8_gemv_in_packed_fp16_at_the_range_worst_case(triton_ops, cpu_only):
    _range_worst_case(triton_ops.quant_gemm, "cpu")


def _range_worst_case(qg, device: str):
    """Weights and row at e4m3's largest magnitude, 448: each product times 2^-8 is 784, a half's
    8 sum to 6272 and a run's 16 to 12544 (< 65504: finite and exact). A row of 448 and 1
    alternating (x 1 and 1/448) shows the fp16 rounding: a run of 8 x 784 and 8 x 1.75 sums to
    6272 + 14 = 6286, which fp16 (step 4 there) rounds to 6288, ties to even."""
    k = 256
    wq = torch.tensor([448.0, -448.0]).repeat_interleave(k).reshape(2, k).to(torch.float8_e4m3fn).to(device)
    ws = torch.ones(2, 2, device=device)
    for x, run in ((torch.ones(1, k), 12544.0), (torch.tensor([1.0, 1 / 448]).repeat(k // 2)[None], 6288.0)):
        x = x.to(device)
        q, s = quant_fp8_per_token_group(x)
        for row, scales in ((q, s), (x, None)):
            y = qg.fp8_gemv(row, scales, wq, ws, torch.float32, None, {"H2": 1, "BLOCK_N": 2, "GROUPS": 2})
            assert torch.isfinite(y).all()
            want = 16 * run * 256 * s[0, 0].item()      # 16 runs of 16 products, times 2^8 and the row's scale
            torch.testing.assert_close(y[0].cpu(), torch.tensor([want, -want]), rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(2112, 7168), (24576, 1536), (7168, 16384), (7168, 18432)])
def test_fp8_gemv_in_packed_fp16_gpu_r1_shapes(triton_ops, n, k):
    """H2 1 compiled (the PTX: cvt.rn.f16x2.e4m3x2, HFMA2) at R1's shapes, on a quantized row and
    quantizing the row itself, at the bench's tiles, within the packed sums' bound of the torch
    op; and the range worst case."""
    qg = triton_ops.quant_gemm
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, generator=g, device="cuda")
    wq, grid = quant_fp8_block(torch.randn(n, k, generator=g, device="cuda") * 0.02)
    ws = grid.repeat_interleave(128, 0)[:n].contiguous()
    q, s = quant_fp8_per_token_group(x)
    want = (q.float() * s.repeat_interleave(128, 1)[:, :k]) @ (wq.float() * ws.repeat_interleave(128, 1)[:, :k]).t()
    bound = _h2_bound(q, s, wq, ws, want)
    for tile in ({"BLOCK_N": 4, "GROUPS": 4, "num_warps": 4, "STAGES": 2}, {"BLOCK_N": 4, "GROUPS": 16, "num_warps": 4},
                 {"BLOCK_N": 8, "GROUPS": 8, "num_warps": 2}, {"BLOCK_N": 16, "GROUPS": 8, "num_warps": 4, "SPLIT_K": 4}):
        for row, scales in ((q, s), (x, None)):
            # the CUDA-core kernel whatever the device table picks for the shape (its MMA / split rules)
            y = qg.fp8_gemv(row, scales, wq, ws, torch.float32, None, {"H2": 1, "MMA": 0, "SPLIT_K": 1, **tile})
            assert ((y - want).abs() <= bound).all(), (tile, (y - want).abs().max().item())
    _range_worst_case(qg, "cuda")


def _f16_pair(lo: float, hi: float) -> int:
    return int(np.array([lo, hi], np.float16).view(np.uint32)[0])


def _f16_halves(bits: int) -> list[float]:
    return [float(np.array([(bits >> (16 * h)) & 0xFFFF], np.uint16).view(np.float16)[0]) for h in (0, 1)]


def _e4m3(byte: int) -> float:
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


def run_fp8_ptx(asm: str, args: list[int], outputs: int = 1):
    """fp8_half2's PTX executed: $0 .. $(outputs - 1) the results, the .b32 args after them;
    e4m3 bytes decoded by torch, each fp16 operation exact in fp64 then rounded once to fp16."""
    regs = {f"${i + outputs}": a for i, a in enumerate(args)}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):        # a register's 16-bit halves
            lo, hi, src = re.fullmatch(r"\{(\w+), (\w+)\}, (\S+)", rest).groups()
            regs[lo], regs[hi] = regs[src] & 0xFFFF, regs[src] >> 16
            continue
        d, *a = [t.strip() for t in rest.split(",")]
        val = [int(t, 16) if t.startswith("0x") else regs[t] for t in a]
        if op == "mov.b32":
            regs[d] = val[0]
        elif op == "cvt.rn.f16x2.e4m3x2":                 # the low byte to the low half
            regs[d] = _f16_pair(_e4m3(val[0] & 0xFF), _e4m3(val[0] >> 8))
        elif op in ("fma.rn.f16x2", "mul.rn.f16x2"):
            x, y = _f16_halves(val[0]), _f16_halves(val[1])
            exact = [x[h] * y[h] + _f16_halves(val[2])[h] if op.startswith("fma") else x[h] * y[h] for h in (0, 1)]
            regs[d] = _f16_pair(*(float(np.float64(v).astype(np.float16)) for v in exact))
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return regs["$0"] if outputs == 1 else [regs[f"${i}"] for i in range(outputs)]


@triton.jit
def _h2_replay_kernel(w_ptr, x_ptr, xf_ptr, pairs_ptr, run_ptr, sum_ptr, C: tl.constexpr):
    """The row's pairs from its words and from its fp32 values ([4, C, 4]: x01, x23 of each),
    and the fp16-pair run of C runs of 4 words (its bits and pair_sum16), by the replay."""
    c, j = tl.arange(0, C)[:, None], tl.arange(0, 4)[None, :]
    x01, x23 = row_pairs(tl.load(x_ptr + 4 * c + j)[None], False)
    f01, f23 = quantized_row_pairs(tl.load(xf_ptr + 16 * c[:, :, None] + 4 * j[:, :, None]
                                           + tl.arange(0, 4)[None, None, :])[None], False)
    tl.store(pairs_ptr + 4 * c + j, tl.reshape(x01, [C, 4]))
    tl.store(pairs_ptr + 4 * C + 4 * c + j, tl.reshape(x23, [C, 4]))
    tl.store(pairs_ptr + 8 * C + 4 * c + j, tl.reshape(f01, [C, 4]))
    tl.store(pairs_ptr + 12 * C + 4 * c + j, tl.reshape(f23, [C, 4]))
    w0, w1, w2, w3 = quarters(tl.load(w_ptr + 4 * c + j)[None])
    a0, a1, a2, a3 = quarters(x01)
    b0, b1, b2, b3 = quarters(x23)
    run = word_fma16(w0, a0, b0, tl.zeros([1, C], tl.int32), False)
    run = word_fma16(w1, a1, b1, run, False)
    run = word_fma16(w2, a2, b2, run, False)
    run = word_fma16(w3, a3, b3, run, False)
    tl.store(run_ptr + tl.arange(0, C), tl.reshape(run, [C]))
    tl.store(sum_ptr + tl.arange(0, C), tl.reshape(pair_sum16(run, False), [C]))


def test_fp8_half2_ptx_bit_for_bit_the_replay(triton_ops, cpu_only):
    """fp8_half2's PTX (ROW_ASM, WORD_ASM chained over a run of 4 words), run here instruction
    by instruction with torch's e4m3 decoding, gives the Triton replay's bits (the interpreter's
    and ROCm's path) for every finite e4m3 byte as a weight and as a row value (both signs,
    subnormals, 448); the row's pairs from its words equal those packed from its fp32 values."""
    from deepserve.ops.triton.fp8_half2 import ROW_ASM, WORD_ASM

    c = 64
    g = torch.Generator().manual_seed(6)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F])
    wb = torch.cat([finite, finite[torch.randint(0, len(finite), (c * 16,), generator=g)]])
    wb = wb[:c * 16].to(torch.uint8).reshape(c * 4, 4)
    xb = finite.flip(0).repeat(8)[:c * 16].to(torch.uint8).reshape(c * 4, 4)
    w_words, x_words = wb.view(torch.int32).reshape(-1), xb.view(torch.int32).reshape(-1)
    xf = xb.view(torch.float8_e4m3fn).float().reshape(-1)
    pairs = torch.zeros(4, c, 4, dtype=torch.int32)
    run, sums = torch.zeros(c, dtype=torch.int32), torch.zeros(c)
    _h2_replay_kernel[(1,)](w_words, x_words, xf, pairs, run, sums, C=c)
    assert torch.equal(pairs[0], pairs[2]) and torch.equal(pairs[1], pairs[3])
    for r in range(c):
        acc = 0
        for j in range(4):
            x01, x23 = run_fp8_ptx(ROW_ASM.value, [int(x_words[4 * r + j]) & 0xFFFFFFFF], outputs=2)
            assert (x01, x23) == (int(pairs[0, r, j]) & 0xFFFFFFFF, int(pairs[1, r, j]) & 0xFFFFFFFF)
            acc = run_fp8_ptx(WORD_ASM.value, [int(w_words[4 * r + j]) & 0xFFFFFFFF, x01, x23, acc])
        assert acc == int(run[r]) & 0xFFFFFFFF, r
        lo, hi = _f16_halves(acc)
        assert float(sums[r]) == float(np.float16(lo + hi))


def test_fp8_static_linear_takes_the_given_activation_scale(triton_ops, cpu_only, monkeypatch):
    """Static activation scale (a checkpoint's input_scale): the torch op is the format's rule
    (q = e4m3(clamp(x / s, -448, 448)), y = (q s) (w s_w)^T + b, values past 448 s saturating),
    and the Triton op (the block GEMM given that scale for every row and group) equals it."""
    from deepserve.ops.quant import fp8_static_linear
    assert op_backends()["fp8_static_linear"] == ["torch", "triton"]
    x, _, _, wq, ws, bias, _ = _operands(20, 72, 300, 3)
    s_in = torch.tensor([x.abs().amax().item() / 448 * 0.5])      # half the range: the largest saturate
    q = (x / s_in).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert (x.abs() > 448 * s_in).any() and q.float().abs().max() == 448
    want = (q.float() * s_in) @ (wq.float() * ws.repeat_interleave(128, 1)[:, :300]).t() + bias
    ref = fp8_static_linear(x, wq, ws, s_in, bias)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    got = triton_ops.quant_gemm.fp8_static_linear(x.reshape(4, 5, 300), wq, ws, s_in, bias)
    torch.testing.assert_close(got.reshape(20, 72), want, rtol=1e-5, atol=1e-5)
    for gemv in ("0", "1"):         # one row: the GEMM, or the GEMV given the scale
        monkeypatch.setenv("DEEPSERVE_FP8_GEMV", gemv)
        row = triton_ops.quant_gemm.fp8_static_linear(x[3:4], wq, ws, s_in, bias)
        torch.testing.assert_close(row, want[3:4], rtol=1e-5, atol=1e-5)
    # a dynamic quantization of the same rows gives other numbers: the scale is the one used
    assert (triton_ops.quant_gemm.fp8_block_linear(x, wq, ws, bias) - want).abs().max() > 1e-2


def test_fp8_weight_only_linear_is_the_dequantized_weight_times_the_rows(triton_ops, cpu_only):
    """W8A16 (compressed-tensors FP8 without input_activations): the torch op (the e4m3 weight
    dequantized to x's dtype, F.linear) and the Triton op (the block GEMM with the rows
    unquantized, the weight read as stored) equal x (q_w s_w)^T + b, partial tiles and a ragged
    last 128-group included; the dynamic W8A8 op is far from it."""
    from deepserve.ops.quant import fp8_weight_only_linear
    assert op_backends()["fp8_weight_only_linear"] == ["torch", "triton"]
    x, _, _, wq, ws, bias, _ = _operands(20, 72, 300, 4)
    want = x @ (wq.float() * ws.repeat_interleave(128, 1)[:, :300]).t() + bias
    torch.testing.assert_close(fp8_weight_only_linear(x, wq, ws, bias), want, rtol=1e-5, atol=1e-5)
    qg = triton_ops.quant_gemm
    got = qg.fp8_weight_only_linear(x.reshape(4, 5, 300), wq, ws, bias)
    torch.testing.assert_close(got.reshape(20, 72), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qg.fp8_weight_only_linear(x[3:4], wq, ws), want[3:4] - bias, rtol=1e-5, atol=1e-5)
    got16 = qg.fp8_weight_only_linear(x.bfloat16(), wq, ws, bias.bfloat16())
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), want, rtol=2e-2, atol=2e-2)
    assert (qg.fp8_block_linear(x, wq, ws, bias) - want).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("n,k", [(2112, 7168), (7168, 18432)])
def test_fp8_weight_only_linear_gpu_model_shapes(triton_ops, m, n, k):
    """The W8A16 op compiled at R1 shapes, bf16 rows, against x (q_w s_w)^T in fp32 on the same
    device: the MMA's products are exact (bf16 rows, e4m3 widened) and summed in fp32, so what
    is left is the output's bf16 rounding and the sum's order."""
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    wq, grid = quant_fp8_block(torch.randn(n, k, generator=g, device="cuda") * 0.02)
    ws = grid.repeat_interleave(128, 0)[:n].contiguous()
    w = wq.float() * ws.repeat_interleave(128, 1)[:, :k]
    want = x.float() @ w.t()
    got = triton_ops.quant_gemm.fp8_weight_only_linear(x, wq, ws)
    bound = 2 ** -8 * want.abs() + 1e-5 * (x.float().abs() @ w.abs().t())
    assert ((got.float() - want).abs() <= bound).all(), (got.float() - want).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("n,k", [(2112, 7168), (4096, 4096), (7168, 18432)])
def test_fp8_static_linear_gpu_model_shapes(triton_ops, m, n, k):
    """The static-scale op compiled (block GEMM, and the GEMV where the device table takes it at
    one row) at R1 / 8B shapes, against the format's rule on the same device: within the fp8
    tensor cores' accumulation bound (a few 2^-10 of the sum of |terms|)."""
    qg = triton_ops.quant_gemm
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g, device="cuda")
    wq, grid = quant_fp8_block(torch.randn(n, k, generator=g, device="cuda") * 0.02)
    ws = grid.repeat_interleave(128, 0)[:n].contiguous()
    s_in = torch.tensor([x.abs().amax().item() / 448 * 0.5], device="cuda")
    q = (x / s_in).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s_in
    w = wq.float() * ws.repeat_interleave(128, 1)[:, :k]
    bias = torch.randn(n, generator=g, device="cuda")
    want = q @ w.t() + bias
    bound = 4e-3 * (q.abs() @ w.abs().t()) + 1e-4
    got = qg.fp8_static_linear(x, wq, ws, s_in, bias)
    assert ((got.float() - want).abs() <= bound).all(), (got.float() - want).abs().max().item()
