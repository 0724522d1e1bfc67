"""W8A8 int8 routed experts: the torch op equals x @ dequant(W)^T with the activations' int8
rounding computed exactly (float64, independent code); the Triton kernels (small-batch and
sorted paths) equal the torch op under the interpreter, with ids of other EP ranks; the row
quantizer kernel equals ops.quant.quant_int8_rows bit for bit."""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.test_triton_moe_int4 import _routing as routing

E, D, I = 4, 48, 40


def _experts(seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, k in ((2 * I, D), (D, I)):
        out.append(torch.randint(-127, 128, (E, rows, k), generator=g).to(torch.int8))
        out.append(torch.rand(E, rows, 1, generator=g) * 2e-3 + 5e-4)
    return out


def _routing(t, top_k, seed, foreign=False):
    wts, ids = routing(t, top_k, seed, foreign)
    if foreign:
        ids[-1, -1] = -1         # padding
    return wts, ids


def _int8_rows(v: torch.Tensor):
    """Per-row symmetric int8 of v (float64 arithmetic on v's fp32 values, then the fp32 scale)."""
    v = v.float()
    scale = (v.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127.0)
    return torch.round(v / scale).clamp(-127, 127), scale


def _reference(x, w13, s13, w2, s2, wts, ids):
    """out[t] = sum_j w[t, j] * (q(h) s_h) @ dequant(W2[e])^T, h = silu(g) * u,
    (g | u) = (q(x) s_x) @ dequant(W13[e])^T: dequantized weights, activations rounded to int8
    per row, products in float64."""
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < E:
                continue
            qx, sx = _int8_rows(x[t:t + 1])
            gu = (qx.double() * sx.double()) @ (w13[e].double() * s13[e].double()).t()
            gu = gu.float().to(x.dtype).double()
            g, u = gu.chunk(2, -1)
            h = (torch.nn.functional.silu(g) * u).to(x.dtype)
            qh, sh = _int8_rows(h)
            y = (qh.double() * sh.double()) @ (w2[e].double() * s2[e].double()).t()
            out[t] += float(wts[t, j]) * y[0].float().to(x.dtype).double()
    return out


def test_torch_op_equals_dequantized_weights_with_int8_activations():
    w13, s13, w2, s2 = _experts(seed=1)
    x = torch.randn(6, D)
    wts, ids = _routing(6, 2, seed=2, foreign=True)
    got = resolve("fused_moe_int8", "torch")[1](x, w13, s13, w2, s2, wts, ids)
    want = _reference(x, w13, s13, w2, s2, wts, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # and the int8 rounding of the activations is what separates it from the 16-bit experts
    deq = resolve("fused_moe", "torch")[1](x, (w13.float() * s13), (w2.float() * s2), wts, ids)
    assert not torch.allclose(got, deq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, deq, rtol=0.05, atol=0.05 * deq.abs().max().item())


def test_operand_errors_name_the_tensor():
    w13, s13, w2, s2 = _experts(seed=1)
    wts, ids = _routing(2, 2, seed=2)
    op = resolve("fused_moe_int8", "torch")[1]
    with pytest.raises(ValueError, match="w2_scale"):
        op(torch.randn(2, D), w13, s13, w2, s2[:, :, 0], wts, ids)
    with pytest.raises(ValueError, match="weights must be int8"):
        op(torch.randn(2, D), w13.float(), s13, w2, s2, wts, ids)


def test_row_quantizer_kernel_equals_torch(triton_ops, cpu_only):
    from deepserve.ops.quant import quant_int8_rows
    x = torch.randn(5, 300) * torch.tensor([1.0, 1e-3, 50.0, 0.0, 3.0])[:, None]
    x[3, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])     # scale 1: ties, rounded half to even
    q, s = triton_ops.moe_int8.quant_rows_int8(x)
    want_q, want_s = quant_int8_rows(x)
    assert torch.equal(q, want_q) and torch.equal(s, want_s[:, 0])
    assert q[3, :4].tolist() == [127, 2, -4, 0]


@pytest.mark.parametrize("path,tokens,dtype", [("small", 2, torch.float32), ("small", 3, torch.bfloat16),
                                               ("sorted", 9, torch.float32), ("sorted", 9, torch.bfloat16)])
def test_kernels_match_the_torch_op(triton_ops, cpu_only, monkeypatch, path, tokens, dtype):
    """The per-assignment GEMV kernels and the sorted grouped GEMMs (chosen by forcing
    use_small_path), with ids of other EP ranks in the batch."""
    monkeypatch.setattr(triton_ops.moe_int8, "use_small_path", lambda *a: path == "small")
    w13, s13, w2, s2 = _experts(seed=3)
    x = torch.randn(tokens, D).to(dtype)
    wts, ids = _routing(tokens, 2, seed=4, foreign=True)
    want = resolve("fused_moe_int8", "torch")[1](x, w13, s13, w2, s2, wts, ids)
    got = resolve("fused_moe_int8", "triton")[1](x, w13, s13, w2, s2, wts, ids)
    assert got.shape == want.shape == (tokens, D) and got.dtype == dtype
    if dtype == torch.float32:
        # same int8 values and int32 sums; silu's exp and the slot sum's order may move the last bits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    else:
        # the interpreter casts fp32 to bf16 by truncation (a GPU rounds to nearest): gate, up,
        # h and the output are rounded there, each truncation shrinking magnitudes a little
        err = (got.float() - want.float()).abs().max()
        assert err <= 2 ** -4 * want.float().abs().max(), err


def test_int8_experts_dispatch_to_the_kernels_under_the_triton_backend(triton_ops, cpu_only):
    """A FusedMoE holding int8 experts runs the Triton op under --ops triton and gives the
    torch backend's result."""
    from deepserve.layers.moe import FusedMoE
    from deepserve.layers.moe_int8 import Int8Experts
    from deepserve.ops import OpTable, bind
    w13, s13, w2, s2 = _experts(seed=5)
    moe = FusedMoE(E, D, I, reduce_results=False)
    Int8Experts().create(moe)
    for e in range(E):
        for part, w, s in (("w1", w13[e, :I], s13[e, :I]), ("w3", w13[e, I:], s13[e, I:]), ("w2", w2[e], s2[e])):
            which = "w2" if part == "w2" else "w13"
            for name, t in (("weight", w), ("weight_scale", s)):
                p = getattr(moe, f"{which}_{name}")
                p.weight_loader(p, t, (e, part))
    assert torch.equal(moe.w13_weight, w13) and torch.equal(moe.w2_weight_scale, s2)
    x = torch.randn(2, D)
    wts, ids = _routing(2, 2, seed=6)
    want = moe(x, wts, ids)
    table = OpTable("triton", count=True)
    bind(moe, table)
    got = moe(x, wts, ids)
    assert table.counts[("fused_moe_int8", "triton")] == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 64, 300])
