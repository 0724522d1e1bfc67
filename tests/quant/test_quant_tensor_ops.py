"""FP8 block and INT8 tensor functions against per-block / per-row reference loops."""
from __future__ import annotations

import math

import pytest
import torch

from deepserve.quant import (dequant_fp8_block, dequant_int8, quant_fp8_block,
                             quant_int8_per_channel, quant_int8_per_token)
from deepserve.quant.policy import high_precision_reason

SHAPES = [(1, 1), (128, 128), (200, 300), (257, 129), (576, 7)]


def _ref_dequant(q, s, block=(128, 128), out_dtype=torch.bfloat16):
    """Independent oracle: one block at a time, the formula as DeepSeek states it."""
    n, k = q.shape
    y = torch.empty(n, k, dtype=out_dtype)
    for i in range(math.ceil(n / block[0])):
        for j in range(math.ceil(k / block[1])):
            r = slice(i * block[0], (i + 1) * block[0])
            c = slice(j * block[1], (j + 1) * block[1])
            y[r, c] = (q[r, c].to(torch.float32) * s[i, j]).to(out_dtype)
    return y


@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_quant_matches_block_formula(shape):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    q, s = quant_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    wf = w.float()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = wf[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j].item() == pytest.approx(blk.abs().max().item() / 448.0, rel=1e-7)
            want = (blk / s[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
            got = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            # the block's largest magnitude lands on the top of the e4m3 range
            assert got.float().abs().max().item() == 448.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_dequant_bit_exact_and_close(shape, out_dtype):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen) * 0.1
    q, s = quant_fp8_block(w)
    y = dequant_fp8_block(q, s, out_dtype=out_dtype, rows_per_chunk=128)
    assert y.dtype == out_dtype
    assert torch.equal(y, _ref_dequant(q, s, out_dtype=out_dtype))
    # e4m3 has 3 mantissa bits: relative step 2^-3, rounding error <= half of it per element;
    # small values fall into subnormals where the error is bounded by the block scale instead.
    amax = _ref_dequant(torch.ones_like(q), s, out_dtype=torch.float32) * 448
    err = (y.float() - w).abs()
    assert bool((err <= w.abs() * 2 ** -4 + amax * 2 ** -10 + 1e-6).all())


def test_fp8_zero_block_and_custom_block():
    w = torch.zeros(130, 70)
    w[129, 69] = -2.0
    q, s = quant_fp8_block(w, block=(64, 32))
    assert tuple(s.shape) == (3, 3)
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    y = dequant_fp8_block(q, s, block=(64, 32), out_dtype=torch.float32)
    assert torch.equal(y, w)  # zeros stay zero; -2.0 is exactly -448 * (2/448)


def test_fp8_dequant_rejects_bad_scale_shape():
    q = torch.zeros(200, 300, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 2\).*expected \(2, 3\)"):
        dequant_fp8_block(q, torch.ones(2, 2))
    with pytest.raises(ValueError, match="must be torch.float8_e4m3fn"):
        dequant_fp8_block(torch.zeros(200, 300), torch.ones(2, 3))


def test_int8_per_channel_reference_and_error_bound():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(257, 130, generator=gen) * 0.05).to(torch.bfloat16)
    w[5] = 0
    q, scale = quant_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (257, 1)
    wf = w.float()
    want_scale = wf.abs().amax(dim=1, keepdim=True) / 127
    nz = want_scale.squeeze(1) > 0
    assert torch.allclose(scale[nz], want_scale[nz], rtol=1e-7, atol=0)
    assert torch.equal(q, torch.round(wf / scale).clamp(-127, 127).to(torch.int8))
    assert q.abs().max().item() == 127 and bool((q[5] == 0).all())
    y = dequant_int8(q, scale, out_dtype=torch.float32)
    # round-to-nearest: at most half a step per element (+ fp32 rounding slack)
    assert bool(((y - wf).abs() <= scale * 0.5 * (1 + 1e-5)).all())
    rel = (y - wf).norm() / wf.norm()
    assert rel.item() < 0.01


def test_int8_per_token_and_dequant_shape_check():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])
    q, s = quant_int8_per_token(x)
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]
    assert s[:, 0].tolist() == pytest.approx([1 / 127, 1e-12 / 127, 2.0])
    with pytest.raises(ValueError, match=r"scale shape \(3,\) does not match q \(3, 3\)"):
        dequant_int8(q, s.squeeze(1))


@pytest.mark.parametrize("name,shape,reason", [
    ("model.embed_tokens.weight", (10, 4), "embedding"),
    ("lm_head.weight", (10, 4), "lm head"),
    ("model.layers.61.shared_head.head.weight", (10, 4), "lm head"),
    ("model.layers.0.input_layernorm.weight", (4,), "not a 2-D matrix"),
    ("model.layers.3.mlp.gate.weight", (8, 4), "router gate"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", (8,), "not a 2-D matrix"),
    ("model.layers.0.self_attn.q_proj.bias", (4,), "not a 2-D matrix"),
    ("model.layers.0.self_attn.q_a_proj.weight", (4, 4), None),
    ("model.layers.3.mlp.gate_proj.weight", (4, 4), None),
    ("model.layers.3.mlp.experts.7.down_proj.weight", (4, 4), None),
    ("model.layers.61.eh_proj.weight", (4, 8), None),
])
def test_high_precision_policy(name, shape, reason):
    assert high_precision_reason(name, torch.bfloat16, shape) == reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_bit_identical_to_cpu():
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(1000, 700, generator=gen) * 0.03).to(torch.bfloat16)
    q, s = quant_fp8_block(w)
    qd, sd = quant_fp8_block(w.cuda())
    assert torch.equal(qd.cpu().view(torch.uint8), q.view(torch.uint8)) and torch.equal(sd.cpu(), s)
    assert torch.equal(dequant_fp8_block(qd, sd).cpu(), dequant_fp8_block(q, s))
    qi, si = quant_int8_per_channel(w)
    qid, sid = quant_int8_per_channel(w.cuda())
    assert torch.equal(qid.cpu(), qi) and torch.equal(sid.cpu(), si)
