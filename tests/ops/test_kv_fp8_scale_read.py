"""The fp8 pool's per-tensor scales on read: the Triton attention over an e4m3 pool written with
k_scale / v_scale (not 1) equals the torch reference, which multiplies the keys by k_scale and
the values by v_scale (vLLM's rule: the pool holds x / scale)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.paged_batch import make_paged_batch
from tests.ops.test_kv_fp8_ops import Q_E4M3_REL_ERR, fp8_pool, q_rounded_to_e4m3, rel_err, triton_attention

K_SCALE, V_SCALE = 0.37, 2.5


@pytest.mark.parametrize("case", ["gqa_prefill", "gqa_decode", "mla_decode", "mla_prefill"])
def test_triton_attention_applies_the_pool_scales_like_the_torch_reference(triton_ops, cpu_only, case):
    mla = case.startswith("mla")
    kw = dict(num_heads=4, num_kv_heads=1, head_dim=48, v_head_dim=32, mla=True, block_size=16) if mla \
        else dict(num_heads=4, num_kv_heads=2, head_dim=32)
    q_lens = [1, 1, 1] if case.endswith("decode") else [5, 20, 1]
    exact = make_paged_batch(q_lens, [5, 37, 40], **kw)
    # the pool as written with the scales: x / scale (MLA: one latent, one scale)
    v_s = K_SCALE if mla else V_SCALE
    k = exact.k_cache / K_SCALE
    scaled = dataclasses.replace(exact, k_cache=k, v_cache=k[..., :exact.v_cache.shape[-1]] if mla
                                 else exact.v_cache / V_SCALE)
    pb = fp8_pool(scaled)
    run = lambda fn, b: fn(*b.args(0.125), k_scale=K_SCALE, v_scale=v_s)   # noqa: E731
    got = run(triton_attention(), pb)
    torch_ref = resolve("paged_attention", "torch")[1]
    rows = int(pb.query_start_loc[-1])
    if case == "mla_decode":        # e4m3 q (test_kv_fp8_ops' docstring)
        assert rel_err(got[:rows], run(torch_ref, pb)[:rows]) < Q_E4M3_REL_ERR
        pb = dataclasses.replace(pb, q=q_rounded_to_e4m3(pb.q))
    torch.testing.assert_close(got[:rows], run(torch_ref, pb)[:rows], atol=1e-5, rtol=1e-5)
    want = torch_ref(*exact.args(0.125))                 # the 16-bit pool, unscaled
    assert rel_err(got[:rows], want[:rows]) < 0.05       # e4m3 rounding only: a lost scale gives O(1)
