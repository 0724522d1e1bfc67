"""The few-token fused MoE path (two GEMV kernels, no sort) against the torch reference.

Slots routed to experts outside [0, E) (another expert-parallel rank's, -1 padding) must add
exactly zero: the tests compare with the reference, which drops them, and with the output
of the same inputs minus those slots. fp8 block weights are dequantised and the activations
left unquantised (W8A16, `w8a16_reference`), so fp32 activations match that to fp32 rounding
and a scale of the wrong block is far off. `fused_moe` must pick this path for few assignments
and the sorted grouped GEMM otherwise, both equal to the reference.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from deepserve.ops.registry import resolve
from deepserve.quant.fp8 import dequant_fp8_block, quant_fp8_block


def moe_case(t, d, inter, e, k, dtype, *, fp8=False, device="cpu", seed=0):
    """(x, w13, w2, topk_weights, topk_ids), scale kwargs; ids distinct per token."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, d, generator=g, device=device).to(dtype)
    w13 = torch.randn(e, 2 * inter, d, generator=g, device=device) * d ** -0.5
    w2 = torch.randn(e, d, inter, generator=g, device=device) * inter ** -0.5
    ids = torch.rand(t, e, generator=g, device=device).topk(k, dim=-1).indices.to(torch.int32)
    weights = torch.rand(t, k, generator=g, device=device)
    if not fp8:
        return (x, w13.to(dtype), w2.to(dtype), weights, ids), {}
    # magnitudes that differ by 128x128 block, so a scale of the wrong block is far off
    w13, w2 = w13 * block_gain(w13.shape, g), w2 * block_gain(w2.shape, g)
    q13, s13 = zip(*(quant_fp8_block(w) for w in w13))
    q2, s2 = zip(*(quant_fp8_block(w) for w in w2))
    return (x, torch.stack(q13), torch.stack(q2), weights, ids), dict(w13_scale=torch.stack(s13),
                                                                      w2_scale=torch.stack(s2))


