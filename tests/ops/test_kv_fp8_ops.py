"""FP8 KV pools (float8 e4m3; `--kv-cache-dtype fp8`) in the attention and KV-write ops: the
Triton attention (prefill tiles and split-KV decode, GQA and MLA's latent pool) over an e4m3
pool equals the torch reference over the same pool; the writes round and saturate at +-448.
MLA decode over an e4m3 latent pool multiplies e4m3 q by the e4m3 latent: it equals the torch
reference given q rounded the kernel's way (per head row, a power of two puts the largest
|q| in [128, 256), then round to nearest e4m3), and stays within what that rounding allows of
the reference on q itself. CPU cases run interpreted."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.paged_batch import make_paged_batch

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: rounding q moves each element by at most 2^-4 of its size, and
# each logit by at most 2^-4 of sum |q_i k_i| * scale; over random q and k of these sizes the
# output moves ~2.5% (relative norm). The bound below leaves room, and an error in the kernel
# (a wrong scale, tile or head) gives O(1).
Q_E4M3_REL_ERR = 0.06


def q_rounded_to_e4m3(q: torch.Tensor) -> torch.Tensor:
    """q [T, H, D] as the MLA fp8 decode kernel multiplies it: each head row scaled by the power
    of two that puts its largest |q| in [128, 256), rounded to e4m3 (ties to even), scaled back."""
    amax = q.float().abs().amax(-1, keepdim=True)
    mul = torch.where(amax > 0, torch.exp2(7 - torch.floor(torch.log2(amax))), torch.ones_like(amax))
    return ((q.float() * mul).to(FP8).float() / mul).to(q.dtype)


def triton_attention():
    """The Triton paged_attention, checked to be the kernel: resolve falls back to the torch
    reference for a backend that registered none, and a test would then compare the reference
    with itself."""
    backend, fn = resolve("paged_attention", "triton")
    assert backend == "triton", backend
    return fn


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def fp8_pool(pb):
    """The batch with its pool rounded to e4m3 (the MLA value view kept a view of the keys)."""
    k = pb.k_cache.to(FP8)
    shared = pb.v_cache.data_ptr() == pb.k_cache.data_ptr()
    v = k[..., :pb.v_cache.shape[-1]] if shared else pb.v_cache.to(FP8)
    return dataclasses.replace(pb, k_cache=k, v_cache=v)


@pytest.mark.parametrize("case", ["gqa_prefill", "gqa_decode", "mla_decode", "mla_prefill"])
def test_triton_attention_reads_an_fp8_pool_like_the_torch_reference(triton_ops, cpu_only, case):
    kw = dict(num_heads=4, num_kv_heads=1, head_dim=48, v_head_dim=32, mla=True, block_size=16) \
        if case.startswith("mla") else dict(num_heads=4, num_kv_heads=2, head_dim=32)
    q_lens = [1, 1, 1] if case.endswith("decode") else [5, 20, 1]
    seqs = [5, 37, 40]
    pb = fp8_pool(make_paged_batch(q_lens, seqs, **kw))
    got = triton_attention()(*pb.args(0.125))
    if case == "mla_decode":        # e4m3 q (module docstring)
        assert rel_err(got, resolve("paged_attention", "torch")[1](*pb.args(0.125))) < Q_E4M3_REL_ERR
        pb = dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q))
    want = resolve("paged_attention", "torch")[1](*pb.args(0.125))
    rows = int(pb.query_start_loc[-1])
    torch.testing.assert_close(got[:rows], want[:rows], atol=1e-5, rtol=1e-5)
    # and the fp8 pool holds what a 16-bit pool would, to e4m3 rounding
    exact = resolve("paged_attention", "torch")[1](*make_paged_batch(q_lens, seqs, **kw).args(0.125))
    err = (got[:rows] - exact[:rows]).norm() / exact[:rows].norm()
    assert err < 0.05, err          # e4m3 keeps 3 mantissa bits: ~2-3% relative per value


def test_mla_fp8_decode_kernel_against_the_split_kernel_and_q_rounding(triton_ops, cpu_only, monkeypatch):
    """The e4m3-product kernel against the 16-bit-product split kernel over the same pool (the
    switch the A/B benchmark flips): they differ by q's rounding alone. Several tiles and splits
    per row, a row of one token and a scaled pool (k_scale = v_scale, as MLA's latent)."""
    import deepserve.ops.triton.attention as tri_attention
    kw = dict(num_heads=4, num_kv_heads=1, head_dim=48, v_head_dim=32, mla=True, block_size=16)
    pb = fp8_pool(make_paged_batch([1, 1, 1, 1], [1, 64, 17, 300], **kw))
    op = triton_attention()
    got = op(*pb.args(0.125), k_scale=0.5, v_scale=0.5)
    monkeypatch.setattr(tri_attention, "MLA_FP8_MMA", False)
    split_q = op(*pb.args(0.125), k_scale=0.5, v_scale=0.5)
    split_rounded = op(*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.125), k_scale=0.5, v_scale=0.5)
    torch.testing.assert_close(got, split_rounded, atol=1e-5, rtol=1e-5)
    assert 1e-3 < rel_err(got, split_q) < Q_E4M3_REL_ERR       # q's rounding shows, within its bound
    want = resolve("paged_attention", "torch")[1](*pb.args(0.125), k_scale=0.5, v_scale=0.5)
    assert rel_err(split_q, want) < 1e-5


