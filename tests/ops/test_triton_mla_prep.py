"""MLA decode preparation (kv write, q absorb) kernels against the torch references, and the
references against the unfused layer steps they replace (rms_norm, rotary, einsum, cat, write)."""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve
from deepserve.layers.rotary import RotaryEmbedding

YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def setup(n_tok, heads, nope, c, rot, is_neox, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    cache = RotaryEmbedding(rot, 8192, 10000.0, YARN, is_neox).to(device).cos_sin_cache
    positions = torch.randint(0, 8192, (n_tok,), generator=g, device=device)
    kv_a = rn(n_tok, c + rot).to(dtype)
    q = rn(n_tok, heads, nope + rot).to(dtype)
    w_uk = (rn(heads, nope + 16, c) * 0.1).to(dtype)[:, :nope]     # a strided view, as in the layer
    norm_w = (1 + 0.1 * rn(c)).to(dtype)
    return positions, kv_a, q, w_uk, norm_w, cache


def unfused_latent(kv_a, positions, cache, is_neox, norm_w, eps):
    """What MLAAttention computed before the fused ops: rms_norm, rotary, cat."""
    rms, rotary = resolve("rms_norm", "torch")[1], resolve("rotary_embedding", "torch")[1]
    c = norm_w.shape[0]
    kv_c, k_pe = kv_a.split([c, kv_a.shape[-1] - c], dim=-1)
    _, k_rot = rotary(positions, k_pe.unsqueeze(1), k_pe.unsqueeze(1), cache, is_neox)
    return torch.cat((rms(kv_c, norm_w, eps), k_rot[:, 0]), dim=-1)


@pytest.mark.parametrize("is_neox", [False, True])
def test_references_equal_the_unfused_steps(is_neox):
    positions, kv_a, q, w_uk, norm_w, cache = setup(5, 3, 16, 32, 8, is_neox, torch.bfloat16)
    pool = torch.zeros(4, 4, 1, 40, dtype=torch.bfloat16)
    slots = torch.tensor([3, 0, -1, 9, 15])
    resolve("mla_kv_write", "torch")[1](kv_a, positions, cache, is_neox, norm_w, 1e-6, pool, slots)
    latent = unfused_latent(kv_a, positions, cache, is_neox, norm_w, 1e-6)
    flat = pool.view(-1, 40)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], latent[t])
    assert int((flat.abs().sum(-1) > 0).sum()) == 4          # the padding row wrote nothing
    q_abs = resolve("mla_q_absorb", "torch")[1](q, positions, cache, is_neox, w_uk)
    _, q_rot = resolve("rotary_embedding", "torch")[1](positions, q[..., 16:], q[..., 16:], cache, is_neox)
    assert torch.equal(q_abs[..., :32], torch.einsum("thd,hdc->thc", q[..., :16], w_uk))
    assert torch.equal(q_abs[..., 32:], q_rot)


def compare(n_tok, heads, nope, c, rot, is_neox, dtype, device, block_size=4, atol=2e-2):
    positions, kv_a, q, w_uk, norm_w, cache = setup(n_tok, heads, nope, c, rot, is_neox, dtype, device)
    pools = [torch.zeros(n_tok + 2, block_size, 1, c + rot, dtype=dtype, device=device) for _ in range(2)]
    slots = torch.randperm(pools[0].shape[0] * block_size, device=device)[:n_tok]
    slots[0] = -1
    for backend, pool in zip(("torch", "triton"), pools):
        resolve("mla_kv_write", backend)[1](kv_a, positions, cache, is_neox, norm_w, 1e-6, pool, slots)
    # rms statistics and rope are fp32 in both; the bf16 roundings can differ by one ulp
    torch.testing.assert_close(pools[1].float(), pools[0].float(), atol=atol, rtol=2 ** -7)
    want = resolve("mla_q_absorb", "torch")[1](q, positions, cache, is_neox, w_uk)
    got = resolve("mla_q_absorb", "triton")[1](q, positions, cache, is_neox, w_uk)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=2 ** -7)
    # both in one launch: the same cache rows and q_abs as the two kernels, bit for bit
    pool = torch.zeros_like(pools[1])
    both = resolve("mla_decode_prep", "triton")[1](q, kv_a, positions, cache, is_neox, w_uk, norm_w, 1e-6, pool,
                                                   slots)
    assert torch.equal(both, got) and torch.equal(pool, pools[1])


