"""The W4A16 Triton kernels (split-K GEMV for up to 4 rows, tiled GEMM beyond) against the
torch reference ops.int4_linear, interpreted on CPU at tiny sizes: masked edges (N not a
multiple of the row block, K not a multiple of the K step), one-group and per-element scale
reads, zero points, act-order g_idx, channel scales, bias, fp32 and bf16 activations."""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.int4 import pack_int4
from deepserve.ops.registry import resolve

CASES = [  # (N, K, group, zeros, g_idx)
    (40, 64, 32, True, False),     # K steps inside one group
    (37, 96, 32, False, False),    # symmetric, N and K ragged against the blocks
    (24, 200, 40, True, False),    # groups straddle K steps: per-element scale reads
    (16, 128, 128, True, False),   # channel scales (one group)
    (33, 128, 32, True, True),     # act-order g_idx
]


def _operands(n, k, group, zeros, g_idx, seed):
    g = torch.Generator().manual_seed(seed)
    groups = k // group
    u = torch.randint(0, 16, (n, k), generator=g)
    qweight = pack_int4(u, 1)
    scales = (torch.rand(n, groups, generator=g) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8) if zeros else None
    gi = (torch.randperm(k, generator=g) // group).int() if g_idx else None
    return qweight, scales, z, gi


@pytest.fixture(params=[True, False], ids=["block_ptrs", "pointer_tensors"])
def block_ptrs(request, monkeypatch):
    """Both ways the W4A8 and MMA kernels step their tiles along K (`_common.BLOCK_PTRS`): block
    pointers where this Triton has them (before 3.9), pointer tensors with a row mask always."""
    from deepserve.ops.triton import _common
    if request.param and not _common.BLOCK_PTRS:
        pytest.skip(f"Triton {_common.triton.__version__} has no block pointers")
    monkeypatch.setattr(_common, "BLOCK_PTRS", request.param)
    return request.param


@pytest.mark.parametrize("m", [1, 20])
@pytest.mark.parametrize("n,k,group,zeros,g_idx", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernels_match_the_torch_op(triton_ops, cpu_only, m, n, k, group, zeros, g_idx, dtype):
    qweight, scales, z, gi = _operands(n, k, group, zeros, g_idx, seed=n * k + m)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if n % 2 == 0 else None
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, gi, group, bias)
    got = resolve("int4_linear", "triton")[1](x, qweight, scales, z, gi, group, bias)
    assert got.shape == want.shape == (m, n) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:   # same bf16 weights, fp32 sums in another order, one bf16 rounding
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2e-2)