def block_gain(shape, g):
    """[E, N, K] factors 4**u, u uniform in [-1, 1], constant over each 128x128 block."""
    e, n, k = shape
    gain = 4.0 ** (torch.rand(e, -(-n // 128), -(-k // 128), generator=g, device=g.device) * 2 - 1)
    return gain.repeat_interleave(128, 1)[:, :n].repeat_interleave(128, 2)[:, :, :k]


def with_remote_slots(args, num_experts):
    """Route token 0's slot 0 to -1 and the last token's last slot past E, keeping at least
    one local slot per token (a token with none is zero, for which rel_err says nothing)."""
    x, w13, w2, weights, ids = args
    ids = ids.clone()
    ids[0, 0] = -1
    if ids.shape[0] > 1 or ids.shape[1] > 2:
        ids[-1, -1] = num_experts + 3
    return x, w13, w2, weights, ids


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def reference(*args, **kwargs):
    return resolve("fused_moe", "torch")[1](*args, **kwargs)


def w8a16_reference(x, w13, w2, weights, ids, *, w13_scale=None, w2_scale=None, shared_w13=None, shared_w2=None,
                    shared_w13_scale=None, shared_w2_scale=None):
    """The oracle of the CUDA-core small kernels (W8A16): the torch op over the fp8 weights
    dequantised to x's dtype (exact for fp32), activations unquantised. (The torch op over the
    fp8 weights is W8A8, the sorted and tensor-core paths' oracle.)"""
    if w13_scale is not None:
        w13 = torch.stack([dequant_fp8_block(w, s, out_dtype=x.dtype) for w, s in zip(w13, w13_scale)])
        w2 = torch.stack([dequant_fp8_block(w, s, out_dtype=x.dtype) for w, s in zip(w2, w2_scale)])
    shared = {}
    if shared_w13 is not None:
        shared = dict(shared_w13=shared_w13, shared_w2=shared_w2)
        if shared_w13_scale is not None:    # Fp8BlockLinear's layout: one scale a row and 128 columns
            shared = {n: dequant_fp8_block(w, s, (1, 128), out_dtype=x.dtype) for (n, w), s in
                      zip(shared.items(), (shared_w13_scale, shared_w2_scale))}
    return reference(x, w13, w2, weights, ids, **shared)


@pytest.fixture
def small(triton_ops):
    """The kernel module, imported after `triton_ops` chose interpreted or compiled kernels."""
    return importlib.import_module("deepserve.ops.triton.fused_moe_small")


# ---- CPU, interpreted, tiny ---------------------------------------------------------------

# the kernels' code is the same for both 16/32-bit dtypes: every shape in fp32, one in bf16
@pytest.mark.parametrize("dtype,t,k", [(torch.float32, 1, 2), (torch.float32, 3, 2), (torch.float32, 1, 6),
                                       (torch.float32, 3, 6), (torch.bfloat16, 3, 2)])
def test_small_path_matches_reference(small, cpu_only, dtype, t, k):
    e = 8
    args = with_remote_slots(moe_case(t, 96, 40, e, k, dtype)[0], e)
    want = reference(*args)
    got = small.fused_moe_small(*args)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:   # the interpreter truncates to bf16 instead of rounding: a biased, larger error
        assert rel_err(got, want) < 3e-2
    # the remote slots add zero: dropping them (weight 0 on a local expert) changes nothing
    x, w13, w2, weights, ids = args
    remote = (ids < 0) | (ids >= e)
    local_only = (x, w13, w2, weights.masked_fill(remote, 0.0), ids.masked_fill(remote, 0))
    torch.testing.assert_close(small.fused_moe_small(*local_only), got, rtol=0, atol=0)


def test_small_path_all_slots_remote_is_zero(small, cpu_only):
    args, _ = moe_case(2, 64, 32, 4, 2, torch.float32)
    x, w13, w2, weights, _ = args
    ids = torch.tensor([[-1, 4], [7, -1]], dtype=torch.int64)     # int64 ids, as `ids - first` gives
    out = small.fused_moe_small(x, w13, w2, weights, ids)
    assert torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("t,k", [(1, 2), (2, 3)])
def test_small_path_fp8_blocks(small, cpu_only, t, k):
    # D and I not multiples of 128: partial scale blocks, up rows I.. straddling a block edge
    e = 8
    args, kwargs = moe_case(t, 200, 136, e, k, torch.float32, fp8=True)
    args = with_remote_slots(args, e)
    want = w8a16_reference(*args, **kwargs)
    got = small.fused_moe_small(*args, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in ("w13_scale", "w2_scale") if t == 1 else ():     # (interpreting costs ~1 s a call)
        wrong = dict(kwargs, **{name: kwargs[name].flip(1)})
        assert rel_err(small.fused_moe_small(*args, **wrong), want) > 0.1


def test_small_path_fp8_wide_steps_past_the_last_scale_block(small, cpu_only):
    """K steps of four scale blocks (as the H200 settings take two and eight) over D 200 and
    I 136: the last step's slices past K have no scale column. The scales here sit in wider
    tensors whose extra columns are inf, so reading one would turn 0 * inf into NaN."""
    e = 8
    args, kwargs = moe_case(1, 200, 136, e, 2, torch.float32, fp8=True)
    want = w8a16_reference(*args, **kwargs)
    padded = {}
    for name, scale in kwargs.items():
        wide = torch.full((*scale.shape[:2], scale.shape[2] + 2), float("inf"))
        wide[..., :scale.shape[2]] = scale
        padded[name] = wide[..., :scale.shape[2]]            # same values, inf just past the end
    from deepserve.ops.triton.launch_config import trying
    wide_steps = [{"if": {"kernel": kernel}, "set": {"BLOCK_K": 512}} for kernel in ("gate_up", "down")]
    with trying("fused_moe_small", wide_steps):
        torch.testing.assert_close(small.fused_moe_small(*args, **padded), want, rtol=1e-5, atol=1e-5)


def test_small_path_fp8_bf16_activations(small, cpu_only):
    args, kwargs = moe_case(3, 256, 128, 4, 2, torch.bfloat16, fp8=True)
    want = w8a16_reference(*args, **kwargs)
    assert rel_err(small.fused_moe_small(*args, **kwargs), want) < 3e-2


def test_small_path_rejects_mismatched_routing(small, cpu_only):
    args, _ = moe_case(2, 64, 32, 4, 2, torch.float32)
    x, w13, w2, weights, ids = args
    with pytest.raises(ValueError, match=r"topk_ids \(1, 2\)"):
        small.fused_moe_small(x, w13, w2, weights, ids[:1])


def test_fp8_settings_follow_the_device():
    """fp8 steps cover whole 128-wide scale blocks; on the swept Hopper tables (H200 and H100
    SXM: sweep_moe_small.py --fp8) both kernels take wider steps (more bytes in flight), the
    default's elsewhere; 16-bit settings do not change on the H200.
    (The compiled kernels' settings: interpreted ones take one small setting everywhere.)"""
    from deepserve.ops.triton.launch_config import lookup

    def settings(device, kernel, fp8):
        return lookup("fused_moe_small", device, kernel=kernel, fp8=fp8, inter=2048)

    for key in ("sm90-132sm-144g", "sm90-132sm-80g"):          # H200, H100 SXM
        swept = {k: settings(key, k, True) for k in ("gate_up", "down")}
        assert (swept["gate_up"]["BLOCK_N"], swept["gate_up"]["BLOCK_K"]) == (32, 256), key
        assert (swept["down"]["BLOCK_N"], swept["down"]["BLOCK_K"]) == (16, 1024), key
    other = {k: settings("sm90-114sm-80g", k, True) for k in ("gate_up", "down")}   # H100 PCIe: default
    assert (other["gate_up"]["BLOCK_N"], other["gate_up"]["BLOCK_K"]) == (16, 128)
    assert all(cfg["BLOCK_K"] % 128 == 0 for cfg in (*swept.values(), *other.values()))
    assert settings("sm90-132sm-144g", "gate_up", False) == settings("", "gate_up", False)
    assert settings("interpreter", "down", True)["BLOCK_N"] == 32


def test_dispatch_rule():
    from deepserve.ops.triton.fused_moe import use_small_path
    assert use_small_path(1, 6, 64) and use_small_path(5, 6, 64) and not use_small_path(6, 6, 64)   # V2-Lite
    assert use_small_path(16, 8, 256) and not use_small_path(17, 8, 256)                            # R1
    assert use_small_path(1, 8, 4) and not use_small_path(2, 8, 4)              # floor of 8 assignments


def test_fused_moe_dispatches_by_batch(triton_ops, small, cpu_only, monkeypatch):
    calls = []
    small = small.fused_moe_small
    monkeypatch.setattr(triton_ops.fused_moe, "fused_moe_small", lambda *a, **kw: calls.append(1) or small(*a, **kw))
    fused = resolve("fused_moe", "triton")[1]
    for t, uses_small in ((2, True), (6, False)):    # E=8, k=4: small while T*k <= 8
        calls.clear()
        args = with_remote_slots(moe_case(t, 64, 32, 8, 4, torch.float32, seed=t)[0], 8)
        torch.testing.assert_close(fused(*args), reference(*args), rtol=1e-5, atol=1e-5)
        assert calls == ([1] if uses_small else [])


# ---- GPU, model sizes ---------------------------------------------------------------------

GPU_CASES = [   # (name, E, k, D, I, fp8)
    ("v2-lite", 64, 6, 2048, 1408, False),
    ("r1-bf16", 256, 8, 7168, 2048, False),
    ("r1-fp8", 256, 8, 7168, 2048, True),
]


def gpu_weights(e, d, inter, fp8, g):
    """Random expert weights at model size, built on the GPU one expert at a time for fp8."""
    if not fp8:
        return (torch.randn(e, 2 * inter, d, generator=g, device="cuda", dtype=torch.bfloat16) * d ** -0.5,
                torch.randn(e, d, inter, generator=g, device="cuda", dtype=torch.bfloat16) * inter ** -0.5), {}
    w13 = torch.empty(e, 2 * inter, d, dtype=torch.float8_e4m3fn, device="cuda")
    w2 = torch.empty(e, d, inter, dtype=torch.float8_e4m3fn, device="cuda")
    s13 = torch.empty(e, -(-2 * inter // 128), -(-d // 128), device="cuda")
    s2 = torch.empty(e, -(-d // 128), -(-inter // 128), device="cuda")
    for i in range(e):
        w13[i], s13[i] = quant_fp8_block(torch.randn(2 * inter, d, generator=g, device="cuda") * d ** -0.5)
        w2[i], s2[i] = quant_fp8_block(torch.randn(d, inter, generator=g, device="cuda") * inter ** -0.5)
    return (w13, w2), dict(w13_scale=s13, w2_scale=s2)


def gpu_routing(t, d, e, k, g):
    """(x [t, d] bf16, ids [t, k] with a -1 and an out-of-range slot, weights [t, k]) on the GPU."""
    x = torch.randn(t, d, generator=g, device="cuda").bfloat16()
    ids = torch.rand(t, e, generator=g, device="cuda").topk(k, dim=-1).indices.int()
    ids[0, 0] = -1
    ids[-1, 1] = e
    return x, ids, torch.rand(t, k, generator=g, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_small_path_gpu(small, case):
    _, e, k, d, inter, fp8 = case
    g = torch.Generator(device="cuda").manual_seed(0)
    (w13, w2), kwargs = gpu_weights(e, d, inter, fp8, g)
    fused = resolve("fused_moe", "triton")[1]
    for t in (1, 4):
        x, ids, weights = gpu_routing(t, d, e, k, g)
        want = w8a16_reference(x, w13, w2, weights, ids, **kwargs)
        got = small.fused_moe_small(x, w13, w2, weights, ids, **kwargs)
        # bf16: the reference's roundings, fp32 sums in another order; fp8: the CUDA-core kernels'
        # W8A16 oracle also rounds each dequantised weight to bf16, this path does not
        assert rel_err(got, want) < (1.5e-2 if fp8 else 5e-3), (t, rel_err(got, want))
        assert rel_err(fused(x, w13, w2, weights, ids, **kwargs), want) < (0.06 if fp8 else 1e-2)


MMA_GPU = {   # both kernels on the tensor cores: quantising inside, in launches before, and
    # gate_up's 128-row programs quantising act for a down kernel of two groups a step
    "quant-in": ({"BLOCK_N": 64, "QUANT_IN": 1}, {"BLOCK_N": 64, "QUANT_IN": 1}),
    "quant-before": ({"BLOCK_N": 64, "QUANT_IN": 0}, {"BLOCK_N": 64, "QUANT_IN": 0}),
    "act-from-gate-up": ({"BLOCK_N": 128, "QUANT_IN": 0}, {"BLOCK_N": 64, "QUANT_IN": 0, "GROUPS": 2}),
}


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MMA_GPU)
def test_small_path_mma_gpu(small, mode):
    """R1's fp8 experts and shared expert on the tensor cores (MMA 1 for both kernels, W8A8):
    the torch op (W8A8 too) to bf16 rounding, off the CUDA-core kernels' W8A16 oracle by the
    activations' e4m3 rounding."""
    from deepserve.ops.triton.launch_config import trying
    _, e, k, d, inter, _ = GPU_CASES[2]
    g = torch.Generator(device="cuda").manual_seed(0)
    (w13, w2), kwargs = gpu_weights(e, d, inter, True, g)
    for name, shape in (("shared_w13", (2 * inter, d)), ("shared_w2", (d, inter))):
        kwargs[name], kwargs[name + "_scale"] = quant_fp8_block(
            torch.randn(*shape, generator=g, device="cuda") * shape[1] ** -0.5, (1, 128))
    rules = [{"if": {"kernel": kernel}, "set": {"MMA": 1, "num_warps": 4, "num_stages": 3, **cfg}}
             for kernel, cfg in zip(("gate_up", "down"), MMA_GPU[mode])]
    for t in (1, 4):
        x, ids, weights = gpu_routing(t, d, e, k, g)
        want = reference(x, w13, w2, weights, ids, **kwargs)
        with trying("fused_moe_small", rules):
            got = small.fused_moe_small(x, w13, w2, weights, ids, **kwargs)
        assert rel_err(got, want) < 1e-2, (t, rel_err(got, want))
        assert 1e-2 < rel_err(got, w8a16_reference(x, w13, w2, weights, ids, **kwargs)) < 0.06
