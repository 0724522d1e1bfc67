"""The several-row linear as a Triton GEMM against the torch reference F.linear(x.to(W.dtype), W, b).

CPU tests run the kernel interpreted at tiny sizes, including the masked edges (M, N, K not
multiples of the tiles) and several row tiles in one group; the per-shape choice between the
kernel and cuBLAS follows the launch table, and `--ops triton-all` forces the kernel with the
tiles of the table's rule (a "cublas" rule's too). Split-K (SPLIT_K > 1: partial sums over
pieces of K, then a sum kernel) against the same reference, with K not a multiple of
SPLIT_K * BLOCK_K and M not of BLOCK_M. `gpu` tests run the compiled kernel at the 8B and R1
prefill and decode shapes, split-K inside a CUDA graph among them.
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


def close_to_linear(got, want, w_dtype=torch.bfloat16):
    """One ulp of the weight's dtype: fp32 accumulation and one rounding in both, in another order."""
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2,
                               rtol=2 ** -7 if w_dtype == torch.bfloat16 else 1e-3)


class LaunchSpy:
    """Stands in for a @triton.jit kernel of gemm.py, recording each launch's grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def launches(triton_ops, monkeypatch):
    """{"gemm": spy, "sum": spy} over the GEMM and split-K sum kernels."""
    from deepserve.ops.triton import gemm as gemm_mod
    spies = {"gemm": LaunchSpy(gemm_mod._gemm_kernel), "sum": LaunchSpy(gemm_mod._split_k_sum)}
    monkeypatch.setattr(gemm_mod, "_gemm_kernel", spies["gemm"])
    monkeypatch.setattr(gemm_mod, "_split_k_sum", spies["sum"])
    return spies


@pytest.mark.parametrize("m,n,k,split,bias,dtype", [
    (5, 40, 200, 3, True, torch.bfloat16),      # K = 12.5 steps of 16: pieces of 5, 5, 2.5 steps
    (20, 33, 96, 2, False, torch.bfloat16),     # M across two row tiles, N three column tiles
    (3, 17, 72, 4, True, torch.float16),        # the last piece is the masked tail alone
    (33, 8, 48, 8, False, torch.bfloat16),      # more splits than K steps: pieces 3..7 empty
    (6, 24, 80, 2, True, torch.float32)])       # fp32 weights: exact products
def test_split_k_matches_linear(triton_all, cpu_only, launches, m, n, k, split, bias, dtype):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    tiles = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "SPLIT_K": split}
    with trying("gemm", [{"set": tiles}]):
        got = triton_all.linear(x.view(m, 1, k), w, b)
        again = triton_all.linear(x.view(m, 1, k), w, b)
    want = resolve("linear", "torch")[1](x.view(m, 1, k), w, b)
    assert got.shape == want.shape == (m, 1, n) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        close_to_linear(got, want, dtype)
    assert torch.equal(got, again)              # the partials are summed in one fixed order
    tile_count = -(-m // 16) * -(-n // 16)
    assert launches["gemm"].grids == [(tile_count, split)] * 2
    assert launches["sum"].grids == [(-(-m * n // 1024),)] * 2


def test_split_k_one_is_the_single_launch(triton_all, cpu_only, launches):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(9, 64, generator=g).bfloat16(), torch.randn(24, 64, generator=g).bfloat16(), None
    for split in (1, 2):
        with trying("gemm", [{"set": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split}}]):
            close_to_linear(triton_all.linear(x, w, b), resolve("linear", "torch")[1](x, w, b))
    assert launches["gemm"].grids == [(2,), (2, 2)] and launches["sum"].grids == [(1,)]
    from deepserve.ops.triton.gemm import gemm
    with pytest.raises(ValueError, match="SPLIT_K is a positive integer, got 0"):
        gemm(x, w, None, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, "SPLIT_K": 0,
                          "num_warps": 1, "num_stages": 1})


def test_forced_triton_takes_the_tiles_of_a_cublas_rule(triton_ops, cpu_only, launches):
    """A swept bucket where cuBLAS won keeps the best Triton tiles in its rule: `--ops triton`
    takes cuBLAS there, `--ops triton-all` the kernel with those tiles (split-K included)."""
    from deepserve.ops.triton.gemm import use_gemm
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(12, 160, generator=g).bfloat16(), (torch.randn(40, 160, generator=g) * 0.1).bfloat16()
    swept = {"backend": "cublas", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "SPLIT_K": 3,
             "num_warps": 2, "num_stages": 2}
    with trying("gemm", [{"if": {"m_gt": 4, "m_le": 16, "n": 40, "k": 160}, "set": swept}]):
        assert use_gemm(x, w) is None                                  # --ops triton: cuBLAS
        assert use_gemm(x, w, force_triton=True) == swept
        assert use_gemm(x[:4], w, force_triton=True)["SPLIT_K"] == 1   # outside the rule's rows
        assert torch.equal(OpTable("triton").linear(x, w), resolve("linear", "torch")[1](x, w))
        assert launches["gemm"].grids == []
        got = OpTable("triton-all").linear(x, w)
    close_to_linear(got, resolve("linear", "torch")[1](x, w))
    assert launches["gemm"].grids == [(2, 3)] and launches["sum"].grids == [(1,)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,split", [(64, 4096, 14336, 4), (64, 4096, 4096, 2), (16, 6144, 4096, 8),
                                         (50, 7168, 18432, 4), (256, 576, 7168, 8), (33, 4096, 4100, 3)])
def test_split_k_gpu_model_shapes(triton_ops, m, n, k, split):
    """Split-K at the 8B's and R1's decode shapes against the fp32 product (cuBLAS itself is two bf16
    ulps off it where K is not a multiple of 8), with a bias, also as a CUDA graph replay (the
    partials' workspace allocated in capture): within one bf16 rounding."""
    from deepserve.ops.triton.gemm import gemm
    g = torch.Generator(device="cuda").manual_seed(m + n + split)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    cfg = {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "SPLIT_K": split,
           "num_warps": 4, "num_stages": 3}
    eager = gemm(x, w, b, cfg)
    torch.testing.assert_close(eager.float(), x.float() @ w.float().t() + b.float(), atol=2e-3, rtol=2 ** -7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemm(x, w, b, cfg)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = gemm(x, w, b, cfg)
    x.copy_(torch.randn(m, k, device="cuda", generator=g).bfloat16())
    graph.replay()
    torch.testing.assert_close(replayed.float(), x.float() @ w.float().t() + b.float(), atol=2e-3, rtol=2 ** -7)
    assert torch.equal(replayed, gemm(x, w, b, cfg))


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
