"""fused_moe_small's tensor-core kernels (MMA 1, fused_moe_small_mma.py) against exact W8A8 references.

Each kernel is checked on its own against the product it computes: the activation row
quantised per 128-group as quant_fp8_per_token_group does, times the exactly dequantised
weights, in float64 (the kernels sum exact e4m3 x e4m3 products in fp32: ~1e-6 relative).
The down kernel is given the gate_up kernel's own act, so a quantisation step that an fp32
summation order could flip does not enter the comparison. End to end the path equals the torch
op (W8A8 too) to fp32 rounding, and stays within the activation quantisation's error of the
W8A16 oracle of the CUDA-core kernels.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from deepserve.ops.quant import quant_fp8_per_token_group
from deepserve.quant.fp8 import quant_fp8_block
from tests.ops.test_triton_fused_moe_small import (block_gain, moe_case, reference, rel_err, w8a16_reference,
                                                   with_remote_slots)


@pytest.fixture
def mma(triton_ops):
    return importlib.import_module("deepserve.ops.triton.fused_moe_small_mma")


@pytest.fixture
def small(triton_ops):
    return importlib.import_module("deepserve.ops.triton.fused_moe_small")


def dequant(w, scale, rows_per_scale=128):
    """e4m3 w [N, K] times its scales (one per rows_per_scale rows and 128 columns), float64."""
    n, k = w.shape
    s = scale.double().repeat_interleave(rows_per_scale, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return w.double() * s


def quant_dequant(x):
    """Rows of x quantised per 128-group to e4m3 and back, float64."""
    q, s = quant_fp8_per_token_group(x)
    return q.double() * s.double().repeat_interleave(128, 1)[:, :x.shape[1]]


def swiglu(x_dq, w13_dq, dtype):
    gate, up = (x_dq @ w13_dq.T).chunk(2, dim=-1)
    gate, up = gate.to(dtype).double(), up.to(dtype).double()
    return (torch.nn.functional.silu(gate).to(dtype).double() * up).to(dtype)


def act_w8a8(x, ids, w13, s13, shared=None):
    """[T, k*I + Is]: each (token, slot)'s silu(gate) * up (zeros for slots of other ranks'
    experts) and the shared expert's, from the quantised row."""
    x_dq = quant_dequant(x)
    rows = []
    for t in range(x.shape[0]):
        parts = [swiglu(x_dq[t:t + 1], dequant(w13[e], s13[e]), x.dtype) if 0 <= e < w13.shape[0]
                 else torch.zeros(1, w13.shape[1] // 2, dtype=x.dtype) for e in ids[t].tolist()]
        if shared is not None:
            parts.append(swiglu(x_dq[t:t + 1], dequant(shared[0], shared[1], 1), x.dtype))
        rows.append(torch.cat(parts, 1))
    return torch.cat(rows)


def down_w8a8(act, ids, weights, w2, s2, shared=None):
    """[T, D] float64 before the final rounding: each slot's quantised act times its expert's
    down rows, rounded to act's dtype, weighted; plus the shared expert's, rounded."""
    inter = w2.shape[2]
    out = []
    for t in range(act.shape[0]):
        y = torch.zeros(w2.shape[1], dtype=torch.float64)
        for j, e in enumerate(ids[t].tolist()):
            if 0 <= e < w2.shape[0]:
                a = quant_dequant(act[t:t + 1, j * inter:(j + 1) * inter])
                y += (a @ dequant(w2[e], s2[e]).T)[0].to(act.dtype).double() * float(weights[t, j])
        if shared is not None:
            a = quant_dequant(act[t:t + 1, ids.shape[1] * inter:])
            y += (a @ dequant(shared[0], shared[1], 1).T)[0].to(act.dtype).double()
        out.append(y)
    return torch.stack(out)


def shared_fp8(d, s_inter, seed=1):
    """A shared expert in Fp8BlockLinear's layout: e4m3 [2*Is, D] / [D, Is], one scale per row and 128 columns."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(2 * s_inter, d, generator=g) * d ** -0.5 * block_gain((1, 2 * s_inter, d), g)[0]
    w2 = torch.randn(d, s_inter, generator=g) * s_inter ** -0.5 * block_gain((1, d, s_inter), g)[0]
    return quant_fp8_block(w13, (1, 128)), quant_fp8_block(w2, (1, 128))


def mma_rules(block_n=32, quant_in=1, stages=1):
    return [{"if": {"kernel": k}, "set": {"MMA": 1, "BLOCK_N": block_n, "num_warps": 4, "num_stages": stages,
                                          "QUANT_IN": quant_in}} for k in ("gate_up", "down")]


# ---- CPU, interpreted, tiny ---------------------------------------------------------------

# D 200 / I 136: partial 128-groups along K and up rows straddling a scale block; Is 144 (not
# a multiple of I), and I 128 / Is 256 where QUANT_IN 0 quantises act beforehand; BLOCK_N 32
# leaves a partial row block of I 136 and D 200 (and fills D 256); down steps of GROUPS 128-groups
# that do not divide a slot's (1 or 2) or the shared expert's (2): the groups past them masked
@pytest.mark.parametrize("t,d,inter,s_inter,quant_in,groups", [(2, 200, 136, 144, 1, 1), (1, 200, 136, 0, 0, 2),
                                                               (2, 256, 128, 256, 0, 4)])
def test_mma_kernels_match_w8a8(mma, cpu_only, monkeypatch, t, d, inter, s_inter, quant_in, groups):
    # quant_gemm.act_quant_fp8 casts to e4m3 with .to(), which the interpreter gets wrong where
    # a mantissa rounds up into the next binade; the torch quantisation it matches on a GPU
    monkeypatch.setattr(mma, "act_quant_fp8", quant_fp8_per_token_group)
    e, k = 8, 3
    args, kw = moe_case(t, d, inter, e, k, torch.float32, fp8=True)
    x, w13, w2, weights, ids = with_remote_slots(args, e)
    sh13, sh2 = shared_fp8(d, s_inter) if s_inter else (None, None)
    cfg = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "QUANT_IN": quant_in, "GROUPS": groups}
    act = torch.full((t, k * inter + s_inter), float("nan"))     # slots of other ranks stay unwritten
    mma.gate_up_mma(x, ids, w13, kw["w13_scale"], act, cfg, inter, sh13)
    want = act_w8a8(x, ids, w13, kw["w13_scale"], sh13)
    local = torch.ones(t, k * inter + s_inter, dtype=torch.bool)
    for j in range(k):
        local[:, j * inter:(j + 1) * inter] = ((ids[:, j] >= 0) & (ids[:, j] < e))[:, None]
    torch.testing.assert_close(act[local].double(), want[local].double(), rtol=1e-5, atol=1e-6)
    assert act[~local].isnan().all()

    out = torch.empty(t, d)
    mma.down_mma(act, ids, weights, w2, kw["w2_scale"], out, cfg, inter, sh2)
    torch.testing.assert_close(out.double(), down_w8a8(act, ids, weights, w2, kw["w2_scale"], sh2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mma_path_within_quantisation_error(small, cpu_only, dtype):
    """fused_moe_small with MMA rules (and a shared expert) against the torch op, W8A8 as they
    are: equal to fp32 rounding (bf16: the interpreter truncates); off the W8A16 oracle of the
    CUDA-core kernels by the activations' e4m3 rounding; a wrong scale is far off."""
    from deepserve.ops.triton.launch_config import trying
    e = 8
    args, kw = moe_case(2, 256, 128, e, 2, dtype, fp8=True)
    args = with_remote_slots(args, e)
    (s13, ss13), (s2, ss2) = shared_fp8(256, 128)
    kw.update(shared_w13=s13, shared_w13_scale=ss13, shared_w2=s2, shared_w2_scale=ss2)
    want = reference(*args, **kw)
    with trying("fused_moe_small", mma_rules()):
        got = small.fused_moe_small(*args, **kw)
        assert got.dtype == dtype
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 3e-2), rel_err(got, want)
        assert 5e-3 < rel_err(got, w8a16_reference(*args, **kw)) < 6e-2
        wrong = dict(kw, w2_scale=kw["w2_scale"].flip(1))
        assert rel_err(small.fused_moe_small(*args, **wrong), want) > 0.1


def test_mma_refuses_16bit_weights_and_small_blocks(small, cpu_only):
    from deepserve.ops.triton.launch_config import trying
    args, _ = moe_case(1, 64, 32, 4, 2, torch.float32)
    with trying("fused_moe_small", mma_rules()), pytest.raises(ValueError, match="fp8 weights only"):
        small.fused_moe_small(*args)
    args, kw = moe_case(1, 128, 128, 4, 2, torch.float32, fp8=True)
    with trying("fused_moe_small", mma_rules(block_n=8)), pytest.raises(ValueError, match="BLOCK_N >= 16.*got 8"):
        small.fused_moe_small(*args, **kw)


def test_gate_up_quantises_act_for_down(mma, small, cpu_only, monkeypatch):
    """BLOCK_N 128 gate_up programs hold whole 128-groups of act: they write its e4m3 values and
    scales as act_quant_fp8 would (the same bytes), and fused_moe_small then runs the down
    kernel on them without quantising act in a launch of its own."""
    calls = []

    def act_quant(a):
        calls.append(tuple(a.shape))
        return quant_fp8_per_token_group(a)

    monkeypatch.setattr(mma, "act_quant_fp8", act_quant)
    e, k, t, d, inter, s_inter = 8, 2, 2, 256, 128, 256
    args, kw = moe_case(t, d, inter, e, k, torch.float32, fp8=True)
    x, w13, w2, weights, ids = with_remote_slots(args, e)
    (sh13, ss13), (sh2, ss2) = shared_fp8(d, s_inter)
    cols = k * inter + s_inter
    act = torch.empty(t, cols)
    q = torch.full((t, cols), float("nan")).to(torch.float8_e4m3fn)
    s = torch.full((t, cols // 128), -1.0)
    cfg = {"BLOCK_N": 128, "num_warps": 4, "num_stages": 1, "QUANT_IN": 0}
    mma.gate_up_mma(x, ids, w13, kw["w13_scale"], act, cfg, inter, (sh13, ss13), (q, s))
    local = [(r, j) for r in range(t) for j in range(k + 1) if j == k or 0 <= ids[r, j] < e]
    for r, j in local:
        a = act[r:r + 1, j * inter:] if j == k else act[r:r + 1, j * inter:(j + 1) * inter]
        want_q, want_s = quant_fp8_per_token_group(a)
        got = slice(j * inter, None if j == k else (j + 1) * inter)
        assert torch.equal(q[r:r + 1, got].float(), want_q.float()), (r, j)
        assert torch.equal(s[r:r + 1, got.start // 128:None if j == k else got.stop // 128], want_s), (r, j)
    with pytest.raises(ValueError, match="BLOCK_N 128"):
        mma.gate_up_mma(x, ids, w13, kw["w13_scale"], act, dict(cfg, BLOCK_N=32), inter, (sh13, ss13), (q, s))

    from deepserve.ops.triton.launch_config import trying
    shared = dict(shared_w13=sh13, shared_w13_scale=ss13, shared_w2=sh2, shared_w2_scale=ss2)
    calls.clear()
    with trying("fused_moe_small", mma_rules(block_n=128, quant_in=0)):
        got = small.fused_moe_small(x, w13, w2, weights, ids, **kw, **shared)
    assert calls == [(t, d)]                      # x for gate_up; act came quantised
    assert rel_err(got, reference(x, w13, w2, weights, ids, **kw, **shared)) < 1e-5