def test_gpu_kernels_match_the_torch_op_at_r1_shapes(triton_ops, tokens):
    """Compiled kernels at R1's D 7168 and I 2048 (16 experts, top-8, bf16): the GEMV path at 1
    token, the sorted int8 tensor-core path at 3, 64 and 300 (its three tile sizes), against the
    torch op (int32 torch._int_mm per expert) to bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    e, d, i, k = 16, 7168, 2048, 8
    g = torch.Generator(device="cuda").manual_seed(tokens)
    w13 = torch.randint(-127, 128, (e, 2 * i, d), generator=g, device="cuda").to(torch.int8)
    w2 = torch.randint(-127, 128, (e, d, i), generator=g, device="cuda").to(torch.int8)
    s13 = torch.rand(e, 2 * i, 1, generator=g, device="cuda") * 4e-4 + 1e-4
    s2 = torch.rand(e, d, 1, generator=g, device="cuda") * 4e-4 + 1e-4
    x = torch.randn(tokens, d, generator=g, device="cuda").bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g, device="cuda")[:k] for _ in range(tokens)]).int()
    ids[0, 0] = -1                               # padding / another EP rank's expert
    wts = torch.rand(tokens, k, generator=g, device="cuda")
    want = resolve("fused_moe_int8", "torch")[1](x, w13, s13, w2, s2, wts, ids).float()
    got = resolve("fused_moe_int8", "triton")[1](x, w13, s13, w2, s2, wts, ids).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max(), (got - want).abs().max()