def test_int4_kernel_leading_dims_and_empty_batch(triton_ops, cpu_only):
    qweight, scales, z, gi = _operands(16, 64, 32, True, False, seed=5)
    x = torch.randn(2, 1, 64)
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, gi, 32)
    got = resolve("int4_linear", "triton")[1](x, qweight, scales, z, gi, 32)
    assert got.shape == (2, 1, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    empty = resolve("int4_linear", "triton")[1](torch.zeros(0, 64), qweight, scales, z, gi, 32)
    assert empty.shape == (0, 16)


@pytest.mark.parametrize("setting", [{"SWAP_AB": 0}, {"SWAP_AB": 1, "OVERLAP": 0}, {"SWAP_AB": 1, "OVERLAP": 1}])
@pytest.mark.parametrize("m,n,k,group,zeros", [(1, 40, 64, 32, True), (20, 37, 128, 128, False),
                                               (5, 24, 96, 32, True), (3, 16, 192, 64, False),
                                               (17, 40, 256, 64, False), (18, 40, 256, 256, False)])
def test_w4a8_int8_dot_kernel_matches_the_torch_op(triton_ops, cpu_only, block_ptrs, m, n, k, group, zeros, setting):
    """Both W4A8 kernels (weights as the dot's second operand; symmetric weights also as its first,
    unpacked in parity order against parity-ordered activations, rescaled in the same step or
    the next) against the torch op: rows and columns past a tile's edge, several K steps, bias;
    nibbles 0 and 15 in the first two rows; one group over K (channel scales: one int32 sum
    over K, rescaled once). Zero points always take the first kernel."""
    from deepserve.ops.triton.launch_config import trying
    qweight, scales, z, _ = _operands(n, k, group, zeros, False, seed=m + n)
    qweight[0], qweight[1] = 0, -1
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g) * 3
    bias = torch.randn(n, generator=g) if zeros or m > 10 else None
    want = resolve("w4a8_linear", "torch")[1](x, qweight, scales, z, None, group, bias)
    with trying("int4", [{"if": {"kernel": "w4a8"}, "set": setting}]):
        got = resolve("w4a8_linear", "triton")[1](x, qweight, scales, z, None, group, bias)
    assert got.shape == want.shape == (m, n)
    # exact int32 group sums on both sides; only the fp32 rescaling order differs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_w4a8_parity_asm_and_quant_lane_order(triton_ops, cpu_only):
    """The weights-first kernel's PTX unpack (w4a8_gemm._PARITY_ASM, GPU only), replayed in Python,
    gives 16 (u - 8) of nibbles 0, 2, 4, 6 (shift 4) and 1, 3, 5, 7 (shift 0) for every nibble
    value; the activations' parity order (quant_rows_int8(parity_lanes=True)) is the same
    permutation of each 8 columns, with the same values and scales as the plain order."""
    from deepserve.ops.triton.moe_int8 import quant_rows_int8
    from deepserve.ops.triton.w4a8_gemm import _PARITY_ASM
    asm = _PARITY_ASM.value
    assert all(c in asm for c in ("shl.b32 t, $1, $5", "0xF0F0F0F0", "0x80808080"))

    def unpack(word, shift):
        r = ((((word & 0xFFFFFFFF) << shift) & 0xFFFFFFFF) & 0xF0F0F0F0) ^ 0x80808080
        return [((r >> (8 * i)) & 0xFF) - 256 * (((r >> (8 * i)) & 0xFF) >= 128) for i in range(4)]

    g = torch.Generator().manual_seed(5)
    for _ in range(64):
        nib = torch.randint(0, 16, (8,), generator=g).tolist()
        word = sum(n << (4 * i) for i, n in enumerate(nib))
        assert unpack(word, 4) + unpack(word, 0) == [16 * (nib[2 * j + h] - 8) for h in (0, 1) for j in range(4)]
    x = torch.randn(3, 40, generator=g)
    q, s = quant_rows_int8(x)
    qp, sp = quant_rows_int8(x, parity_lanes=True)
    assert torch.equal(s, sp)
    assert torch.equal(qp, q.view(3, 5, 4, 2).transpose(2, 3).reshape(3, 40))


def _gpu_operands(m: int, n: int, k: int):
    """A seeded CUDA generator and random packed words [n, k / 8], bf16 scales in groups of 128
    and bf16 activations [m, k] (model-shape GPU tests)."""
    g = torch.Generator(device="cuda").manual_seed(n + k + m)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (n, k // 8), generator=g, device="cuda",
                            dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(n, k // 128, generator=g, device="cuda") * 0.01 + 0.001).bfloat16()
    return g, qweight, scales, torch.randn(m, k, generator=g, device="cuda").bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 64, 1024])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (7168, 16384)])
def test_int4_kernels_gpu_model_shapes(triton_ops, m, n, k):
    g, qweight, scales, x = _gpu_operands(m, n, k)
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, 128).float()
    got = resolve("int4_linear", "triton")[1](x, qweight, scales, None, None, 128).float()
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2e-3 * want.abs().max().item())
    want = resolve("w4a8_linear", "torch")[1](x, qweight, scales, None, None, 128).float()
    got = resolve("w4a8_linear", "triton")[1](x, qweight, scales, None, None, 128).float()
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2e-3 * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [{"MMA": 1, "MMA_BLOCK_N": 64, "MMA_WARPS": 4},
                                     {"MMA": 1, "MMA_BLOCK_N": 256, "MMA_WARPS": 8}])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (200, 4096)])
def test_int4_gemv_mma_gpu_model_shapes(triton_ops, m, n, k, setting):
    """The GEMV's tensor-core path compiled (PTX unpack, bf16x2 scale) at model shapes."""
    from deepserve.ops.triton.launch_config import trying
    g, qweight, scales, x = _gpu_operands(m, n, k)
    bias = torch.randn(n, generator=g, device="cuda").bfloat16()
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, 128, bias).float()
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": setting}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, None, None, 128, bias).float()
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("deq,ahead", [(1, 0), (2, 0), (1, 1)])
@pytest.mark.parametrize("split,zeros,group,words", [(1, True, 32, 4), (1, False, 64, 4), (3, True, 32, 4),
                                                     (1, True, 32, 8), (2, False, 24, 8), (1, True, 64, 16),
                                                     (2, True, 48, 2), (1, False, 192, 32)])
