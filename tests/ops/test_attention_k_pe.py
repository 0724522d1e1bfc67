"""paged_attention's `k_pe`: keys given as [k_cache row | k_pe row] with k_pe one for every head
(MLA's prefill over the expanded latent: k_nope per head, the rope part shared), against the
same op over the joined keys. The Triton prefill kernel reads k_pe where it lies; a decode
batch, or a split of the head dim other than k_cache's width, joins them first."""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.paged_batch import make_paged_batch

NOPE, ROPE, V = 32, 16, 32     # head dim 48: main block 32 + tail 16 in the Triton kernels


def case(q_lens, seq_lens, nope=NOPE, rope=ROPE, heads=4, seed=0):
    batch = make_paged_batch(q_lens, seq_lens, num_heads=heads, num_kv_heads=heads, head_dim=nope + rope,
                             v_head_dim=V, block_size=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    k_pe = torch.randn(*batch.k_cache.shape[:2], 1, rope, generator=g)
    k_nope = batch.k_cache[..., :nope]                                  # strided, as MLA's
    joined = torch.cat((k_nope, k_pe.expand(-1, -1, heads, -1)), dim=-1)
    return batch, k_nope, k_pe, joined


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("q_lens,seq_lens,nope", [([5, 3, 1], [5, 11, 6], NOPE),   # prefill kernel, k_pe apart
                                                  ([1, 1], [9, 20], NOPE),         # decode: joined first
                                                  ([4, 2], [4, 7], 24)])           # 24 + 16: split 32 + 8, joined
def test_k_pe_equals_the_joined_keys(request, backend, q_lens, seq_lens, nope):
    if backend == "triton":   # interpreted, on CPU-only hosts
        request.getfixturevalue("triton_ops"), request.getfixturevalue("cpu_only")
    attention = resolve("paged_attention", backend)[1]
    batch, k_nope, k_pe, joined = case(q_lens, seq_lens, nope=nope)
    rest = (batch.v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, 0.3,
            batch.max_query_len, batch.max_seq_len)
    want = resolve("paged_attention", "torch")[1](batch.q, joined, *rest)
    got = attention(batch.q, k_nope, *rest, k_pe=k_pe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # k_pe matters: the keys without it give other outputs
    zero_pe = attention(batch.q, k_nope, *rest, k_pe=torch.zeros_like(k_pe))
    assert not torch.allclose(zero_pe, want, rtol=1e-3, atol=1e-3)


def test_k_pe_that_does_not_fit_is_an_error(triton_ops):
    attention = resolve("paged_attention", "triton")[1]
    batch, k_nope, k_pe, _ = case([3], [3])
    rest = (batch.v_cache, batch.query_start_loc, batch.seq_lens, batch.block_tables, 0.3, 3, 3)
    with pytest.raises(ValueError, match=r"k_pe \(.*\) does not fit k_cache"):
        attention(batch.q, k_nope, *rest, k_pe=k_pe[:, :2])
    with pytest.raises(ValueError, match=r"head dim must match"):
        attention(batch.q, k_nope, *rest, k_pe=k_pe[..., :8])
