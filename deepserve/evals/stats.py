"""Confidence intervals over items, and paired tests for "do two runs really differ?".

The unit of sampling is the item (a question), so intervals and tests treat per-item scores
(mean over the k samples of that item) as the observations:

- one run: Wilson score interval when every item score is 0 or 1 (k = 1; it behaves at
  0 % and 100 % where the normal interval collapses), else mean +/- t * s / sqrt(n).
- two runs on the same items: exact McNemar (a two-sided binomial test on the items where
  only one run is right) when scores are 0/1; otherwise a paired sign-flip permutation test
  on the per-item differences (exact up to 2^16 sign patterns, else 20,000 seeded draws).
  See Dietterich 1998, "Approximate Statistical Tests for Comparing Supervised
  Classification Learning Algorithms", for McNemar on shared test items.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

Z95 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """Student-t 97.5 % quantile (Cornish-Fisher expansion; < 0.5 % error for df >= 3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df == 1:
        return 12.706204736
    if df == 2:
        return 4.302652730
    z = Z95
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def _is_binary(values) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def mean_ci(scores: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of per-item scores in [0, 1], a 95 % interval over items."""
    n = len(scores)
    if n == 0:
        raise ValueError("cannot summarise an empty list of item scores")
    mean = sum(scores) / n
    if _is_binary(scores):
        z2 = Z95 ** 2
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        low = 0.0 if mean == 0.0 else max(0.0, centre - half)   # exact ends, no rounding dust
        high = 1.0 if mean == 1.0 else min(1.0, centre + half)
        return mean, low, high
    if n == 1:
        return mean, 0.0, 1.0
    sd = float(np.std(scores, ddof=1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _log_binom_pmf(k: int, n: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b, c)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.exp(_log_binom_pmf(i, n)) for i in range(k + 1))
    return min(1.0, 2 * tail)


def sign_flip_p(diffs: np.ndarray, draws: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value of mean(diffs) == 0 by flipping the sign of each paired difference."""
    diffs = np.asarray(diffs, dtype=np.float64)
    n = len(diffs)
    observed = abs(diffs.mean())
    if n == 0 or not np.any(diffs):
        return 1.0
    tol = 1e-12
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        means = np.abs(signs @ diffs / n)
        return float(np.mean(means >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, draws, 2000):
        m = min(2000, draws - start)
        signs = rng.choice((1.0, -1.0), size=(m, n))
        hits += int(np.sum(np.abs(signs @ diffs / n) >= observed - tol))
    return (hits + 1) / (draws + 1)


def paired_test(a: list[float], b: list[float]) -> dict:
    """Compare per-item scores of two runs on the same items (same order).

    Returns n, delta = mean(b) - mean(a), its 95 % interval, p (two-sided) and the test used.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return {"n": 0, "delta": 0.0, "ci95": [0.0, 0.0], "p": 1.0, "test": "none"}
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    delta = float(diffs.mean())
    half = t_quantile_975(n - 1) * float(diffs.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
    if _is_binary(a) and _is_binary(b):
        only_a = int(np.sum(diffs < 0))
        only_b = int(np.sum(diffs > 0))
        p, test = mcnemar_exact(only_a, only_b), "mcnemar_exact"
    else:
        p, test = sign_flip_p(diffs), "paired_sign_flip"
    return {"n": n, "delta": delta, "ci95": [delta - half, delta + half], "p": p, "test": test}
