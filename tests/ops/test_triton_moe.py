"""Triton MoE router and fused experts against the torch references in deepserve.ops.moe.

Router: every scoring function and top-k method of the DeepSeek family must pick the same
experts in the same order with the same weights. Experts: bf16/fp32 weights must match the
reference to rounding; fp8 block weights run as W8A8 (activations quantised per 128-wide
group) in both, equal to fp32 rounding where the interpreter's e4m3 cast is not in play; a
wrong block scale is far outside.
"""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.test_triton_fused_moe_small import w8a16_reference

ROUTES = [
    dict(top_k=6, scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
         norm_topk_prob=False, routed_scaling_factor=1.0),                        # V2-Lite
    dict(top_k=6, scoring_func="softmax", topk_method="group_limited_greedy", n_group=8, topk_group=3,
         norm_topk_prob=False, routed_scaling_factor=16.0),                       # V2
    dict(top_k=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
         norm_topk_prob=True, routed_scaling_factor=2.5),                         # V3 / R1
]


def run_both(op, *args, **kwargs):
    return resolve(op, "torch")[1](*args, **kwargs), resolve(op, "triton")[1](*args, **kwargs)


def check_route(logits, bias, kw):
    (w_ref, id_ref), (w_tri, id_tri) = run_both("moe_route", logits, bias, **kw)
    assert id_tri.dtype == torch.int32 and w_tri.dtype == torch.float32
    assert torch.equal(id_tri, id_ref)
    torch.testing.assert_close(w_tri, w_ref, rtol=1e-5, atol=1e-6)


