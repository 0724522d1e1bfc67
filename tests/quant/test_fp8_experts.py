"""FP8 routed experts (FusedMoE.use_fp8): DeepSeek's e4m3 + per-128x128-block scale_inv kept as
stored, sliced per rank under TP (whole blocks of the intermediate dim) and EP (whole experts),
and the op over them W8A8: activations quantised per token per 128-group, times the exact
dequantization."""
from __future__ import annotations

import pytest
import torch

from deepserve import ops
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.moe import FusedMoE
from deepserve.quant.fp8 import dequant_fp8_block, quant_fp8_block

E, D, I = 4, 192, 256          # D: a partial last K block; I: two 128-row blocks


def checkpoint(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for part, shape in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
            out[e, part] = quant_fp8_block(torch.randn(shape, generator=g) * 0.05)
    return out


def load(moe: FusedMoE, ckpt) -> None:
    for (e, part), (q, s) in ckpt.items():
        weight = moe.w2_weight if part == "w2" else moe.w13_weight
        scale = moe.w2_weight_scale_inv if part == "w2" else moe.w13_weight_scale_inv
        moe.weight_loader(weight, q, (e, part))
        moe.weight_loader(scale, s, (e, part))


def build(pctx=None) -> FusedMoE:
    moe = FusedMoE(E, D, I, torch.float32, pctx)
    moe.use_fp8()
    return moe


def dequant(ckpt, e, part):
    return dequant_fp8_block(*ckpt[e, part], out_dtype=torch.float32)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_tp_rank_holds_its_blocks_of_the_intermediate_dim(tp_rank):
    ckpt = checkpoint()
    moe = build(ParallelContext(tp_rank=tp_rank, tp_size=2))
    load(moe, ckpt)
    rows = slice(tp_rank * 128, tp_rank * 128 + 128)
    for e in range(E):
        w13 = dequant_fp8_block(moe.w13_weight[e], moe.w13_weight_scale_inv[e], out_dtype=torch.float32)
        assert torch.equal(w13[:128], dequant(ckpt, e, "w1")[rows])
        assert torch.equal(w13[128:], dequant(ckpt, e, "w3")[rows])
        w2 = dequant_fp8_block(moe.w2_weight[e], moe.w2_weight_scale_inv[e], out_dtype=torch.float32)
        assert torch.equal(w2, dequant(ckpt, e, "w2")[:, rows])
    assert moe.w13_weight.dtype == torch.float8_e4m3fn
    assert tuple(moe.w13_weight_scale_inv.shape) == (E, 2, 2) and tuple(moe.w2_weight_scale_inv.shape) == (E, 2, 1)


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_ep_rank_holds_whole_experts(ep_rank):
    ckpt = checkpoint()
    moe = build(ParallelContext(ep_rank=ep_rank, ep_size=2))
    load(moe, ckpt)
    for local in range(E // 2):
        e = ep_rank * (E // 2) + local
        w2 = dequant_fp8_block(moe.w2_weight[local], moe.w2_weight_scale_inv[local], out_dtype=torch.float32)
        assert torch.equal(w2, dequant(ckpt, e, "w2"))


@pytest.mark.parametrize("pctx", [None, ParallelContext(ep_rank=1, ep_size=2), ParallelContext(tp_rank=1, tp_size=2)],
                         ids=["one", "ep", "tp"])
def test_static_input_scales_take_the_layers_largest_on_every_rank(pctx):
    """Static activation scales (one a checkpoint expert matrix): each GEMM takes the largest of
    the layer's experts' (gate and up for the first, down for the second), the same on every EP
    rank (an EP rank keeps every expert's few scales, not only its own experts'); a bad one is
    refused naming the expert."""
    moe = FusedMoE(E, D, I, torch.float32, pctx)
    moe.use_fp8(static_input=True)
    load(moe, checkpoint())
    given = {(e, part): 0.01 * (1 + e) + {"w1": 0.0, "w3": 0.001, "w2": 0.05}[part]
             for e in range(E) for part in ("w1", "w3", "w2")}
    given[0, "w1"] = 0.5                                        # an expert another EP rank holds
    for (e, part), v in given.items():
        param = moe.w2_input_scale if part == "w2" else moe.w13_input_scale
        moe.weight_loader(param, torch.tensor(v), (e, part))
    moe.process_weights_after_loading()
    assert moe.a13_scale.item() == pytest.approx(0.5) and moe.a2_scale.item() == pytest.approx(0.01 * E + 0.05)
    with pytest.raises(ValueError, match=r"expert 2 w2: input_scale must be finite and > 0, got -1.0"):
        moe.weight_loader(moe.w2_input_scale, torch.tensor(-1.0), (2, "w2"))
    with pytest.raises(ValueError, match=r"expert 2 w1: a static input_scale holds one value, got shape \(2,\)"):
        moe.weight_loader(moe.w13_input_scale, torch.ones(2), (2, "w1"))


@pytest.mark.parametrize("pctx", [None, ParallelContext(tp_rank=1, tp_size=2), ParallelContext(ep_rank=1, ep_size=2)],
                         ids=["one", "tp", "ep"])
def test_per_channel_experts_keep_one_scale_a_row(pctx):
    """compressed-tensors FP8 'channel' experts (one scale a weight row, as the loader renames
    them: row-expanded [N, ceil(K/128)]): e4m3 with [E, N, 1] scales, a TP rank's rows of I (any
    slice: no 128-row grid), and the op W8A8 over the exact dequantisation; scales that differ
    along a row are refused naming the expert."""
    g = torch.Generator().manual_seed(0)
    ckpt = {(e, part): quant_fp8_block(torch.randn(shape, generator=g) * 0.05, (1, shape[1]))
            for e in range(E) for part, shape in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I)))}
    moe = FusedMoE(E, D, I, torch.float32, pctx)
    moe.use_fp8((1, 128))
    for (e, part), (q, s) in ckpt.items():
        weight = moe.w2_weight if part == "w2" else moe.w13_weight
        scale = moe.w2_weight_scale_inv if part == "w2" else moe.w13_weight_scale_inv
        moe.weight_loader(weight, q, (e, part))
        moe.weight_loader(scale, s.expand(-1, -(-q.shape[1] // 128)), (e, part))
    i, e0 = moe.local_intermediate, moe.first_expert
    rows = slice(moe.inter_start, moe.inter_start + i)
    deq = {k: q.float() * s for k, (q, s) in ckpt.items()}
    w13 = torch.stack([torch.cat((deq[e, "w1"][rows], deq[e, "w3"][rows])) for e in range(e0, e0 + moe.num_local_experts)])
    w2 = torch.stack([deq[e, "w2"][:, rows] for e in range(e0, e0 + moe.num_local_experts)])
    assert tuple(moe.w13_weight_scale_inv.shape) == (moe.num_local_experts, 2 * i, 1)
    assert torch.equal(moe.w13_weight.float() * moe.w13_weight_scale_inv, w13)
    x = torch.randn(6, D, generator=g)
    ids = torch.randint(0, moe.num_local_experts, (6, 2), generator=g, dtype=torch.int32)
    w = torch.rand(6, 2, generator=g)
    got = moe.run_experts(x, w, ids)
    torch.testing.assert_close(got, w8a8_reference(x, w13, w2, w, ids), rtol=1e-5, atol=1e-6)
    q, s = ckpt[e0 + 1, "w2"]
    bad = torch.cat([s, s * 2], dim=1)
    with pytest.raises(ValueError, match=rf"expert {e0 + 1} w2: 1x128 scales that differ along a row"):
        moe.weight_loader(moe.w2_weight_scale_inv, bad, (e0 + 1, "w2"))


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Rows of x quantised to e4m3 per 128-group (scale amax / 448) and back, float64."""
    from deepserve.ops.quant import quant_fp8_per_token_group
    q, s = quant_fp8_per_token_group(x)
    return q.double() * s.double().repeat_interleave(128, 1)[:, :x.shape[1]]


def w8a8_reference(x, w13, w2, weights, ids):
    """DeepSeek-V3's fp8 recipe, token by token in float64 (w13 / w2 the dequantised experts):
    the row and the SwiGLU output quantised per 128-group, gate / up / silu and each expert's
    down output rounded to x's dtype, the weighted sum of the slots."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            gate, up = (fake_quant(x[t:t + 1]) @ w13[e].double().T).to(x.dtype).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            out[t] += weights[t, j].double() * (fake_quant(h) @ w2[e].double().T)[0].to(x.dtype).double()
    return out.to(x.dtype)


def test_op_over_fp8_experts_quantizes_activations_as_the_kernels():
    """The torch op over fp8 experts is W8A8, as the Triton kernels it is the oracle of (and the
    dense fp8 linears): not the dequantised weights times unquantised activations (W8A16)."""
    ckpt = checkpoint()
    moe = build()
    load(moe, ckpt)
    w13 = torch.stack([torch.cat((dequant(ckpt, e, "w1"), dequant(ckpt, e, "w3"))) for e in range(E)])
    w2 = torch.stack([dequant(ckpt, e, "w2") for e in range(E)])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, D, generator=g)
    ids = torch.randint(0, E, (6, 2), generator=g, dtype=torch.int32)
    w = torch.rand(6, 2, generator=g)
    got = moe(x, w, ids)
    torch.testing.assert_close(got, w8a8_reference(x, w13, w2, w, ids), rtol=1e-5, atol=1e-6)
    w8a16 = ops.resolve("fused_moe", "torch")[1](x, w13, w2, w, ids)
    assert ((got - w8a16).norm() / w8a16.norm()).item() > 1e-2


def test_bad_scales_are_refused_naming_the_expert():
    ckpt = checkpoint()
    moe = build()
    q, s = ckpt[2, "w3"]
    with pytest.raises(ValueError, match=r"expert 2 w3: scale shape \(1, 2\)"):
        moe.weight_loader(moe.w13_weight_scale_inv, s[:1], (2, "w3"))
    with pytest.raises(ValueError, match="expert 2 w3: scale_inv has non-finite"):
        moe.weight_loader(moe.w13_weight_scale_inv, torch.full_like(s, float("inf")), (2, "w3"))
    with pytest.raises(ValueError, match="moe_intermediate_size 192 gives 96 rows per rank"):
        FusedMoE(E, D, 192, torch.float32, ParallelContext(tp_rank=0, tp_size=2)).use_fp8()