def test_int4_gemv_split_and_direct_store(triton_ops, cpu_only, split, zeros, group, words, deq, ahead):
    """The GEMV without split-K (output, bias and rounding written by the kernel) and with two or
    three K splits (fp32 partial sums, the last split ragged); slices inside one group, spanning
    several (groups of 3, 4, 6, 8 words), wider than K's 24 words (masked words) and of the
    minimum two words; 24 rows, so the second block of 16 repeats its last row for the rows past
    N; zero points (subtracted as z times x summed over each word) and symmetric (8 folded into
    the lanes); nibbles 0 and 15 at every lane position: the torch op's result within fp32
    summation order. DEQ 2 (lane pairs read with their 2^23 offsets, taken out once a word):
    the same, within the offsets' fp32 rounding (about 2^-16 of the terms). AHEAD (each slice's
    words loaded one slice ahead, the load past the split's end masked): the same."""
    from deepserve.ops.triton.launch_config import trying
    n, k = 24, 192
    qweight, scales, z, _ = _operands(n, k, group, zeros, False, seed=split + group)
    qweight[0] = 0                      # every nibble 0 ...
    qweight[1] = -1                     # ... and 15 (the sign bit set)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, k, generator=g)
    bias = torch.randn(n, generator=g)
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, None, group, bias)
    setting = {"SPLIT_K": split, "SUB_C": words, "STEPS": 1, "DEQ": deq, "AHEAD": ahead}
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": setting}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, z, None, group, bias)
    tol = 1e-5 if deq == 1 else 1e-4
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    print(f"deq {deq}: max abs error {(got - want).abs().max():.2e} of max |y| {want.abs().max():.2f}")


def test_tile_words_layout():
    """tile_words: row blocks, each its slices one after another, a word's rows adjacent; rows
    and words past the matrix zero."""
    from deepserve.ops.triton.int4_gemm import tile_words
    w = torch.arange(5 * 6, dtype=torch.int32).view(5, 6) + 1
    t = tile_words(w, 2, 4)                                  # 3 row blocks, 2 slices of 4 words
    assert t.shape == (3, 2 * 4 * 2)
    for r in range(6):
        for c in range(8):
            want = w[r, c].item() if r < 5 and c < 6 else 0
            assert t[r // 2, ((c // 4) * 4 + c % 4) * 2 + r % 2].item() == want


@pytest.mark.parametrize("setting", [{"BLOCK_N": 4, "SUB_C": 4, "STEPS": 2, "SPLIT_K": 1, "DEQ": 1},
                                     {"BLOCK_N": 8, "SUB_C": 8, "STEPS": 1, "SPLIT_K": 2, "DEQ": 2},
                                     {"BLOCK_N": 4, "SUB_C": 16, "STEPS": 1, "SPLIT_K": 1, "DEQ": 1},
                                     {"BLOCK_N": 4, "SUB_C": 8, "STEPS": 1, "SPLIT_K": 2, "DEQ": 2, "AHEAD": 1}])
@pytest.mark.parametrize("n,k,group,zeros,g_idx", [CASES[1], CASES[2], CASES[4]])
def test_int4_gemv_reads_tiled_words(triton_ops, cpu_only, setting, n, k, group, zeros, g_idx):
    """The GEMV over the words as tile_words lays them out (TILED): the torch op's result, with
    ragged rows and K slices (masked), split-K, DEQ 2, per-element scales and g_idx; a layout
    made for another setting is refused by shape."""
    from deepserve.ops.triton.int4_gemm import gemv_slice_words, int4_gemv, tile_words
    from deepserve.ops.triton.launch_config import trying
    qweight, scales, z, gi = _operands(n, k, group, zeros, g_idx, seed=n + k)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(3))
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, z, gi, group, None)
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": setting}]):
        sub = gemv_slice_words(setting, qweight.shape[1])
        got = int4_gemv(x, qweight, scales, z, gi, group, None, tiled=tile_words(qweight, setting["BLOCK_N"], sub))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        with pytest.raises(ValueError, match="tiled words of shape"):
            int4_gemv(x, qweight, scales, z, gi, group, None, tiled=tile_words(qweight, 2 * setting["BLOCK_N"], sub))


