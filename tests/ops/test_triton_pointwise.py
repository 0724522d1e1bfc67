"""Triton norm / activation / rotary / KV-write kernels against their torch references.

CPU tests run the kernels under TRITON_INTERPRET=1 at tiny sizes (set in conftest.py);
`gpu` tests run the compiled kernels at model sizes. The interpreter rounds fp32 -> bf16 by
truncation, not to nearest even like the GPU, so bf16 checks allow one bf16 ulp there.
"""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import op_backends, resolve

BF16_ULP = 2.0 ** -7


def run_both(op: str, *args):
    return resolve(op, "torch")[1](*args), resolve(op, "triton")[1](*args)


def assert_close_ulp(got: torch.Tensor, want: torch.Tensor, ulps: float = 1.0):
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs()
    bound = ulps * BF16_ULP * want.float().abs() + 1e-6
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} over {ulps} bf16 ulp"


def test_every_kernel_is_registered(triton_ops):
    table = op_backends()
    for op in ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding",
               "write_kv_cache", "paged_attention"):
        assert table[op][:2] == ["torch", "triton"], (op, table[op])   # then any installed platform's own


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_exact_dtypes(triton_ops, cpu_only, dtype):
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 80, generator=g).to(dtype)
    x = wide[:, :40]                                   # strided rows
    w = torch.randn(40, generator=g).to(dtype)
    want, got = run_both("rms_norm", x, w, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)


def test_rms_norm_bf16_with_fp32_weight(triton_ops, cpu_only):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(64, generator=g)
    want, got = run_both("rms_norm", x, w, 1e-6)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 64)
    # the bf16 rounding of the normalised row may differ by one ulp, then times w
    torch.testing.assert_close(got, want, rtol=2 * BF16_ULP, atol=1e-6)


