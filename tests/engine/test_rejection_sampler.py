"""Rejection sampler: greedy rows reproduce the target argmax; sampled rows emit tokens that
follow the target distribution exactly, for one-hot (n-gram) and random draft distributions
(chi-square over tens of thousands of fixed-seed trials; the same test rejects the draft's
own distribution, so it can fail)."""
from __future__ import annotations

import math

import torch

from deepserve.engine.rejection_sampler import rejection_sample

V = 6


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at normal quantile z (3.09: 0.999), Wilson-Hilferty."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def draws(gen: torch.Generator, n: int, k: int):
    uniform = torch.rand(n, k, generator=gen)
    noise = torch.empty(n, k + 1, V).exponential_(1, generator=gen)
    return uniform, noise


def rand_dist(gen, *shape, sharp: float = 1.5):
    return (torch.randn(*shape, V, generator=gen) * sharp).softmax(-1)


def emitted_pairs(gen, n, p0, p1, p2, q0=None, q1=None, fixed_drafts=None):
    """Run the sampler on n sequences with k = 2 drafts and return the first two tokens of
    each sequence's continuation: (emitted[0], emitted[1]) when two or more were emitted,
    else emitted[0] and a plain draw from the target p1[emitted[0]] (the next step's token)."""
    if fixed_drafts is None:
        d0 = torch.multinomial(q0, n, replacement=True, generator=gen)                 # [n]
        d1 = torch.multinomial(q1[d0], 1, generator=gen)[:, 0]
        draft_probs = torch.stack((q0.expand(n, V), q1[d0]), dim=1)
    else:
        d0 = torch.full((n,), fixed_drafts[0])
        d1 = torch.full((n,), fixed_drafts[1])
        draft_probs = None
    # the target at position j is conditioned on the drafts before j
    target = torch.stack((p0.expand(n, V), p1[d0], p2[d0, d1]), dim=1)                # [n, 3, V]
    uniform, noise = draws(gen, n, 2)
    out = rejection_sample(target, torch.stack((d0, d1), 1), torch.full((n,), 2), torch.zeros(n, dtype=torch.bool),
                           uniform, noise, draft_probs)
    first = out.token_ids[:, 0]
    second = torch.where(out.num_emitted >= 2, out.token_ids[:, 1],
                         torch.multinomial(p1[first], 1, generator=gen)[:, 0])
    assert (out.token_ids[:, 0] >= 0).all()
    assert ((out.token_ids >= 0).sum(1) == out.num_emitted).all()
    return first, second


def pair_counts(first, second):
    return torch.bincount(first * V + second, minlength=V * V).float()


def test_sampled_rows_follow_the_target_with_random_drafts():
    gen = torch.Generator().manual_seed(0)
    p0, p1, p2 = rand_dist(gen), rand_dist(gen, V), rand_dist(gen, V, V)
    q0, q1 = rand_dist(gen), rand_dist(gen, V)
    first, second = emitted_pairs(gen, 60000, p0, p1, p2, q0, q1)
    joint = (p0[:, None] * p1).flatten()
    assert chi2(torch.bincount(first, minlength=V).float(), p0) < chi2_critical(V - 1)
    assert chi2(pair_counts(first, second), joint) < chi2_critical(V * V - 1)
    # the drafts' own distribution is far from it: the test has power
    assert chi2(torch.bincount(torch.multinomial(q0, 60000, replacement=True, generator=gen),
                               minlength=V).float(), p0) > 10 * chi2_critical(V - 1)