def test_nibble_lanes_and_slice_words():
    """The lane order the kernels rely on (lo lane q of word c = feature 8c + q, hi = 8c + 4 + q)
    is ops.int4's packing order; slice_words' scale reads per K slice (row, word or lane)."""
    from deepserve.ops.triton.int4_gemm import LANE, ROW, WORD, slice_words
    u = torch.arange(16).repeat(3)[None, :]                  # features 0..47, nibble = feature % 16
    word = pack_int4(u, 1)[0]
    for c in range(6):
        w = int(word[c]) & 0xFFFFFFFF
        for q in range(4):
            assert (w >> (4 * q)) & 15 == (8 * c + q) % 16
            assert (w >> (16 + 4 * q)) & 15 == (8 * c + 4 + q) % 16
    assert slice_words(4096, 128, False, 16) == (16, ROW)         # 128-wide slices in 128-wide groups
    assert slice_words(4096, 4096, False, 64) == (64, ROW)        # channel scales: one group
    assert slice_words(4096, 128, False, 64) == (64, WORD)        # 4 groups a slice: one scale a word
    assert slice_words(200, 40, False, 32) == (32, WORD)          # groups straddle slices, whole words
    assert slice_words(96, 12, False, 4) == (4, LANE)             # groups split words
    assert slice_words(4096, 128, True, 16) == (16, LANE)         # g_idx: per lane


def test_w4a8_unpack_asm_byte_arithmetic():
    """The W4A8 kernel's PTX unpack (w4a8_gemm._UNPACK_ASM, run only on a GPU), replayed in
    Python instruction by instruction (prmt: byte i of the result is byte selector[i] of the
    pair {b, a}, a's bytes first), gives u - z as int8 for every nibble at every lane position
    and every zero point; the interpreter runs the join-based unpack instead."""
    from deepserve.ops.triton.w4a8_gemm import _UNPACK_ASM
    asm = _UNPACK_ASM.value
    assert all(c in asm for c in ("shl.b32 t, $5, 2", "0x0F0F", "0x5140", "add.u32 t, t, $9", "0x80808080"))

    def prmt(a, b, sel):
        pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
        return sum(pool[(sel >> (4 * i)) & 0x7] << (8 * i) for i in range(4))

    def unpack(word, lane0, z):
        t = (word & 0xFFFFFFFF) >> ((lane0 << 2) & 31)
        e = t & 0x0F0F
        o = (t >> 4) & 0x0F0F
        t = prmt(e, o, 0x5140)
        t = (t + (128 - z) * 0x01010101) & 0xFFFFFFFF
        r = t ^ 0x80808080
        return [((r >> (8 * i)) & 0xFF) - 256 * (((r >> (8 * i)) & 0xFF) >= 128) for i in range(4)]

    g = torch.Generator().manual_seed(3)
    for _ in range(64):
        nib = torch.randint(0, 16, (8,), generator=g).tolist()
        word = sum(n << (4 * i) for i, n in enumerate(nib))
        for z in range(16):
            assert unpack(word, 0, z) + unpack(word, 4, z) == [n - z for n in nib]


