"""4-bit routed experts (W4A16 fused MoE): the torch op equals the 16-bit fused MoE holding the
dequantized weights exactly; the Triton small-batch kernels match the torch op under the
interpreter, small-batch and sorted paths (zero points or symmetric, group or channel scales,
ids of other EP ranks, bf16)."""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.int4 import dequant_int4, pack_int4
from deepserve.ops.registry import resolve

E, D, I = 4, 32, 48


def _experts(groups, zeros: bool, seed: int, e: int = E, d: int = D, i: int = I):
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, k, group in ((2 * i, d, groups[0]), (d, i, groups[1])):
        u = torch.randint(0, 16, (e, rows, k), generator=g)
        s = (torch.rand(e, rows, k // group, generator=g) * 0.05 + 0.01).half()
        z = torch.randint(0, 16, (e, rows, k // group), generator=g).to(torch.uint8) if zeros else None
        out += [pack_int4(u, 2), s, z]
    return out


def _routing(t, top_k, seed, foreign=False, e: int = E):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(t)])
    if foreign:
        ids[0, 0] = e + 3        # an expert another EP rank holds
    return torch.rand(t, top_k, generator=g), ids.int()


def _assert_close_to_torch(got, want, fp32_tol: float):
    """got within fp32_tol (relative, and of max |want|) of the torch op's want for fp32 results;
    bf16 ones within 2^-4 of max |want|: Triton 3.6's interpreter casts fp32 to bf16 by truncation
    (a GPU rounds to nearest), and the kernels round the weights, gate, up, h and the output to
    x's dtype as the reference does: the truncations all shrink magnitudes, a few percent in
    all; the fp32 cases check the arithmetic itself."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=fp32_tol, atol=fp32_tol * want.abs().max().item())
    else:
        err = (got.float() - want.float()).abs().max()
        assert err <= 2 ** -4 * want.float().abs().max(), err


def test_torch_op_equals_the_16bit_fused_moe_on_dequantized_weights():
    w13, s13, z13, w2, s2, z2 = _experts((32, 16), True, seed=1)
    x = torch.randn(5, D)
    wts, ids = _routing(5, 2, seed=2, foreign=True)
    got = resolve("fused_moe_int4", "torch")[1](x, w13, s13, z13, w2, s2, z2, wts, ids, (32, 16))
    d13 = torch.stack([dequant_int4(w13[e], s13[e], z13[e], None, 32) for e in range(E)])
    d2 = torch.stack([dequant_int4(w2[e], s2[e], z2[e], None, 16) for e in range(E)])
    want = resolve("fused_moe", "torch")[1](x, d13, d2, wts, ids)
    assert torch.equal(got, want)


@pytest.mark.parametrize("path,groups,zeros,dtype", [
    ("small", (32, 16), True, torch.float32), ("small", (16, 48), True, torch.bfloat16),
    ("sorted", (D, I), False, torch.float32), ("sorted", (32, 16), True, torch.bfloat16)])
def test_kernels_match_the_torch_op(triton_ops, cpu_only, monkeypatch, path, groups, zeros, dtype):
    """The per-assignment GEMV kernels and the sorted grouped GEMMs (forced here by
    setting the small-batch bound to 0) at 2 tokens."""
    if path == "sorted":
        monkeypatch.setattr(triton_ops.moe_int4, "SMALL_BATCH", 0)
    ops = _experts(groups, zeros, seed=3)
    x = torch.randn(2, D).to(dtype)
    wts, ids = _routing(2, 2, seed=4, foreign=True)
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups)
    got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, groups)
    assert got.shape == want.shape == (2, D) and got.dtype == dtype
    _assert_close_to_torch(got, want, 1e-5)


@pytest.mark.parametrize("groups,zeros", [((32, 16), True), ((16, 48), False)])
def test_small_kernels_with_paired_lanes(triton_ops, cpu_only, groups, zeros):
    """The per-assignment kernels with DEQ 2 (lane pairs read with their offsets, taken out once
    a word): the torch op's result within the offsets' fp32 rounding, as DEQ 1's."""
    from deepserve.ops.triton.launch_config import trying
    ops = _experts(groups, zeros, seed=5)
    x = torch.randn(2, D)
    wts, ids = _routing(2, 2, seed=6, foreign=True)
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups)
    rules = [{"if": {"kernel": k}, "set": {"DEQ": 2}} for k in ("moe_gate_up", "moe_down")]
    with trying("int4", rules):
        got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, groups)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_small_kernels_with_packed_fp16_lanes(triton_ops, cpu_only, dtype):
    """A table giving the per-assignment kernels the GEMV's DEQ 3 (fp16 lane pairs; the
    interpreter runs its exact replay): bf16 activations within the bf16 test's bound of the
    torch op, fp32 ones taking DEQ 1 (fp16 pairs would round them) and matching it closely."""
    from deepserve.ops.triton.launch_config import trying
    groups = (32, 16)
    ops = _experts(groups, True, seed=7)
    x = torch.randn(2, D).to(dtype)
    wts, ids = _routing(2, 2, seed=8, foreign=True)
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups)
    rules = [{"if": {"kernel": k}, "set": {"DEQ": 3}} for k in ("moe_gate_up", "moe_down")]
    with trying("int4", rules):
        got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, groups)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    else:
        err = (got.float() - want.float()).abs().max()
        assert err <= 2 ** -4 * want.float().abs().max(), err