@pytest.mark.parametrize("fused_merge,qk_promote", [(0, 0), (1, 0), (0, 128)])
def test_mla_fp8_decode_merges_many_splits_with_empty_ones(triton_ops, cpu_only, monkeypatch, fused_merge,
                                                           qk_promote):
    """A launch table that cuts the context into 16-key splits (more than the merge loads at
    once, rows ending long before the last split) gives the split kernel's result over the
    rounded q, merged by the second launch or by each row's last split (fused_merge), with the
    QK product's sums promoted every 128 latent dims or not (qk_promote: the same sums off the
    GPU); the table's settings reach the kernel (a wrong BLOCK_H or qk_promote is refused)."""
    import deepserve.ops.triton.attention as tri_attention
    from deepserve.ops.triton.launch_config import trying
    kw = dict(num_heads=4, num_kv_heads=1, head_dim=48, v_head_dim=32, mla=True, block_size=16)
    pb = fp8_pool(make_paged_batch([1, 1, 1], [1, 300, 40], **kw))
    op = triton_attention()
    setting = {"programs_per_sm": 64, "min_split": 16, "fused_merge": fused_merge, "qk_promote": qk_promote}
    with trying("mla_decode_fp8", [{"set": setting}]):
        assert tri_attention.fp8_decode_splits(3, 1, 300, 16, tri_attention.sm_count(pb.q.device), 64, 16) == 19
        got = op(*pb.args(0.125))
        with trying("mla_decode_fp8", [{"set": {"BLOCK_H": 24}}]):
            with pytest.raises(ValueError, match="BLOCK_H must be a power of two"):
                op(*pb.args(0.125))
        with trying("mla_decode_fp8", [{"set": {"fused_merge": "yes"}}]):
            with pytest.raises(ValueError, match="fused_merge must be 0 or 1, got 'yes'"):
                op(*pb.args(0.125))
        with trying("mla_decode_fp8", [{"set": {"qk_promote": 32}}]):
            with pytest.raises(ValueError, match="qk_promote must be 0, 64, 128 or 256, got 32"):
                op(*pb.args(0.125))
    monkeypatch.setattr(tri_attention, "MLA_FP8_MMA", False)
    want = op(*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.125))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dv_run,warps", [(2, 4), (4, 4), (16, 4), (2, 8), (4, 8)])
