"""FP8 KV pools (float8 e4m3, scale 1.0; `--kv-cache-dtype fp8`) in the attention and KV-write
ops: the Triton attention (prefill tiles and split-KV decode, GQA and MLA's latent pool) over an
e4m3 pool equals the torch reference over the same pool; the writes round and saturate at +-448.
CPU cases run interpreted."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.paged_batch import make_paged_batch

FP8 = torch.float8_e4m3fn


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
    want = resolve("paged_attention", "torch")[1](*pb.args(0.125))
    got = resolve("paged_attention", "triton")[1](*pb.args(0.125))
    rows = int(pb.query_start_loc[-1])
    torch.testing.assert_close(got[:rows], want[:rows], atol=1e-5, rtol=1e-5)
    # and the fp8 pool holds what a 16-bit pool would, to e4m3 rounding
    exact = resolve("paged_attention", "torch")[1](*make_paged_batch(q_lens, seqs, **kw).args(0.125))
    err = (got[:rows] - exact[:rows]).norm() / exact[:rows].norm()
    assert err < 0.05, err          # e4m3 keeps 3 mantissa bits: ~2-3% relative per value


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
    want = resolve("paged_attention", "torch")[1](*pb.args(0.07))
    got = resolve("paged_attention", "triton")[1](*pb.args(0.07))
    rows = int(pb.query_start_loc[-1])
    torch.testing.assert_close(got[:rows].float(), want[:rows].float(), atol=2e-2, rtol=2e-2)


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