@pytest.mark.parametrize("groups,zeros,setting,dtype", [
    ((32, 16), True, {"SLOTS": 1}, torch.float32), ((16, 48), False, {"SLOTS": 1}, torch.float32),
    # slices ending inside K, then EVEN ones
    ((32, 16), True, {"SLOTS": 1, "SUB_C": 2, "STEPS": 1}, torch.float32),
    # packed fp16 (DEQ 3): fp16 activations, which the interpreter rounds as a GPU does
    ((32, 16), True, {"SLOTS": 1, "DEQ": 3}, torch.float16),
    ((16, 48), False, {"SLOTS": 1, "DEQ": 3, "SUB_C": 2, "STEPS": 2}, torch.float16)])
def test_small_down_kernel_with_all_slots_at_once(triton_ops, cpu_only, groups, zeros, setting, dtype):
    """The down kernel loading every slot's words of a step in one tile (setting SLOTS): 3 slots
    (a 4-slot tile, one slot masked) with an expert of another EP rank, against the torch op
    (DEQ 3: within its fp16 sums' rounding, 2^-7 of max |y|, about 5 times what it shows)."""
    from deepserve.ops.triton.launch_config import trying
    ops = _experts(groups, zeros, seed=9)
    x = torch.randn(2, D).to(dtype)
    wts, ids = _routing(2, 3, seed=10, foreign=True)
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups)
    with trying("int4", [{"if": {"kernel": "moe_down"}, "set": setting}]):
        got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, groups)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        err = (got.float() - want.float()).abs().max()
        assert err <= 2 ** -7 * want.float().abs().max(), err


class _Launches:
    """A kernel whose launches record their WORDS (1 where the launch passes none)."""

    def __init__(self, kernel):
        self.kernel, self.words = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.words.append(kwargs.get("WORDS", 1))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _spy_on_launches(monkeypatch, module) -> dict:
    """The small-batch kernels of `module` replaced by `_Launches` of them, by name."""
    spies = {}
    for name in ("_gate_up_kernel", "_down_kernel"):
        spies[name] = _Launches(getattr(module, name))
        monkeypatch.setattr(module, name, spies[name])
    return spies


@pytest.mark.parametrize("groups,zeros,dtype,top_k,words,steps,slots,d,i", [
    # D: 12 words, slices of 8 ending inside it; down: all slots at once (one word a thread)
    ((32, 64), True, torch.bfloat16, 8, 4, 1, 1, 96, 128),
    ((64, 32), False, torch.bfloat16, 3, 2, 2, 0, 128, 96),   # 2 slices a loop trip, the last trip ragged
    ((128, 128), True, torch.bfloat16, 1, 2, 1, 0, 128, 128),
    ((32, 16), True, torch.bfloat16, 2, 4, 1, 0, 96, 64),     # down: groups of 2 words, WORDS 1
    ((32, 32), True, torch.float32, 5, 4, 1, 0, 96, 96)])     # fp32: DEQ 1, WORDS 1