@pytest.mark.parametrize("is_neox", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_matches_reference(triton_ops, cpu_only, is_neox, dtype):
    # C = 40: not a multiple of the 128-wide C block; 3 tokens: a partly masked token block
    compare(3, 2, 16, 40, 8, is_neox, dtype, "cpu", atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_triton_matches_reference_over_several_blocks(triton_ops, cpu_only):
    # 70 tokens: two 64-token blocks; C = 200: two 128-wide latent blocks (the fused prep
    # kernel's flat program index splits into all three of token block, head, latent block)
    compare(70, 3, 16, 200, 8, False, torch.float32, "cpu", block_size=8, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok,heads", [(1, 16), (64, 16), (4, 128), (200, 128)])
def test_triton_matches_reference_gpu(triton_ops, n_tok, heads):
    compare(n_tok, heads, 128, 512, 64, False, torch.bfloat16, "cuda", block_size=64, atol=3e-2)


def compare_v_up(n_tok, heads, c, v, dtype, device, atol):
    g = torch.Generator(device=device).manual_seed(n_tok + heads)
    out_lat = torch.randn(n_tok, heads, c, generator=g, device=device).to(dtype)
    w_uv = (torch.randn(heads, v + 8, c, generator=g, device=device) * 0.1).to(dtype)[:, 8:]   # strided view
    want = resolve("mla_v_up", "torch")[1](out_lat, w_uv)
    got = resolve("mla_v_up", "triton")[1](out_lat, w_uv)
    assert got.shape == want.shape == (n_tok, heads, v) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_v_up_matches_reference(triton_ops, cpu_only, dtype):
    # C 200: two C steps, the second masked; V 24: one masked V block; 3 tokens: masked rows
    compare_v_up(3, 2, 200, 24, dtype, "cpu", 2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok,heads", [(1, 16), (64, 16), (4, 128), (200, 128)])
def test_v_up_gpu(triton_ops, n_tok, heads):
    compare_v_up(n_tok, heads, 512, 128, torch.bfloat16, "cuda", 3e-2)


def test_shapes_that_do_not_fit_are_refused(triton_ops, cpu_only):
    positions, kv_a, q, w_uk, norm_w, cache = setup(2, 2, 16, 32, 8, False, torch.float32)
    kv_write = resolve("mla_kv_write", "triton")[1]
    with pytest.raises(ValueError, match="cache rows of 48"):
        kv_write(kv_a, positions, cache, False, norm_w, 1e-6, torch.zeros(2, 4, 1, 48), torch.zeros(2).long())
    with pytest.raises(ValueError, match="rope dims disagree"):
        kv_write(kv_a, positions, cache[:, :4], False, norm_w, 1e-6, torch.zeros(2, 4, 1, 40), torch.zeros(2).long())
    with pytest.raises(ValueError, match="does not fit q"):
        resolve("mla_q_absorb", "triton")[1](q, positions, cache, False, w_uk[:1])
    with pytest.raises(ValueError, match="does not fit out_lat"):
        resolve("mla_v_up", "triton")[1](torch.zeros(2, 2, 32), torch.zeros(2, 16, 24))
    with pytest.raises(ValueError, match=r"kv_a \(2, 40\) \(latent 32\) does not fit q \(1, 2, 24\)"):
        resolve("mla_decode_prep", "triton")[1](q[:1], kv_a, positions[:1], cache, False, w_uk, norm_w, 1e-6,
                                                torch.zeros(2, 4, 1, 40), torch.zeros(1).long())