def test_fused_add_rms_norm(triton_ops, cpu_only):
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(2, 5, 48, generator=g), torch.randn(2, 5, 48, generator=g)
    w = torch.randn(48, generator=g)
    (want, want_res), (got, got_res) = run_both("fused_add_rms_norm", x, r, w, 1e-6)
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    xb, rb, wb = x.bfloat16(), r.bfloat16(), w.bfloat16()
    (want, want_res), (got, got_res) = run_both("fused_add_rms_norm", xb, rb, wb, 1e-6)
    assert_close_ulp(got_res, want_res)
    assert_close_ulp(got, want, ulps=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(triton_ops, cpu_only, dtype):
    g = torch.Generator().manual_seed(4)
    x = (3 * torch.randn(3, 2, 2 * 72, generator=g)).to(dtype)
    want, got = run_both("silu_and_mul", x)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert_close_ulp(got, want, ulps=2)
    with pytest.raises(ValueError, match="even last dim, got 7"):
        resolve("silu_and_mul", "triton")[1](torch.zeros(2, 7))


@pytest.mark.parametrize("is_neox", [True, False])
def test_rotary_embedding_strided(triton_ops, cpu_only, is_neox):
    g = torch.Generator().manual_seed(5)
    t, rot = 7, 16
    q_full = torch.randn(t, 4, 24 + rot, generator=g)       # MLA-like: rope part is a slice
    q = q_full[..., 24:]
    k = torch.randn(t, 1, rot, generator=g)
    positions = torch.tensor([0, 1, 5, 9, 31, 2, 17])
    cache = torch.randn(32, rot, generator=g)
    (wq, wk), (gq, gk) = run_both("rotary_embedding", positions, q, k, cache, is_neox)
    torch.testing.assert_close(gq, wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gk, wk, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(gq, q)                          # it did rotate


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("with_k", [True, False])
def test_rotary_embedding_in_place(triton_ops, cpu_only, backend, with_k):
    """inplace: the rope slice of a wider row rotated where it lies (the rest of the row, and
    with k None any other tensor, untouched), the values the copying op returns."""
    g = torch.Generator().manual_seed(8)
    t, rot = 6, 16
    q_full = torch.randn(t, 4, 24 + rot, generator=g)
    k = torch.randn(t, 1, rot, generator=g)
    positions = torch.tensor([0, 3, 5, 9, 31, 2])
    cache = torch.randn(32, rot, generator=g)
    want_q, want_k = resolve("rotary_embedding", "torch")[1](positions, q_full[..., 24:], k, cache, False)
    q_before, k_before = q_full.clone(), k.clone()
    got_q, got_k = resolve("rotary_embedding", backend)[1](positions, q_full[..., 24:], k if with_k else None,
                                                           cache, False, inplace=True)
    assert got_q.data_ptr() == q_full[..., 24:].data_ptr()
    torch.testing.assert_close(q_full[..., 24:], want_q, rtol=1e-6, atol=1e-6)
    assert torch.equal(q_full[..., :24], q_before[..., :24]) and not torch.allclose(q_full, q_before)
    if with_k:
        assert got_k is k
        torch.testing.assert_close(k, want_k, rtol=1e-6, atol=1e-6)
    else:
        assert got_k is None and torch.equal(k, k_before)


def test_rotary_embedding_bf16(triton_ops, cpu_only):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(5, 4, 32, generator=g).bfloat16()
    k = torch.randn(5, 2, 32, generator=g).bfloat16()
    cache = torch.randn(16, 32, generator=g)
    (wq, wk), (gq, gk) = run_both("rotary_embedding", torch.arange(5) * 3, q, k, cache, True)
    assert_close_ulp(gq, wq, ulps=1)
    assert_close_ulp(gk, wk, ulps=1)


def _write_kv_case(mla: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    nb, bs, hk, d = 5, 4, (1 if mla else 2), (24 if mla else 8)
    key = torch.randn(6, hk, d, generator=g).to(dtype)
    slots = torch.tensor([3, -1, 17, 0, 19, -1])
    k_cache = torch.zeros(nb, bs, hk, d, dtype=dtype)
    if mla:
        return key, None, k_cache, k_cache[..., :16], slots
    value = torch.randn(6, hk, d, generator=g).to(dtype)
    return key, value, k_cache, torch.zeros(nb, bs, hk, d, dtype=dtype), slots


@pytest.mark.parametrize("mla", [False, True])
def test_write_kv_cache(triton_ops, cpu_only, mla):
    ref_args = _write_kv_case(mla)
    tri_args = _write_kv_case(mla)
    resolve("write_kv_cache", "torch")[1](*ref_args)
    resolve("write_kv_cache", "triton")[1](*tri_args)
    assert torch.equal(tri_args[2], ref_args[2])
    assert torch.equal(tri_args[3], ref_args[3])
    assert int((tri_args[2] != 0).any(-1).any(-1).sum()) == 4    # 4 real slots, 2 padding rows


# ---- GPU, model sizes --------------------------------------------------------------------

@pytest.mark.gpu
def test_pointwise_gpu(triton_ops):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4096, 4096, generator=g, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(4096, generator=g, device="cuda", dtype=torch.bfloat16)
    want, got = run_both("rms_norm", x, w, 1e-6)
    assert_close_ulp(got, want, ulps=2)
    (want, want_res), (got, got_res) = run_both("fused_add_rms_norm", x, r, w, 1e-6)
    assert torch.equal(got_res, want_res)                     # both round to nearest even
    assert_close_ulp(got, want, ulps=2)
    h = torch.randn(2048, 2 * 14336, generator=g, device="cuda", dtype=torch.bfloat16)
    want, got = run_both("silu_and_mul", h)
    assert_close_ulp(got, want, ulps=1)
    pos = torch.randint(0, 8192, (4096,), generator=g, device="cuda")
    cache = torch.randn(8192, 128, generator=g, device="cuda")
    q = torch.randn(4096, 32, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4096, 8, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    for neox in (True, False):
        (wq, wk), (gq, gk) = run_both("rotary_embedding", pos, q, k, cache, neox)
        assert_close_ulp(gq, wq, ulps=1)
        assert_close_ulp(gk, wk, ulps=1)


@pytest.mark.gpu
def test_write_kv_cache_gpu(triton_ops):
    g = torch.Generator(device="cuda").manual_seed(1)
    key = torch.randn(3000, 1, 576, generator=g, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(4096 * 64, generator=g, device="cuda")[:3000]
    slots[::7] = -1
    caches = [torch.zeros(4096, 64, 1, 576, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    resolve("write_kv_cache", "torch")[1](key, None, caches[0], caches[0][..., :512], slots)
    resolve("write_kv_cache", "triton")[1](key, None, caches[1], caches[1][..., :512], slots)
    assert torch.equal(caches[0], caches[1])