def moe_inputs(t, d, inter, e, k, dtype, device="cpu", fp8=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, d, generator=g, device=device).to(dtype)
    scale = 1.0 if fp8 else d ** -0.5
    w13 = torch.randn(e, 2 * inter, d, generator=g, device=device) * scale
    w2 = torch.randn(e, d, inter, generator=g, device=device) * scale
    ids = torch.rand(t, e, generator=g, device=device).topk(k, dim=-1).indices.to(torch.int32)
    weights = torch.rand(t, k, generator=g, device=device)
    kwargs = {}
    if fp8:
        w13, w2 = w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)
        kwargs = dict(w13_scale=torch.rand(e, -(-2 * inter // 128), -(-d // 128), generator=g, device=device)
                      / 64 + 0.005,
                      w2_scale=torch.rand(e, -(-d // 128), -(-inter // 128), generator=g, device=device)
                      / 64 + 0.005)
    else:
        w13, w2 = w13.to(dtype), w2.to(dtype)
    return (x, w13, w2, weights, ids), kwargs


def rel_err(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


# ---- CPU, interpreted, tiny ---------------------------------------------------------------

@pytest.mark.parametrize("kw", ROUTES, ids=lambda kw: kw["topk_method"])
def test_moe_route(triton_ops, cpu_only, kw):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 64, generator=g)
    check_route(logits, torch.randn(64, generator=g) * 0.1, kw)


def test_moe_route_rejects_bad_groups(triton_ops, cpu_only):
    with pytest.raises(ValueError, match="n_group 3 does not divide the 64"):
        resolve("moe_route", "triton")[1](torch.zeros(2, 64), None, **{**ROUTES[1], "n_group": 3})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe(triton_ops, cpu_only, dtype):
    args, _ = moe_inputs(7, 64, 48, 6, 2, dtype)
    args[4][1, 0] = -1                     # experts of another EP rank contribute nothing
    args[4][2, 1] = 9
    want, got = run_both("fused_moe", *args)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:   # the interpreter truncates to bf16 instead of rounding: a biased, larger error
        assert rel_err(got, want) < 3e-2


def test_fused_moe_fp8_blocks(triton_ops, cpu_only, monkeypatch):
    """W8A8 as the torch op: equal to it to fp32 rounding where the rows are quantised by torch's
    rule (the interpreter's e4m3 cast is not the GPU's); with the interpreter's own cast, within
    its error."""
    from deepserve.ops.quant import quant_fp8_per_token_group
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton.launch_config import trying
    args, kwargs = moe_inputs(5, 256, 128, 4, 2, torch.float32, fp8=True)
    want, got = run_both("fused_moe", *args, **kwargs)
    assert rel_err(got, want) < 0.15
    with monkeypatch.context() as m, trying("fused_moe", [{"set": {"PREQUANT": True}}]):
        m.setattr(fm, "_quant_rows", quant_fp8_per_token_group)
        assert rel_err(fm.fused_moe(*args, **kwargs), want) < 1e-6
    args, kwargs = moe_inputs(5, 256, 128, 4, 2, torch.bfloat16, fp8=True)
    want, got = run_both("fused_moe", *args, **kwargs)
    assert rel_err(got, want) < 0.15
    wrong = dict(kwargs, w2_scale=kwargs["w2_scale"].flip(1))
    assert rel_err(resolve("fused_moe", "triton")[1](*args, **wrong), want) > 0.3


def _bf16_truncated(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as the Triton interpreter casts: the low 16 bits dropped (not rounded)."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def test_fused_moe_fp8_bf16_rounds_where_the_torch_op_rounds(triton_ops, cpu_only, monkeypatch):
    """In bf16 the sorted fp8 path rounds where the torch op does (gate, up, silu(gate), the
    SwiGLU product and each down row to bf16; rows quantised by torch's rule): it equals the torch
    op's arithmetic with the interpreter's bf16 cast (truncation) at those points to fp32
    summation order, where against the op itself (rounding to nearest) it is 2-3% off. On a GPU
    both round to nearest (the remaining H100 gap: test_fused_moe_gpu)."""
    from deepserve.ops.moe import _dequant, _fake_quant
    from deepserve.ops.quant import quant_fp8_per_token_group
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton.launch_config import trying
    (x, w13, w2, weights, ids), kwargs = moe_inputs(5, 256, 128, 4, 2, torch.bfloat16, fp8=True)
    with monkeypatch.context() as m, trying("fused_moe", [{"set": {"PREQUANT": True}}]):
        m.setattr(fm, "_quant_rows", quant_fp8_per_token_group)
        got = fm.fused_moe(x, w13, w2, weights, ids, **kwargs)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in range(w13.shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gate, up = _bf16_truncated(_fake_quant(x[tok], None) @ _dequant(w13[e], kwargs["w13_scale"][e]).t()).chunk(2, -1)
        act = _bf16_truncated(_bf16_truncated(gate / (1 + torch.exp(-gate))) * up)
        y = _bf16_truncated(_fake_quant(act, None) @ _dequant(w2[e], kwargs["w2_scale"][e]).t())
        out.index_add_(0, tok, y * weights[tok, slot, None])
    want = _bf16_truncated(out)
    assert rel_err(got, want) < 2e-3, rel_err(got, want)
    assert rel_err(got, resolve("fused_moe", "torch")[1](x, w13, w2, weights, ids, **kwargs)) > 1e-2


@pytest.mark.parametrize("tokens", [1, 6])
def test_fused_moe_fp8_static_scales(triton_ops, cpu_only, tokens):
    """Static activation scales (one for the gate/up input, one for the down input): the rows
    quantised with them beforehand and the sorted kernels run at any batch (1 token: the small
    path's batch), equal to the torch op to fp32 rounding; not the per-group quantisation."""
    args, kwargs = moe_inputs(tokens, 256, 128, 4, 2, torch.float32, fp8=True)
    x = args[0]
    static = dict(a13_scale=x.abs().amax().reshape(1) / 448 * 0.7, a2_scale=torch.tensor([0.05]))
    want, got = run_both("fused_moe", *args, **kwargs, **static)
    assert rel_err(got, want) < 1e-6, rel_err(got, want)
    assert rel_err(resolve("fused_moe", "torch")[1](*args, **kwargs), want) > 1e-2
    with pytest.raises(ValueError, match="need both a13_scale and a2_scale"):
        resolve("fused_moe", "triton")[1](*args, **kwargs, a13_scale=static["a13_scale"])


@pytest.mark.parametrize("tokens", [1, 6])
def test_fused_moe_fp8_row_scales(triton_ops, cpu_only, monkeypatch, tokens):
    """fp8 weights with one scale a row (compressed-tensors 'channel': scales [E, N, 1]) on the
    sorted kernels at any batch, I 136 not on the 128-row grid: equal to the torch op to fp32
    rounding where the rows are quantised by torch's rule (the interpreter's e4m3 cast is not
    the GPU's), with the in-kernel quantisation within its error; a wrong row's scale is far off."""
    from deepserve.ops.quant import quant_fp8_per_token_group
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton.launch_config import trying
    args, _ = moe_inputs(tokens, 256, 136, 4, 2, torch.float32, fp8=True)
    g = torch.Generator().manual_seed(5)
    rows = dict(w13_scale=torch.rand(4, 272, 1, generator=g) / 64 + 0.005,
                w2_scale=torch.rand(4, 256, 1, generator=g) / 64 + 0.005)
    want = resolve("fused_moe", "torch")[1](*args, **rows, per_channel_weights=True)
    with monkeypatch.context() as m, trying("fused_moe", [{"set": {"PREQUANT": True}}]):
        m.setattr(fm, "_quant_rows", quant_fp8_per_token_group)
        assert rel_err(fm.fused_moe(*args, **rows, per_channel_weights=True), want) < 1e-6
    assert rel_err(fm.fused_moe(*args, **rows, per_channel_weights=True), want) < 0.15
    wrong = dict(rows, w2_scale=rows["w2_scale"].flip(1))
    assert rel_err(fm.fused_moe(*args, **wrong, per_channel_weights=True), want) > 0.3
    with pytest.raises(ValueError, match=r"w13_scale \(4, 272, 2\) does not hold one scale a row"):
        fm.fused_moe(*args, **dict(rows, w13_scale=rows["w13_scale"].expand(4, 272, 2)), per_channel_weights=True)


def _weight_only_reference(args, w13_scale, w2_scale, per_channel):
    """W8A16: the 16-bit torch op over each expert's weight dequantised exactly (fp32)."""
    x, w13, w2, weights, ids = args
    if not per_channel:
        return w8a16_reference(*args, w13_scale=w13_scale, w2_scale=w2_scale)
    return resolve("fused_moe", "torch")[1](x, w13.float() * w13_scale, w2.float() * w2_scale, weights, ids)


@pytest.mark.parametrize("rows", [False, True], ids=["blocks", "rows"])
@pytest.mark.parametrize("tokens", [1, 6])
def test_fused_moe_fp8_weight_only(triton_ops, cpu_only, tokens, rows):
    """fp8 experts without activation quantisation (compressed-tensors FP8, no
    input_activations): the torch op and both Triton paths (1 token: the small path's CUDA-core
    kernels, 6: the sorted kernels with A16; 'channel' row scales always sorted) equal the 16-bit
    op over the exactly dequantised weights to fp32 rounding; the W8A8 op is far from it."""
    args, kwargs = moe_inputs(tokens, 256, 128, 4, 2, torch.float32, fp8=True)
    if rows:
        g = torch.Generator().manual_seed(5)
        kwargs = dict(w13_scale=torch.rand(4, 256, 1, generator=g) / 64 + 0.005,
                      w2_scale=torch.rand(4, 256, 1, generator=g) / 64 + 0.005, per_channel_weights=True)
    want = _weight_only_reference(args, kwargs["w13_scale"], kwargs["w2_scale"], rows)
    got_torch, got_triton = run_both("fused_moe", *args, **kwargs, weight_only=True)
    assert rel_err(got_torch, want) < 1e-6, rel_err(got_torch, want)
    assert rel_err(got_triton, want) < 1e-5, rel_err(got_triton, want)
    assert rel_err(resolve("fused_moe", "torch")[1](*args, **kwargs), want) > 1e-2     # W8A8
    if tokens == 1 and not rows:    # a table that puts the small path on the (W8A8) tensor cores
        from deepserve.ops.triton.launch_config import trying
        mma = [{"if": {"fp8": True, "kernel": k}, "set": {"MMA": 1, "BLOCK_N": 16}} for k in ("gate_up", "down")]
        with trying("fused_moe_small", mma):
            assert rel_err(resolve("fused_moe", "triton")[1](*args, **kwargs, weight_only=True), want) < 1e-5
    with pytest.raises(ValueError, match="weight_only is for fp8 experts"):
        resolve("fused_moe", "triton")[1](*moe_inputs(tokens, 64, 32, 4, 2, torch.float32)[0], weight_only=True)


@pytest.mark.parametrize("over", [{"GROUP_M": 1}, {"GROUP_M": 2}, {"GROUP_M": 1 << 20}],
                         ids=lambda o: str(o["GROUP_M"]))
def test_fused_moe_launch_order_changes_nothing(triton_ops, cpu_only, over):
    """Which tile a program takes (GROUP_M) moves no arithmetic: outputs are bit-identical,
    and several row and column blocks are in play (16-row blocks, 32-wide columns)."""
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton.launch_config import trying
    args, _ = moe_inputs(24, 64, 80, 3, 2, torch.float32)
    want = resolve("fused_moe", "torch")[1](*args)
    with trying("fused_moe", [{"set": over}]):
        got = fm.fused_moe(*args)
    assert torch.equal(got, fm.fused_moe(*args))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_moe_fp8_prequantised_rows_equal_in_kernel_quantisation(triton_ops, cpu_only):
    """fp8 activations quantised once per row (_quant_rows, the compute-bound path) give the
    same values and scales as quantising inside each GEMM program: identical outputs."""
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton.launch_config import trying
    args, kwargs = moe_inputs(6, 256, 128, 4, 2, torch.bfloat16, fp8=True, seed=1)
    outs = []
    for pre in (True, False):
        with trying("fused_moe", [{"set": {"PREQUANT": pre}}]):
            outs.append(fm.fused_moe(*args, **kwargs))
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], resolve("fused_moe", "torch")[1](*args, **kwargs)) < 0.15


# 16- and 32-bit weights take the same TMA code: fp32 stands for both
@pytest.mark.parametrize("dtype", [torch.float32, "fp8"], ids=str)
def test_fused_moe_tma_weight_tiles_equal_pointer_loads(triton_ops, cpu_only, dtype):
    """Expert weights read through TMA block descriptors (Hopper's path; here interpreted)
    give the outputs of pointer loads, with ragged column and K tiles (I 80 and D 64 against
    32-wide tiles; fp8: I 208 against 128) whose zero fill stands in for masks. Equal to
    rounding, not bit for bit: the interpreter's matmul may sum a transposed tile in another
    order, and which order depends on the machine's BLAS."""
    from deepserve.ops.triton import fused_moe as fm
    from deepserve.ops.triton.launch_config import trying
    if dtype == "fp8":
        args, kwargs = moe_inputs(6, 256, 208, 4, 2, torch.bfloat16, fp8=True, seed=3)
    else:
        args, kwargs = moe_inputs(24, 64, 80, 3, 2, dtype, seed=3)
    outs = []
    for tma in (True, False):
        with trying("fused_moe", [{"set": {"W_TMA": tma}}]):
            outs.append(fm.fused_moe(*args, **kwargs))
    torch.testing.assert_close(outs[0], outs[1])   # the dtype's own tolerance (fp32: 1.3e-6 relative)
    assert rel_err(outs[0], resolve("fused_moe", "torch")[1](*args, **kwargs)) < (0.15 if dtype == "fp8" else 3e-2)


def quant_rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's e4m3 rounding of x [R, C] over per-(row, 128 columns) scales amax / 448."""
    rows, cols = x.shape
    groups = -(-cols // 128)
    padded = torch.nn.functional.pad(x.float(), (0, groups * 128 - cols)).view(rows, groups, 128)
    scale = padded.abs().amax(-1).clamp(min=1e-10) / 448.0
    q = (padded / scale[..., None]).view(rows, -1)[:, :cols].to(torch.float8_e4m3fn)
    return q, scale


def test_quant_rows_matches_per_group_reference(triton_ops, cpu_only):
    """Row-wise e4m3 quantisation per 128 columns, a ragged last group included: the scales
    exactly; the values within the interpreter's e4m3 rounding (it truncates, and a carry
    into the exponent can land a power of two low), exactly on the GPU (test below)."""
    from deepserve.ops.triton.fused_moe import _quant_rows
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x[1, 128:256] = 0                                        # an all-zero group keeps a tiny scale
    q, s = _quant_rows(x)
    want_q, want_s = quant_rows_reference(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 3)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    assert rel_err(q.float(), want_q.float()) < 0.1


# ---- GPU, model sizes ---------------------------------------------------------------------

@pytest.mark.gpu
def test_quant_rows_gpu(triton_ops):
    from deepserve.ops.triton.fused_moe import _quant_rows
    x = torch.randn(4096, 7168 + 64, device="cuda").to(torch.bfloat16)
    q, s = _quant_rows(x)
    want_q, want_s = quant_rows_reference(x)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=0)
    # Triton's fp32 division may differ from torch's in the last bit, which can move a value
    # sitting on a rounding boundary by one e4m3 step: allow a few in 30M, none further
    differ = q.float() != want_q.float()
    assert differ.sum().item() <= 30
    one_step = (want_q.float().abs() * 0.125).clamp(min=2 ** -9)     # e4m3: 3 mantissa bits
    assert ((q.float() - want_q.float()).abs() <= one_step).all()


@pytest.mark.gpu
def test_moe_route_gpu(triton_ops):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(4096, 256, generator=g, device="cuda")
    check_route(logits, torch.randn(256, generator=g, device="cuda") * 0.1, ROUTES[2])
    check_route(logits[:, :160].contiguous(), None, ROUTES[1])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 300, 2048])
def test_fused_moe_gpu(triton_ops, tokens):
    """1: the small path; 300: 32-row blocks; 2048: 128-row blocks for bf16 (V2-Lite, 192 rows
    per expert) and 64-row blocks with rows quantised before the GEMMs for fp8."""
    args, _ = moe_inputs(tokens, 2048, 1408, 64, 6, torch.bfloat16, device="cuda")   # V2-Lite shapes
    want, got = run_both("fused_moe", *args)
    assert rel_err(got, want) < 1e-2
    args, kwargs = moe_inputs(tokens, 7168, 256, 32, 8, torch.bfloat16, device="cuda", fp8=True)
    want, got = run_both("fused_moe", *args, **kwargs)
    # the sorted path is W8A8 as the torch op; the small path's CUDA-core kernels W8A16
    from deepserve.ops.triton.fused_moe import use_small_path
    if use_small_path(tokens, 8, 32):
        want = w8a16_reference(*args, **kwargs)
    # interpreted in fp32 with torch's e4m3 cast, the sorted path equals the W8A8 torch op to 1e-6
    # (test_fused_moe_fp8_blocks), and both round at the same points (e4m3 rows by the same rule,
    # test_quant_rows_gpu; gate, up, SwiGLU and each down row to bf16, to nearest). On an H100 they
    # differed by 1.74-1.76% at 300 and 2,048 tokens. A model of the e4m3 tensor cores' sum (the 32
    # products of one MMA step aligned to the largest, ~13 bits of each kept, after DeepSeek-V3's
    # report 3.5.2), emulated in fp64 on these shapes, gives 1.72%; but one fp8 tl.dot on an H100
    # (benchmarks/fp8_mma_sum.py) is 1.2e-4 from the exact sum and equals that model in 7% of its
    # outputs, so the model is not the H100's adder and the gap's source is not located. The
    # bound keeps room for the measured gap; W8A16 is ~4% away.
    assert rel_err(got, want) < 3e-2, rel_err(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 300, 2048])
def test_fused_moe_fp8_weight_only_gpu(triton_ops, tokens):
    """Weight-only fp8 experts in bf16 at R1's expert shapes: the small path's CUDA-core kernels
    (1 token) and the sorted kernels with A16 against the 16-bit op over the dequantised weights."""
    args, kwargs = moe_inputs(tokens, 7168, 256, 32, 8, torch.bfloat16, device="cuda", fp8=True)
    got = resolve("fused_moe", "triton")[1](*args, **kwargs, weight_only=True)
    want = w8a16_reference(*args, **kwargs)
    assert rel_err(got, want) < 1e-2, rel_err(got, want)
