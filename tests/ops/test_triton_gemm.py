"""The several-row linear as a Triton GEMM against the torch reference F.linear(x.to(W.dtype), W, b).

CPU tests run the kernel interpreted at tiny sizes, including the masked edges (M, N, K not
multiples of the tiles) and several row tiles in one group; the per-shape choice between the
kernel and cuBLAS follows the launch table, and `--ops triton-all` forces the kernel. `gpu`
tests run the compiled kernel at the 8B and R1 prefill shapes.
"""
from __future__ import annotations

import pytest
import torch

from deepserve.ops import OpTable, resolve
from deepserve.ops.triton.launch_config import trying

SMALL_TILES = [{"set": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}}]
FORCE = [{"set": {"backend": "triton"}}]


@pytest.fixture
def triton_all(triton_ops):
    """The op table of --ops triton-all, counting its calls."""
    return OpTable("triton-all", count=True)


@pytest.mark.parametrize("m,n,k,dtype,w_dtype,bias", [
    (3, 40, 64, torch.bfloat16, torch.bfloat16, False), (20, 20, 40, torch.bfloat16, torch.bfloat16, True),
    (33, 3, 24, torch.float16, torch.float16, True), (5, 17, 32, torch.float16, torch.float16, False),
    (10, 8, 96, torch.bfloat16, torch.float32, False)])              # the MoE router: fp32 weight and logits
def test_gemm_rows(triton_all, cpu_only, m, n, k, dtype, w_dtype, bias):
    from deepserve.ops.triton.gemm import use_gemm
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.1).to(w_dtype)
    b = torch.randn(n, generator=g).to(w_dtype) if bias else None
    with trying("gemm", SMALL_TILES):                 # several tiles along M, N and K, masked edges
        assert use_gemm(x, w, force_triton=True) is not None   # linear() takes the kernel
        want = resolve("linear", "torch")[1](x.view(m, 1, k), w, b)
        got = triton_all.linear(x.view(m, 1, k), w, b)  # leading dims kept
    assert triton_all.counts[("linear", "triton")] == 1
    assert got.shape == want.shape == (m, 1, n) and got.dtype == w_dtype
    if w_dtype == torch.float32:                        # exact fp32 products (no TF32)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # fp32 accumulation and one rounding in both; summation order differs: one ulp
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2,
                                   rtol=2 ** -7 if w_dtype == torch.bfloat16 else 1e-3)


def test_table_picks_cublas_unless_forced(triton_ops, cpu_only, monkeypatch):
    """The default tables keep cuBLAS (nothing measured the kernel faster); a device rule or
    triton-all takes the kernel."""
    from deepserve.ops.triton.gemm import use_gemm
    from deepserve.ops.triton import gemv
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert use_gemm(x, w) is None
    want = resolve("linear", "torch")[1](x, w)
    assert torch.equal(OpTable("triton").linear(x, w), want)
    with trying("gemm", [{"if": {"m_ge": 4}, "set": {"backend": "triton"}}]):
        assert use_gemm(x, w)["backend"] == "triton"
        assert use_gemm(x[:3], w) is None           # the rule's shape condition
    assert use_gemm(x, w, force_triton=True) is not None and use_gemm(x[:3], w, force_triton=True) is not None
    assert use_gemm(x.to(torch.int8), w, force_triton=True) is None    # not a float product
    # the triton-all table's linear forces the kernel, the triton table's does not
    rows, real = [], gemv.gemm
    monkeypatch.setattr(gemv, "gemm", lambda *a: rows.append(a[0].shape[0]) or real(*a))
    OpTable("triton").linear(x, w)
    assert rows == []
    OpTable("triton-all").linear(x, w)
    assert rows == [4]


def test_linear_pair_rows_take_the_gemm(triton_all, cpu_only):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 64, generator=g).bfloat16()
    w1, w2 = (torch.randn(37, 64, generator=g) * 0.1).bfloat16(), (torch.randn(9, 64, generator=g) * 0.1).bfloat16()
    want = resolve("linear_pair", "torch")[1](x, w1, w2)
    got = triton_all.linear_pair(x, w1, w2)
    assert triton_all.counts[("linear_pair", "triton")] == 1 and triton_all.counts[("linear", "triton")] == 0
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_.float(), atol=1e-2, rtol=2 ** -7)


def test_gemm_rejects_a_wrong_width(triton_ops, cpu_only):
    from deepserve.ops.triton.gemm import gemm
    with pytest.raises(ValueError, match=r"x has 32 features, weight \(8, 64\) takes 64"):
        gemm(torch.zeros(2, 32).bfloat16(), torch.zeros(8, 64).bfloat16())


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(7, 6144, 4096), (64, 4096, 14336), (512, 28672, 4096), (300, 24576, 1536),
                                   (2048, 7168, 2048)])
def test_gemm_gpu_model_shapes(triton_ops, m, n, k):
    from deepserve.ops.triton.gemm import gemm
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    torch.testing.assert_close(gemm(x, w).float(), resolve("linear", "torch")[1](x, w).float(), atol=2e-3,
                               rtol=2 ** -7)
