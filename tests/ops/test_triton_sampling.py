"""The Triton sampling kernel against the torch reference (deepserve.ops.sampling.sample).

Both get the same logits and the same Exp(1) noise, so they must return the same token ids:
every combination of greedy / a temperature, top-k (off, 1, small, V-1, > V), top-p (off, 0,
mid, high) and min-p, on peaked, flat and partly masked (-inf) rows. CPU tests run the
kernel interpreted with a small block so the per-row loop covers several blocks and a
partial one; the `gpu` test runs it compiled at DeepSeek's vocab (129280) and batch 1..256.
Random fp32 logits have no ties, where the kernel may keep a different tied token.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from deepserve.ops.registry import op_backends, resolve

R1_VOCAB = 129280


def reference(*args):
    return resolve("sample", "torch")[1](*args)


def triton_sample(*args):
    return resolve("sample", "triton")[1](*args)


@pytest.fixture
def small_blocks(triton_ops, monkeypatch):
    monkeypatch.setattr(triton_ops.sampling, "MAX_BLOCK", 64)


def random_rows(batch: int, vocab: int, seed: int, device: str = "cpu"):
    """Logits with per-row scale (peaked to flat), some rows with masked (-inf) tokens."""
    g = torch.Generator(device=device).manual_seed(seed)
    scale = torch.tensor([0.1, 1.0, 3.0, 10.0], device=device)[
        torch.randint(0, 4, (batch,), generator=g, device=device)]
    logits = torch.randn(batch, vocab, generator=g, device=device) * scale[:, None]
    masked = torch.rand(batch, vocab, generator=g, device=device) < 0.1
    masked &= (torch.arange(batch, device=device) % 3 == 0)[:, None]
    masked[:, 0] = False                                        # every row keeps a finite logit
    logits = logits.masked_fill(masked, float("-inf"))
    noise = torch.empty(batch, vocab, device=device).exponential_(1, generator=g)
    return logits, noise, g


def assert_same_ids(logits, temperature, top_k, top_p, min_p, noise):
    want = reference(logits, temperature, top_k, top_p, min_p, noise)
    got = triton_sample(logits, temperature, top_k, top_p, min_p, noise)
    assert got.dtype == torch.int64 and got.shape == want.shape
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, [dict(row=r, want=want[r].item(), got=got[r].item(), temperature=temperature[r].item(),
                          top_k=top_k[r].item(), top_p=top_p[r].item(), min_p=min_p[r].item())
                     for r in bad[:5]]
    return got


def test_sample_is_registered(triton_ops):
    assert op_backends()["sample"] == ["torch", "triton"]


def test_every_filter_combination(small_blocks, cpu_only):
    vocab = 100                                                 # a full block of 64 + a partial one
    # one temperature besides greedy: the kernel divides by any temperature the same way, and
    # test_many_random_rows draws temperatures over (0, 2)
    combos = list(itertools.product([0.0, 1.5], [0, 1, 7, vocab - 1, 500], [1.0, 0.95, 0.5, 0.0],
                                    [0.0, 0.3]))
    temperature, top_k, top_p, min_p = (torch.tensor(c) for c in zip(*combos))
    logits, noise, _ = random_rows(len(combos), vocab, seed=1)
    got = assert_same_ids(logits, temperature.float(), top_k.long(), top_p.float(), min_p.float(), noise)
    # the test must be able to fail: filters and temperature change the draws
    assert len(set(got.tolist())) > 10


def test_many_random_rows(small_blocks, cpu_only):
    batch, vocab = 32, 100
    logits, noise, g = random_rows(batch, vocab, seed=2)
    temperature = torch.rand(batch, generator=g) * 2
    temperature[::7] = 0.0
    top_k = torch.randint(0, vocab + 20, (batch,), generator=g)
    top_k[::4] = 0
    top_p = torch.rand(batch, generator=g)
    top_p[::5] = 1.0
    min_p = torch.rand(batch, generator=g) * 0.3
    min_p[::3] = 0.0
    assert_same_ids(logits, temperature, top_k, top_p, min_p, noise)


def test_filters_restrict_the_draw(triton_ops, cpu_only):
    """With top_k = 1, or top_p = 0, or min_p = 1, only the top token can be drawn, whatever
    the noise; with no filter a flat row's draw follows the noise (its smallest draw wins)."""
    logits = torch.tensor([[0.0, 0.1, 0.2, 5.0, 0.3, 0.1, 0.0, 0.2]] * 4)
    noise = torch.tensor([[1.0, 1.0, 1.0, 50.0, 1.0, 1e-4, 1.0, 1.0]] * 4)
    ones, zeros = torch.ones(4), torch.zeros(4)
    top_k = torch.tensor([1, 0, 0, 0])
    top_p = torch.tensor([1.0, 0.0, 1.0, 1.0])
    min_p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = assert_same_ids(logits, ones, top_k, top_p, min_p, noise)
    assert got.tolist() == [3, 3, 3, 5]
    greedy = assert_same_ids(logits, zeros, top_k, top_p, min_p, noise)
    assert greedy.tolist() == [3, 3, 3, 3]


def test_greedy_takes_the_first_maximum(triton_ops, cpu_only):
    logits = torch.tensor([[1.0, 4.0, 2.0, 4.0], [-3.0, -3.0, -3.0, -3.0]])
    noise = torch.ones(2, 4)
    got = assert_same_ids(logits, torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(2),
                          torch.zeros(2), noise)
    assert got.tolist() == [1, 0]


def test_extreme_logit_ranges(small_blocks, cpu_only):
    """The threshold search spans the whole int32 key range in at most 8 passes."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 100, generator=g) * torch.tensor([1e-6, 1e-3, 1.0, 1e3, 1e30, 1e37])[:, None]
    noise = torch.empty(6, 100).exponential_(1, generator=g)
    for top_k, top_p in [(10, 1.0), (0, 0.6), (40, 0.9)]:
        assert_same_ids(logits, torch.ones(6), torch.full((6,), top_k), torch.full((6,), top_p),
                        torch.zeros(6), noise)


def test_rejects_bad_shapes(triton_ops):
    logits, noise = torch.zeros(2, 8), torch.ones(2, 8)
    params = [torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2)]
    with pytest.raises(ValueError, match=r"noise shape \(2, 7\)"):
        triton_sample(logits, *params, torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"top_k must have shape \(2,\), got \(3,\)"):
        triton_sample(logits, params[0], torch.zeros(3, dtype=torch.long), *params[2:], noise)
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\], got shape \(8,\)"):
        triton_sample(logits[0], *params, noise[0])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_matches_reference_at_r1_vocab(triton_ops, batch):
    logits, noise, g = random_rows(batch, R1_VOCAB, seed=batch, device="cuda")
    temperature = torch.rand(batch, generator=g, device="cuda") * 1.5
    temperature[::5] = 0.0
    top_k = torch.randint(0, 2000, (batch,), generator=g, device="cuda")
    top_k[::2] = 0
    top_p = torch.rand(batch, generator=g, device="cuda") * 0.5 + 0.5
    top_p[::3] = 1.0
    min_p = torch.rand(batch, generator=g, device="cuda") * 0.1
    min_p[::2] = 0.0
    assert_same_ids(logits, temperature, top_k, top_p, min_p, noise)