def test_small_kernels_with_several_words_a_thread(triton_ops, cpu_only, monkeypatch, groups, zeros, dtype, top_k,
                                                   words, steps, slots, d, i):
    """A table giving both per-assignment kernels the GEMV's DEQ 3 with WORDS adjacent words a
    thread (8 experts, an expert of another EP rank, rows ragged against BLOCK_N, slices of 2
    WORDS words): each launch takes WORDS where a thread's words lie in one group and x is
    16-bit (else 1), and the result is the torch op's within the bf16 test's bound (fp32: DEQ 1,
    close)."""
    from deepserve.ops.triton.launch_config import trying
    e = 8
    ops = _experts(groups, zeros, seed=11, e=e, d=d, i=i)
    t = 1 if top_k > 4 else 2
    x = torch.randn(t, d).to(dtype)
    wts, ids = _routing(t, top_k, seed=12, foreign=True, e=e)
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups)
    spies = _spy_on_launches(monkeypatch, triton_ops.moe_int4)
    tile = {"DEQ": 3, "WORDS": words, "BLOCK_N": 64, "SUB_C": 2, "STEPS": steps}
    rules = [{"if": {"kernel": "moe_gate_up"}, "set": tile}, {"if": {"kernel": "moe_down"}, "set": {**tile, "SLOTS": slots}}]
    with trying("int4", rules):
        got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, groups)

    def takes(group, one_word=False):
        return 1 if dtype == torch.float32 or group % (8 * words) or one_word else words
    assert spies["_gate_up_kernel"].words == [takes(groups[0])]
    assert spies["_down_kernel"].words == [takes(groups[1], slots > 0)]
    assert got.shape == want.shape == (t, d) and got.dtype == dtype
    _assert_close_to_torch(got, want, 1e-4)


def test_sorted_kernels_with_bf16_pairs(triton_ops, cpu_only, monkeypatch):
    """The sorted grouped GEMMs with the bf16-pair dequantization (setting PAIRS, symmetric bf16
    experts): the plain sorted kernels' result within an ulp of the bf16 output (same weights,
    another fp32 sum order)."""
    from deepserve.ops.triton.launch_config import trying
    monkeypatch.setattr(triton_ops.moe_int4, "SMALL_BATCH", 0)
    groups = (32, 16)
    ops = _experts(groups, False, seed=7)
    x = torch.randn(3, D).bfloat16()
    wts, ids = _routing(3, 2, seed=8, foreign=True)
    op = resolve("fused_moe_int4", "triton")[1]
    plain = op(x, *ops, wts, ids, groups).float()
    with trying("int4", [{"if": {"kernel": "moe_sorted"}, "set": {"PAIRS": 1}}]):
        pairs = op(x, *ops, wts, ids, groups).float()
    torch.testing.assert_close(pairs, plain, rtol=2 ** -6, atol=2 ** -6 * plain.abs().max().item())


