"""The one-row linear (Triton GEMV) against the torch reference F.linear(x.to(W.dtype), W, b).

CPU tests run the kernel interpreted at tiny sizes, including the masked edges (N not a
multiple of the rows per program, K not a multiple of the K step); `gpu` tests run the
compiled kernel at the batch-1 shapes of the 8B, V2-Lite and R1 models.
"""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve


def both(*args):
    return resolve("linear", "torch")[1](*args), resolve("linear", "triton")[1](*args)


@pytest.mark.parametrize("n,k", [(40, 64), (37, 100), (3, 192)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_bf16_one_row(triton_ops, cpu_only, n, k, bias):
    g = torch.Generator().manual_seed(n * k)
    x = torch.randn(1, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    want, got = both(x, w, b)
    assert got.shape == want.shape == (1, n) and got.dtype == torch.bfloat16
    # both accumulate in fp32 and round once; summation order differs: one bf16 ulp
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2 ** -7)


def test_gemv_router_fp32_weight_bf16_row(triton_ops, cpu_only):
    """The MoE router: bf16 activation, fp32 weight, fp32 logits, in one launch."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1, 96, generator=g).bfloat16()          # leading dims kept
    w = torch.randn(8, 96, generator=g)
    want, got = both(x, w)
    assert got.shape == (1, 1, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_several_rows_keep_the_reference_path(triton_ops, cpu_only):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=g).bfloat16()
    w = torch.randn(16, 64, generator=g).bfloat16()
    want, got = both(x, w)
    assert torch.equal(got, want)


def test_gemv_rejects_a_wrong_width(triton_ops, cpu_only):
    from deepserve.ops.triton.gemv import gemv
    with pytest.raises(ValueError, match="one row of 64 features"):
        gemv(torch.zeros(1, 32).bfloat16(), torch.zeros(8, 64).bfloat16())


GPU_SHAPES = [(6144, 4096), (4096, 4096), (4096, 14336), (576, 2048), (2048, 10944), (64, 2048),
              (24576, 1536), (102400, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", GPU_SHAPES)
def test_gemv_gpu_model_shapes(triton_ops, n, k):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    want, got = both(x, w)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2 ** -7)
    wf = w.float()
    want32, got32 = both(x, wf)                                  # router-style fp32 weight
    torch.testing.assert_close(got32, want32, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [64, 100])
def test_linear_pair_one_launch_matches_two_linears(triton_ops, cpu_only, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(1, k, generator=g).bfloat16()
    w1 = (torch.randn(37, k, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(9, k, generator=g) * 0.1).bfloat16()
    want = resolve("linear_pair", "torch")[1](x, w1, w2)
    got = resolve("linear_pair", "triton")[1](x, w1, w2)
    for g_, w_ in zip(got, want):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype
        torch.testing.assert_close(g_.float(), w_.float(), atol=1e-2, rtol=2 ** -7)
    # several rows: the reference path, exactly
    x3 = torch.randn(3, k, generator=g).bfloat16()
    for g_, w_ in zip(resolve("linear_pair", "triton")[1](x3, w1, w2), resolve("linear_pair", "torch")[1](x3, w1, w2)):
        assert torch.equal(g_, w_)


@pytest.mark.gpu
@pytest.mark.parametrize("n1,n2,k", [(3072, 576, 2048), (1536, 576, 7168)])   # V2-Lite q+kv_a, R1 q_a+kv_a
def test_linear_pair_gpu(triton_ops, n1, n2, k):
    g = torch.Generator(device="cuda").manual_seed(n1)
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(n1, k, device="cuda", generator=g) * 0.02).bfloat16()
    w2 = (torch.randn(n2, k, device="cuda", generator=g) * 0.02).bfloat16()
    want = resolve("linear_pair", "torch")[1](x, w1, w2)
    got = resolve("linear_pair", "triton")[1](x, w1, w2)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_.float(), atol=2e-3, rtol=2 ** -7)


def test_gemv_pair_rejects_mismatched_weights(triton_ops, cpu_only):
    from deepserve.ops.triton.gemv import gemv_pair
    x = torch.zeros(1, 64).bfloat16()
    with pytest.raises(ValueError, match=r"two \[N, 64\] weights of one dtype"):
        gemv_pair(x, torch.zeros(8, 64).bfloat16(), torch.zeros(4, 32).bfloat16())
    with pytest.raises(ValueError, match="one dtype"):
        gemv_pair(x, torch.zeros(8, 64).bfloat16(), torch.zeros(4, 64))
    with pytest.raises(ValueError, match="one row of 64 features"):
        gemv_pair(torch.zeros(2, 64).bfloat16(), torch.zeros(8, 64).bfloat16(), torch.zeros(4, 64).bfloat16())


def test_plain_weight_only_for_a_bare_x_w_product():
    """What MLA's paired projection and the shared-expert fold may take straight to a kernel."""
    from deepserve.distributed.parallel_state import ParallelContext
    from deepserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    from deepserve.layers.quantization import make_method
    one, two = ParallelContext(), ParallelContext(tp_size=2)
    plain = ReplicatedLinear(8, 4, params_dtype=torch.bfloat16)
    assert plain.plain_weight() is plain.weight
    assert ReplicatedLinear(8, 4, bias=True).plain_weight() is None
    assert ColumnParallelLinear(8, 4, pctx=two).plain_weight() is not None          # a local shard
    assert ColumnParallelLinear(8, 4, pctx=two, gather_output=True).plain_weight() is None
    assert ColumnParallelLinear(8, 4, pctx=one, gather_output=True).plain_weight() is not None
    assert RowParallelLinear(8, 4, pctx=two).plain_weight() is None                  # all-reduced
    assert RowParallelLinear(8, 4, pctx=two, reduce_results=False).plain_weight() is not None
    quantized = ReplicatedLinear(256, 256, params_dtype=torch.bfloat16)
    quantized.set_quant_method(make_method("fp8", (128, 128)))
    assert quantized.plain_weight() is None