def test_mla_fp8_decode_with_the_latent_dims_permuted_for_the_pv_product(triton_ops, cpu_only, monkeypatch, dv_run,
                                                                        warps):
    """dv_run > 1 feeds the P.V product the latent dims in another order (rows of V^T a thread
    reads at once adjacent, for one or two warp groups) and stores each output row at its dim:
    R1's 576 / 512 latent, the same output as the split kernel over the rounded q."""
    import deepserve.ops.triton.attention as tri_attention
    from deepserve.ops.triton.launch_config import trying
    kw = dict(num_heads=2, num_kv_heads=1, head_dim=576, v_head_dim=512, mla=True, block_size=16)
    pb = fp8_pool(make_paged_batch([1, 1], [20, 33], **kw))
    op = triton_attention()
    with trying("mla_decode_fp8", [{"set": {"dv_run": dv_run, "num_warps": warps}}]):
        got = op(*pb.args(0.05))
    monkeypatch.setattr(tri_attention, "MLA_FP8_MMA", False)
    want = op(*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.05))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,ctx,pps,min_split,splits", [
    (64, 4096, 4, 256, 8),      # 528 programs an SM's worth / 64 rows: 8 splits of 512 keys
    (64, 4096, 2, 256, 4),      # 264 / 64 = 4.1: 4 splits in one wave, not 5 in 1.2 waves
    (256, 4096, 4, 256, 2),
    (1, 4096, 4, 256, 16),      # the floor of keys a split bounds batch 1
    (1, 4096, 4, 64, 64),       # ... and MAX_SPLITS
    (64, 4000, 4, 256, 8),      # 500 keys a split round up to 512: still no empty split
    (64, 4096, 1, 256, 2),
    (300, 100, 1, 256, 1)])