def test_4bit_layers_dispatch_to_the_kernels_under_the_triton_backend(triton_ops, cpu_only):
    """A loaded 4-bit Linear and 4-bit FusedMoE run the Triton ops under --ops triton and give
    the torch backend's result."""
    from deepserve.ops import OpTable, bind
    from deepserve.layers.linear import ColumnParallelLinear
    from deepserve.layers.moe import FusedMoE
    from deepserve.layers.moe_int4 import Int4Experts
    from deepserve.layers.quantization_int4 import Int4LinearMethod
    from deepserve.quant.int4 import int4_spec
    from tests.quant.int4_formats import format_tensors, quantization_config, quantize
    spec = int4_spec({"quantization_config": quantization_config("awq", 32, False, False), "torch_dtype": "float16"})
    g = torch.Generator().manual_seed(0)

    def tensors(n, k):
        return format_tensors("awq", *quantize(torch.randn(n, k, generator=g) * 0.05, 32, False), False, False)

    linear = ColumnParallelLinear(64, 24)
    linear.set_quant_method(Int4LinearMethod(spec))
    for name, t in tensors(24, 64).items():
        getattr(linear, name).weight_loader(getattr(linear, name), t)
    moe = FusedMoE(4, 32, 32, reduce_results=False)
    Int4Experts(spec).create(moe)
    for e in range(4):
        for part, n, k in (("w1", 32, 32), ("w3", 32, 32), ("w2", 32, 32)):
            for name, t in tensors(n, k).items():
                p = getattr(moe, f"{'w2' if part == 'w2' else 'w13'}_{name}")
                p.weight_loader(p, t, (e, part))
    x = torch.randn(1, 64, generator=g)
    h = torch.randn(2, 32, generator=g)
    wts, ids = torch.rand(2, 2, generator=g), torch.tensor([[0, 3], [2, 1]])
    want = linear(x), moe(h, wts, ids)
    table = OpTable("triton", count=True)
    for module in (linear, moe):
        bind(module, table)
    got = linear(x), moe(h, wts, ids)
    assert table.counts[("int4_linear", "triton")] == 1 and table.counts[("fused_moe_int4", "triton")] == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _g_idx(k: int, group: int, seed: int) -> torch.Tensor:
    """[E, k]: each expert's input features in groups of `group` by a random order (act order)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.argsort(torch.randperm(k, generator=g)) // group for _ in range(E)]).int()


@pytest.mark.parametrize("path", ["small", "sorted"])
def test_act_order_experts(triton_ops, cpu_only, monkeypatch, path):
    """Experts with g_idx (GPTQ desc_act): the torch op equals the 16-bit fused MoE on the
    weights dequantized through g_idx, and both Triton paths match it."""
    if path == "sorted":
        monkeypatch.setattr(triton_ops.moe_int4, "SMALL_BATCH", 0)
    groups = (16, 16)
    w13, s13, z13, w2, s2, z2 = _experts(groups, True, seed=5)
    g13, g2 = _g_idx(D, groups[0], 6), _g_idx(I, groups[1], 7)
    x = torch.randn(3, D)
    wts, ids = _routing(3, 2, seed=8, foreign=True)
    want = resolve("fused_moe_int4", "torch")[1](x, w13, s13, z13, w2, s2, z2, wts, ids, groups, g13, g2)
    d13 = torch.stack([dequant_int4(w13[e], s13[e], z13[e], g13[e], 16) for e in range(E)])
    d2 = torch.stack([dequant_int4(w2[e], s2[e], z2[e], g2[e], 16) for e in range(E)])
    assert torch.equal(want, resolve("fused_moe", "torch")[1](x, d13, d2, wts, ids))
    plain = resolve("fused_moe_int4", "torch")[1](x, w13, s13, z13, w2, s2, z2, wts, ids, groups)
    assert not torch.allclose(plain, want)                 # the reordering matters
    got = resolve("fused_moe_int4", "triton")[1](x, w13, s13, z13, w2, s2, z2, wts, ids, groups, g13, g2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _int8_rows(v: torch.Tensor) -> torch.Tensor:
    s = v.double().abs().amax(-1, keepdim=True) / 127
    return (torch.round(v.double() / s).clamp(-127, 127) * s).float()


@pytest.mark.parametrize("path", ["small", "sorted"])
def test_w4a8_experts_quantize_each_gemm_input_per_row(triton_ops, cpu_only, monkeypatch, path):
    """act_int8 (W4A8 experts): x and each assignment's h rounded through int8 per row before
    their products; the torch op equals that computed here per assignment, the Triton paths match."""
    if path == "sorted":
        monkeypatch.setattr(triton_ops.moe_int4, "SMALL_BATCH", 0)
    groups = (32, 16)
    ops = _experts(groups, True, seed=9)
    w13, s13, z13, w2, s2, z2 = ops
    x = torch.randn(3, D) * torch.tensor([[0.1], [1.0], [4.0]])
    wts, ids = _routing(3, 2, seed=10, foreign=True)
    want = torch.zeros(3, D)
    for t in range(3):
        for j in range(2):
            e = int(ids[t, j])
            if e >= E:
                continue
            gate, up = (_int8_rows(x[t:t + 1]) @ dequant_int4(w13[e], s13[e], z13[e], None, 32).t()).chunk(2, -1)
            h = _int8_rows(torch.nn.functional.silu(gate) * up)
            want[t] += wts[t, j] * (h @ dequant_int4(w2[e], s2[e], z2[e], None, 16).t())[0]
    ref = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups, act_int8=True)
    # fp32 sums in two orders (outputs up to ~34; the int8 rounding itself moves them by ~0.4)
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ref, resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, groups))
    got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, groups, act_int8=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


R1_RANK = (32, 7168, 2048, 128)      # experts, D, I, group: one EP8 rank of R1


def _r1_rank(gen: torch.Generator, zeros: bool):
    """Random bf16 experts of one R1 rank on the GPU (groups of 128, zero points or symmetric),
    one token's bf16 x and its 8 routing weights and distinct experts."""
    e, d, i, g = R1_RANK
    ops = []
    for rows, k in ((2 * i, d), (d, i)):
        ops += [torch.randint(-2 ** 31, 2 ** 31, (e, rows, k // 8), generator=gen, device="cuda",
                              dtype=torch.int64).to(torch.int32),
                (torch.rand(e, rows, k // g, generator=gen, device="cuda") * 0.004 + 0.002).bfloat16(),
                torch.randint(0, 16, (e, rows, k // g), generator=gen, device="cuda").to(torch.uint8) if zeros
                else None]
    x = torch.randn(1, d, generator=gen, device="cuda").bfloat16()
    ids = torch.randperm(e, generator=gen, device="cuda")[:8][None].int()
    return ops, x, torch.rand(1, 8, generator=gen, device="cuda"), ids


@pytest.mark.gpu
@pytest.mark.parametrize("zeros", [False, True])
def test_small_batch_kernels_gpu_r1_shapes(triton_ops, zeros):
    """The compiled small-batch kernels at one EP8 rank of R1 (32 experts, D 7168, I 2048, top-8,
    groups of 128), one token: the torch op's result within bf16 rounding."""
    g = R1_RANK[3]
    gen = torch.Generator(device="cuda").manual_seed(int(zeros))
    ops, x, wts, ids = _r1_rank(gen, zeros)
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, (g, g)).float()
    got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, (g, g)).float()
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-2 * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("words,slots,zeros", [(2, 0, False), (4, 1, True)])
def test_small_batch_kernels_gpu_several_words_a_thread(triton_ops, monkeypatch, words, slots, zeros):
    """The compiled small-batch kernels with DEQ 3 and WORDS words a thread (the PTX unpack; the
    down kernel's all-slots path with SLOTS) at one EP8 rank of R1, one token, an expert of
    another rank among the 8: the torch op's result within bf16 rounding."""
    from deepserve.ops.triton.launch_config import trying
    e, g = R1_RANK[0], R1_RANK[3]
    gen = torch.Generator(device="cuda").manual_seed(words + 2 * slots)
    ops, x, wts, ids = _r1_rank(gen, zeros)
    ids[0, 3] = e + 5
    want = resolve("fused_moe_int4", "torch")[1](x, *ops, wts, ids, (g, g)).float()
    spies = _spy_on_launches(monkeypatch, triton_ops.moe_int4)
    tile = {"DEQ": 3, "WORDS": words, "BLOCK_N": 8, "SUB_C": 128, "STEPS": 1, "num_warps": 4}
    rules = [{"if": {"kernel": "moe_gate_up"}, "set": tile},
             {"if": {"kernel": "moe_down"}, "set": {**tile, "SLOTS": slots, "BLOCK_N": 2 if slots else 8}}]
    with trying("int4", rules):
        got = resolve("fused_moe_int4", "triton")[1](x, *ops, wts, ids, (g, g)).float()
    assert spies["_gate_up_kernel"].words == [words] and spies["_down_kernel"].words == [1 if slots else words]
    torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-2 * want.abs().max().item())