def test_w4a8_ptx_unpack_only_on_nvidia(monkeypatch):
    """The PTX unpack is chosen on an NVIDIA build only: a ROCm build of torch (its GPUs also
    report device type "cuda") and the interpreter take the join-based unpack."""
    import deepserve.ops.triton._common as w4a8
    monkeypatch.setattr(w4a8, "interpreting", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert w4a8.unpack_by_ptx()
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    assert not w4a8.unpack_by_ptx()
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(w4a8, "interpreting", lambda: True)
    assert not w4a8.unpack_by_ptx()


@pytest.mark.parametrize("m,n,k,group", [(1, 48, 256, 128), (3, 40, 384, 64), (2, 70, 256, 256), (4, 16, 128, 128)])
def test_int4_gemv_mma_path_matches_the_torch_op(triton_ops, cpu_only, block_ptrs, m, n, k, group):
    """The GEMV's tensor-core path (launch setting MMA 1, int4_mma.py): bf16 weights (u - 8) * s
    unpacked in pair order against pair-ordered activations, rows padded to 16, ragged last tile,
    bias, nibbles 0 and 15: the torch op's output within bf16 rounding (same weights, fp32 sums
    in another order). Zero points, g_idx and fp32 activations keep the CUDA-core GEMV."""
    from deepserve.ops.triton import int4_mma
    from deepserve.ops.triton.launch_config import trying
    qweight, scales, _, _ = _operands(n, k, group, False, False, seed=n + k)
    qweight[0], qweight[1] = 0, -1
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    scales = scales.bfloat16()
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, group, bias).float()
    calls = []
    real = int4_mma.int4_mma
    with trying("int4", [{"if": {"kernel": "gemv"}, "set": {"MMA": 1, "MMA_BLOCK_N": 32}}]), \
            pytest.MonkeyPatch.context() as mp:
        import deepserve.ops.triton.int4_gemm as gemm
        mp.setattr(gemm, "int4_mma", lambda *a: calls.append(1) or real(*a))
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, None, None, group, bias).float()
        assert calls, "the MMA path did not run"
        assert int4_mma.mma_block_k(x.float(), None, None, group) is None
    # bf16 outputs (the reference rounds the product and adds the bias in bf16): two ulps
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-2 * want.abs().max().item())


def test_int4_mma_pair_asm_values():
    """The MMA path's PTX unpack (int4_mma._PAIR_ASM, GPU only), replayed in Python: lanes q and
    q + 4 of a word as the bf16 pair (u - 8) for every nibble value (shift 4q, mask, OR with bf16
    128's bits, minus bf16 136)."""
    import struct

    from deepserve.ops.triton.int4_mma import _PAIR_ASM, BF16_128_PAIR
    asm = _PAIR_ASM.value
    assert all(c in asm for c in ("shr.u32 t, $1, $3", "0x000F000F", "0xEA", "0x43084308", "sub.rn.bf16x2"))

    def bf16(bits):
        return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]

    g = torch.Generator().manual_seed(9)
    for _ in range(64):
        nib = torch.randint(0, 16, (8,), generator=g).tolist()
        word = sum(n << (4 * i) for i, n in enumerate(nib))
        for q in range(4):
            t = (word >> (4 * q)) & 0x000F000F | BF16_128_PAIR      # lop3 0xEA: (a & b) | c
            assert [bf16(t) - 136.0, bf16(t >> 16) - 136.0] == [nib[q] - 8, nib[q + 4] - 8]


@pytest.mark.parametrize("m,n,k,group", [(33, 48, 256, 128), (40, 40, 384, 64), (9, 70, 256, 256)])
def test_int4_gemm_bf16_pairs_match_the_plain_tile(triton_ops, cpu_only, m, n, k, group):
    """The GEMM's bf16-pair dequantization (launch setting PAIRS: lanes q and q + 4 as one bf16
    pair, times the scale in bf16, activations read in pair order) against the same kernel's
    fp32 dequantization: the same bf16 weights, only the fp32 sum's order differs (bf16 output:
    an ulp); both within the torch op's rounding; nibbles 0 and 15."""
    from deepserve.ops.triton.launch_config import trying
    qweight, scales, _, _ = _operands(n, k, group, False, False, seed=n + m)
    qweight[0], qweight[1] = 0, -1
    scales = scales.bfloat16()
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    op = resolve("int4_linear", "triton")[1]
    plain = op(x, qweight, scales, None, None, group, bias).float()
    with trying("int4", [{"if": {"kernel": "gemm"}, "set": {"PAIRS": 1}}]):
        pairs = op(x, qweight, scales, None, None, group, bias).float()
    torch.testing.assert_close(pairs, plain, rtol=2 ** -7, atol=2 ** -7 * plain.abs().max().item())
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, group, bias).float()
    assert (pairs - want).abs().max() <= 2 ** -4 * want.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [64, 1024])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_int4_gemm_bf16_pairs_gpu_model_shapes(triton_ops, m, n, k):
    """The GEMM's bf16-pair dequantization compiled (PTX unpack, bf16x2 scale) at model shapes,
    against the torch op."""
    from deepserve.ops.triton.launch_config import trying
    g, qweight, scales, x = _gpu_operands(m, n, k)
    want = resolve("int4_linear", "torch")[1](x, qweight, scales, None, None, 128).float()
    with trying("int4", [{"if": {"kernel": "gemm"}, "set": {"PAIRS": 1, "BLOCK_K": 64}}]):
        got = resolve("int4_linear", "triton")[1](x, qweight, scales, None, None, 128).float()
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("setting", [{"SPLIT_K": 2, "SUB_C": 4, "STEPS": 1, "DEQ": 1},
                                     {"SPLIT_K": 3, "SUB_C": 2, "STEPS": 2, "DEQ": 3, "WORDS": 2}])