def test_sampled_rows_follow_the_target_with_one_hot_drafts():
    gen = torch.Generator().manual_seed(1)
    p0, p1, p2 = rand_dist(gen), rand_dist(gen, V), rand_dist(gen, V, V)
    for drafts in ((int(p0.argmax()), int(p1[p0.argmax()].argmax())), (int(p0.argmin()), 2)):
        first, second = emitted_pairs(gen, 60000, p0, p1, p2, fixed_drafts=drafts)
        assert chi2(torch.bincount(first, minlength=V).float(), p0) < chi2_critical(V - 1)
        assert chi2(pair_counts(first, second), (p0[:, None] * p1).flatten()) < chi2_critical(V * V - 1)
        # a one-hot draft is accepted with probability p(d)
        accepted = (first == drafts[0]).float().mean()
        assert abs(accepted - p0[drafts[0]]) < 4 * math.sqrt(p0[drafts[0]] * (1 - p0[drafts[0]]) / 60000) + 1e-3


def test_sampled_acceptance_rate_is_sum_of_min_p_q():
    # Leviathan et al.: a draft from q is accepted with probability sum_x min(p(x), q(x))
    gen = torch.Generator().manual_seed(2)
    p, q = rand_dist(gen), rand_dist(gen)
    n = 50000
    d = torch.multinomial(q, n, replacement=True, generator=gen)
    uniform, noise = draws(gen, n, 1)
    out = rejection_sample(torch.stack((p, p), 0).expand(n, 2, V), d[:, None], torch.ones(n, dtype=torch.long),
                           torch.zeros(n, dtype=torch.bool), uniform, noise, q.expand(n, 1, V))
    rate = (out.num_emitted == 2).float().mean().item()
    expected = torch.minimum(p, q).sum().item()
    assert abs(rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_greedy_rows_give_the_target_argmax_sequence():
    gen = torch.Generator().manual_seed(3)
    B, K = 64, 4
    target = rand_dist(gen, B, K + 1)
    best = target.argmax(-1)                                  # [B, K+1]
    # drafts: the argmax up to a random first wrong position (or all right), then anything
    first_wrong = torch.randint(0, K + 1, (B,), generator=gen)
    drafts = torch.where(torch.arange(K)[None] < first_wrong[:, None], best[:, :K], (best[:, :K] + 1) % V)
    num_draft = torch.randint(0, K + 1, (B,), generator=gen)
    uniform, noise = draws(gen, B, K)
    out = rejection_sample(target, drafts, num_draft, torch.ones(B, dtype=torch.bool), uniform, noise)
    for b, row in enumerate(out.to_lists()):
        kept = min(int(first_wrong[b]), int(num_draft[b]))
        assert len(row) == kept + 1
        assert row == best[b, :kept + 1].tolist()


def test_mixed_batch_and_draft_lengths():
    """Rows with fewer drafts than K score only num_draft + 1 positions; a greedy row beside
    sampled ones keeps its exact argmax; a row without drafts emits one target token."""
    gen = torch.Generator().manual_seed(4)
    n = 40000
    p = rand_dist(gen, 3)                                  # per position
    target = p.expand(n, 3, V).clone()
    d = int(p[0].argmax())
    drafts = torch.full((n, 2), d)
    num_draft = torch.zeros(n, dtype=torch.long)           # no drafts: plain sampling from p[0]
    greedy = torch.zeros(n, dtype=torch.bool)
    greedy[::2] = True
    uniform, noise = draws(gen, n, 2)
    out = rejection_sample(target, drafts, num_draft, greedy, uniform, noise)
    assert (out.num_emitted == 1).all() and (out.token_ids[:, 1:] == -1).all()
    assert (out.token_ids[::2, 0] == d).all()
    assert chi2(torch.bincount(out.token_ids[1::2, 0], minlength=V).float(), p[0]) < chi2_critical(V - 1)


def test_identical_draft_and_target_accepts_everything():
    gen = torch.Generator().manual_seed(5)
    n, K = 2000, 3
    p = rand_dist(gen, n, K + 1)
    d = torch.multinomial(p[:, :K].reshape(-1, V), 1, generator=gen).view(n, K)
    uniform, noise = draws(gen, n, K)
    out = rejection_sample(p, d, torch.full((n,), K), torch.zeros(n, dtype=torch.bool), uniform, noise, p[:, :K])
    assert (out.num_emitted == K + 1).all()
    assert torch.equal(out.token_ids[:, :K], d)