def test_fp8_decode_split_count(batch, ctx, pps, min_split, splits):
    from deepserve.ops.triton.attention import fp8_decode_splits
    got = fp8_decode_splits(batch, 1, ctx, 64, 132, pps, min_split)
    assert got == splits
    split_len = -(-(-(-ctx // got)) // 64) * 64       # the kernel's: whole 64-key tiles
    assert (got - 1) * split_len < ctx <= got * split_len          # the last split is not empty


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_writes_round_and_saturate_into_an_fp8_pool(triton_ops, cpu_only, backend):
    key = torch.tensor([[[1.0, -3.3, 500.0, -1000.0]]]).repeat(3, 1, 1)     # [T=3, H=1, D=4]
    pool = torch.zeros(2, 4, 1, 4, dtype=FP8)
    slots = torch.tensor([5, -1, 2])
    resolve("write_kv_cache", backend)[1](key, None, pool, None, slots)
    flat = pool.view(-1, 1, 4).float()
    want = torch.tensor([1.0, -3.25, 448.0, -448.0])
    assert torch.equal(flat[5, 0], want) and torch.equal(flat[2, 0], want)
    assert not flat[[0, 1, 3, 4, 6, 7]].any()          # padding slot -1 wrote nothing


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_writes_divide_by_the_scale(triton_ops, cpu_only, backend):
    """write_kv_cache and mla_kv_write store x / scale (times fp32 1 / scale, saturating): a
    small key keeps e4m3's 3 mantissa bits under its scale and loses them at 1.0; the Triton
    writes equal the torch ones byte for byte."""
    key = torch.tensor([[[0.01, -0.0031, 0.0007, -2.0]]]).repeat(2, 1, 1)      # [T=2, H=1, D=4]
    slots = torch.tensor([1, 6])
    pools = {s: torch.zeros(2, 4, 1, 4, dtype=FP8) for s in (1.0, 1 / 64)}
    for s, pool in pools.items():
        resolve("write_kv_cache", backend)[1](key, key, pool, pool, slots, k_scale=s, v_scale=s)
    want = (key[0, 0] * 64).to(FP8).float().clamp(-448, 448) / 64
    got = pools[1 / 64].view(-1, 4)[6].float() / 64
    assert torch.equal(got, want) and float(pools[1 / 64].view(-1, 4)[6, 3]) == -128.0
    err = {s: float(((p.view(-1, 4)[1].float() * s - key[0, 0]).abs() / key[0, 0].abs())[:3].max())
           for s, p in pools.items()}
    assert err[1 / 64] <= 2 ** -4 < err[1.0], err            # e4m3 rounding vs subnormal loss
    if backend == "triton":
        ref = torch.zeros_like(pools[1 / 64])
        resolve("write_kv_cache", "torch")[1](key, key, ref, ref, slots, k_scale=1 / 64, v_scale=1 / 64)
        assert torch.equal(ref.view(torch.uint8), pools[1 / 64].view(torch.uint8))
        from tests.ops.test_triton_mla_prep import setup
        positions, kv_a, q, w_uk, norm_w, cache = setup(3, 2, 16, 40, 8, False, torch.float32)
        mla = [torch.zeros(4, 4, 1, 48, dtype=FP8) for _ in range(3)]
        mla_slots = torch.tensor([2, -1, 9])
        for b, pool in zip(("torch", "triton"), mla[:2]):
            resolve("mla_kv_write", b)[1](kv_a * 0.01, positions, cache, False, norm_w * 0.01, 1e-6, pool,
                                          mla_slots, kv_scale=0.01)
        resolve("mla_decode_prep", "triton")[1](q, kv_a * 0.01, positions, cache, False, w_uk, norm_w * 0.01, 1e-6,
                                                mla[2], mla_slots, kv_scale=0.01)
        assert mla[0].view(torch.uint8).any()
        assert all(torch.equal(mla[0].view(torch.uint8), m.view(torch.uint8)) for m in mla[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mla_decode", "mla_prefill", "gqa_decode", "gqa_prefill"])
def test_gpu_attention_over_an_fp8_pool_at_r1_and_8b_shapes(case):
    """R1's latent pool (128 heads over one 576-wide KV head, 512-wide values, 64-token pages) and
    the 8B distill's GQA (32 q / 8 kv heads of 128) in bf16 activations over an e4m3 pool."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kw = dict(num_heads=128, num_kv_heads=1, head_dim=576, v_head_dim=512, mla=True, block_size=64) \
        if case.startswith("mla") else dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    q_lens = [1] * 8 if case.endswith("decode") else [300, 17, 1]
    seqs = [100, 900, 4000, 31, 2048, 1, 700, 1500] if case.endswith("decode") else [300, 1000, 77]
    pb = fp8_pool(make_paged_batch(q_lens, seqs, dtype=torch.bfloat16, device="cuda", **kw))
    got = triton_attention()(*pb.args(0.07))
    if case == "mla_decode":        # e4m3 q (module docstring)
        assert rel_err(got, resolve("paged_attention", "torch")[1](*pb.args(0.07))) < Q_E4M3_REL_ERR
        pb = dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q))
    want = resolve("paged_attention", "torch")[1](*pb.args(0.07))
    rows = int(pb.query_start_loc[-1])
    torch.testing.assert_close(got[:rows].float(), want[:rows].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("settings", [{}, {"dv_run": 4}, {"dv_run": 2, "BLOCK_H": 16, "num_warps": 4},
                                      {"dv_run": 4, "fused_merge": 1}, {"qk_promote": 128}])
def test_gpu_mla_fp8_decode_at_r1_shapes(heads, settings):
    """R1's latent pool at 16 heads (TP8) and 128, batch 64 rows of 1 to 4k tokens, 64-token
    pages, scaled (k_scale = v_scale): the e4m3-product kernel (the device's table, and the
    permuted P.V operand the sweep tries) against the torch reference on q rounded the
    kernel's way, and within q's rounding of the reference on q itself."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from deepserve.ops.triton.launch_config import trying
    seqs = torch.randint(1, 4097, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    pb = fp8_pool(make_paged_batch([1] * 64, seqs, heads, 1, 576, 512, block_size=64, dtype=torch.bfloat16,
                                   device="cuda", mla=True))
    with trying("mla_decode_fp8", [{"set": settings}] if settings else []):
        got = triton_attention()(*pb.args(0.07), k_scale=0.25, v_scale=0.25)
    ref = resolve("paged_attention", "torch")[1]
    assert rel_err(got, ref(*pb.args(0.07), k_scale=0.25, v_scale=0.25)) < Q_E4M3_REL_ERR
    want = ref(*dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q)).args(0.07), k_scale=0.25, v_scale=0.25)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_kv_write_saturates_like_the_torch_op():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from deepserve.ops.triton.kv_cache import write_kv_cache
    key = (torch.randn(64, 8, 128, device="cuda") * 200).to(torch.bfloat16)
    pools = [torch.zeros(8, 16, 8, 128, dtype=FP8, device="cuda") for _ in range(2)]
    slots = torch.randperm(128, device="cuda")[:64]
    write_kv_cache(key, None, pools[0], None, slots)
    resolve("write_kv_cache", "torch")[1](key, None, pools[1], None, slots)
    assert torch.equal(pools[0].view(torch.uint8), pools[1].view(torch.uint8))