def test_int4_gemv_split_k_merged_by_the_last_split(triton_ops, cpu_only, monkeypatch, m, setting):
    """Split-K with MERGE: the last split of each row block adds the partial sums and the bias
    and writes the output (no reduction launch after the GEMV: torch's sum is not called); the
    torch op's result, ragged rows and K, zero points, bf16 and fp16 activations."""
    from deepserve.ops.triton.launch_config import trying
    n, k, group = 20, 320, 32
    qweight, scales, z, _ = _operands(n, k, group, True, False, seed=m + setting["SPLIT_K"])
    qweight[0], qweight[1] = 0, -1
    g = torch.Generator().manual_seed(m)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        s = scales.to(dtype)
        want = resolve("int4_linear", "torch")[1](x, qweight, s, z, None, group, bias).float()
        with trying("int4", [{"if": {"kernel": "gemv"}, "set": dict(setting, BLOCK_N=8, MERGE=1)}]), \
                monkeypatch.context() as mp:
            mp.setattr(torch.Tensor, "sum", lambda *a, **kw: pytest.fail("a reduction after the merged GEMV"))
            got = resolve("int4_linear", "triton")[1](x, qweight, s, z, None, group, bias)
        assert got.dtype == dtype and got.shape == (m, n)
        torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=2e-2)


_LOWER_BOTH_WAYS = '''
import sys
import triton
import triton.language as tl
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deepserve.ops.triton import _common, int4_mma, w4a8_gemm

target = GPUTarget("cuda", 90, 32)
backend = triton.compiler.make_backend(target)


def lower(fn, sig, consts):
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    opts = backend.parse_options({"num_warps": 4, "num_stages": 3})
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, consts)
    mod = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    front = str(mod)
    stages = {}
    backend.add_stages(stages, opts, src.language)
    stages["ttir"](mod, {})
    return front


ints = dict(M="i32", N="i32", K="i32", stride_am="i32", stride_qn="i32", stride_sn="i32", stride_ym="i32")
w4a8 = dict(a_ptr="*i8", as_ptr="*fp32", qw_ptr="*i32", s_ptr="*fp16", b_ptr="*fp16", y_ptr="*fp16", **ints)
mma = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16", M="i32", N="i32", K="i32",
           stride_xm="i32", stride_qn="i32", stride_sn="i32", stride_ym="i32", magic="i32")
for block_ptr in [False] + [True] * _common.BLOCK_PTRS:
    tiles = dict(GROUP=128, HAS_BIAS=True, ASM=True, BLOCK_N=64, BLOCK_K=128, BLOCK_PTR=block_ptr)
    irs = [lower(w4a8_gemm._w4a8_gemm_kernel, dict(w4a8, z_ptr="*u8"), dict(tiles, HAS_ZP=True, BLOCK_M=64)),
           lower(w4a8_gemm._w4a8_nt_kernel, w4a8, dict(tiles, OVERLAP=1, ONE_GROUP=False, BLOCK_M=16)),
           lower(int4_mma._int4_mma_kernel, mma, dict(tiles, DOT_DTYPE=tl.bfloat16, BLOCK_M=16))]
    print(block_ptr, *[t.count("tt.make_tensor_ptr") for t in irs])
'''


def test_w4a8_and_mma_kernels_lower_for_cuda_both_ways():
    """The W4A8 and MMA kernels lower to Triton IR for sm_90 with pointer tensors, and with block
    pointers where this Triton has them, in a process without the interpreter (the front end
    needs no GPU). The compiler, unlike the interpreter, also compiles what follows an `if` that
    returns, and rejects returns of two types."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _LOWER_BOTH_WAYS], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    from deepserve.ops.triton import _common
    lines = run.stdout.split("\n")
    assert lines[0] == "False 0 0 0"           # pointer tensors: no block pointer made
    if _common.BLOCK_PTRS:
        assert lines[1] == "True 2 2 1"        # activations and words; words only for the MMA
