"""N-gram (prompt lookup) drafts on crafted sequences, and against a brute-force statement of
the rule (longest suffix in [min_n, max_n] found earlier, earliest occurrence, up to k after)."""
from __future__ import annotations

import random

from deepserve.engine.ngram_proposer import NgramProposer, propose_ngram


def brute_force(tokens, min_n, max_n, k, max_len=None):
    if max_len is not None:
        k = min(k, max_len - len(tokens))
    if k <= 0:
        return []
    for n in range(max_n, min_n - 1, -1):
        if n > len(tokens) - 1:
            continue
        suffix = tokens[-n:]
        for start in range(0, len(tokens) - n):         # occurrences ending before the last token
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_vllm_docstring_example():
    # [1,2,3,4,2,3]: [4,2,3] is not found earlier, [2,3] is, and three tokens follow it
    assert propose_ngram([1, 2, 3, 4, 2, 3], 2, 3, 4) == [4, 2, 3]


def test_longest_ngram_wins_over_a_shorter_earlier_one():
    # suffix [7, 8, 9]: [8, 9] occurs first at 0 (followed by 1), [7, 8, 9] later (followed by 5)
    seq = [8, 9, 1, 7, 8, 9, 5, 6, 0, 7, 8, 9]
    assert propose_ngram(seq, 1, 3, 2) == [5, 6]
    assert propose_ngram(seq, 1, 2, 2) == [1, 7]          # capped at bigrams: the earliest [8, 9]


def test_earliest_occurrence_and_k_cap():
    seq = [4, 5, 10, 11, 12, 4, 5, 20, 21, 4, 5]
    assert propose_ngram(seq, 2, 2, 3) == [10, 11, 12]
    assert propose_ngram(seq, 2, 2, 1) == [10]


def test_no_match_too_short_and_min_n():
    assert propose_ngram([1, 2, 3, 4], 1, 3, 3) == []     # 4 never occurred before
    assert propose_ngram([5], 1, 3, 3) == []
    assert propose_ngram([3, 9, 1, 3], 2, 3, 3) == []      # only a 1-gram matches, min_n is 2
    assert propose_ngram([3, 9, 1, 3], 1, 3, 3) == [9, 1, 3]


def test_overlapping_match_in_a_repetition():
    # a run of one token: the suffix [7, 7, 7] first occurs at 0, the drafts continue the run
    assert propose_ngram([7] * 6, 1, 3, 4) == [7, 7, 7]
    assert propose_ngram([1, 2, 1, 2, 1, 2], 2, 4, 3) == [1, 2]


def test_max_len_caps_the_drafts():
    seq = [1, 2, 3, 1, 2]
    assert propose_ngram(seq, 2, 2, 3) == [3, 1, 2]
    assert propose_ngram(seq, 2, 2, 3, max_len=7) == [3, 1]
    assert propose_ngram(seq, 2, 2, 3, max_len=5) == []


def test_random_sequences_match_the_rule():
    rng = random.Random(0)
    for _ in range(400):
        seq = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        lo = rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 3)
        k = rng.randrange(1, 5)
        assert NgramProposer(lo, hi, k).propose(seq) == brute_force(seq, lo, hi, k), (seq, lo, hi, k)
