"""MLA with block-fp8 q_a_proj and kv_a_proj_with_mqa: after loading, both live in one stacked
weight (their parameters views of it, no memory added) that one fp8 linear runs; the projection
gives exactly what the two layers give apart, and loading into either layer still reaches it."""
from __future__ import annotations

import torch

from deepserve.layers.mla import MLAAttention
from deepserve.layers.quantization import Fp8BlockLinearMethod
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.quant.fp8 import quant_fp8_block

D, Q_LORA, C, ROPE = 256, 192, 128, 32      # q_lora: a partial 128-row scale block at the join


def build(q_lora=Q_LORA, fp8=("q_a_proj", "kv_a_proj_with_mqa")) -> MLAAttention:
    rotary = RotaryEmbedding(ROPE, 64, 10000.0, None, is_neox_style=False)
    mla = MLAAttention(D, 4, q_lora, C, 32, ROPE, 32, rotary, 0.1)
    g = torch.Generator().manual_seed(0)
    for p in mla.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    for name in fp8:
        layer = getattr(mla, name)
        layer.set_quant_method(Fp8BlockLinearMethod())
        layer.quant_method.quantize_local(layer, torch.randn(layer.out_features, D, generator=g) * 0.05)
    return mla


def test_stacked_fp8_q_kv_a_equals_the_two_layers():
    mla = build()
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    want = (mla.q_a_proj(x), mla.kv_a_proj_with_mqa(x))
    mla.process_weights_after_loading()
    w, s = mla.q_kv_a_fp8
    assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (Q_LORA + C + ROPE, D)
    assert mla.q_a_proj.weight.data_ptr() == w.data_ptr()
    assert mla.kv_a_proj_with_mqa.weight_scale_inv.data_ptr() == s[Q_LORA:].data_ptr()
    y = mla.q_a_proj.ops.fp8_block_linear(x, w, s)
    assert torch.equal(y[:, :Q_LORA], want[0]) and torch.equal(y[:, Q_LORA:], want[1])
    # project() runs the stacked pair: q_b_proj over the normed q, kv_a as the second part
    q, kv_a = mla.project(x)
    assert torch.equal(kv_a, want[1])
    assert torch.equal(q.flatten(1), mla.q_b_proj(mla.q_a_layernorm(want[0])))
    # a later load into one layer lands in the stacked weight
    fresh, scale = quant_fp8_block(torch.randn(C + ROPE, D) * 0.05)
    mla.kv_a_proj_with_mqa.weight.data.copy_(fresh)
    assert torch.equal(w[Q_LORA:].view(torch.uint8), fresh.view(torch.uint8))


def test_not_stacked_unless_both_are_block_fp8():
    mla = build(fp8=("q_a_proj",))
    mla.process_weights_after_loading()
    assert mla.q_kv_a_fp8 is None
    assert build(q_lora=None, fp8=()).q_lora_rank is None
