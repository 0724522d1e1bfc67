"""Intervals and paired tests against values worked out by hand or from tables."""
from __future__ import annotations

import numpy as np
import pytest

from deepserve.evals.stats import (mcnemar_exact, mean_ci, paired_test, sign_flip_p,
                                   t_quantile_975)


def test_wilson_interval_matches_textbook_values():
    mean, low, high = mean_ci([1.0] * 8 + [0.0] * 2)
    assert mean == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert mean_ci([1.0] * 5) == (1.0, pytest.approx(0.5655, abs=1e-4), 1.0)
    assert mean_ci([0.0] * 5)[:2] == (0.0, 0.0)


def test_t_interval_for_fractional_item_scores():
    scores = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    mean, low, high = mean_ci(scores)
    sd = np.std(scores, ddof=1)
    assert mean == pytest.approx(0.5)
    assert high - mean == pytest.approx(2.228 * sd / np.sqrt(11), rel=2e-3)
    assert low == pytest.approx(1 - high)
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])


def test_t_quantiles():
    assert t_quantile_975(10) == pytest.approx(2.2281, abs=2e-3)
    assert t_quantile_975(30) == pytest.approx(2.0423, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)


def test_mcnemar_exact():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="-1"):
        mcnemar_exact(-1, 3)


def test_sign_flip_exact_and_sampled():
    assert sign_flip_p(np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(2 / 16)
    assert sign_flip_p(np.zeros(5)) == 1.0
    rng = np.random.default_rng(1)
    shifted = rng.normal(0.3, 0.2, size=100)
    assert sign_flip_p(shifted) < 0.001
    centred = rng.normal(0.0, 0.2, size=100)
    assert sign_flip_p(centred) > 0.05


def test_paired_test_picks_the_right_test():
    a = [1.0] * 50 + [0.0] * 50
    b = [1.0] * 50 + [1.0] * 20 + [0.0] * 30            # b also right on 20 of a's misses
    res = paired_test(a, b)
    assert res["test"] == "mcnemar_exact" and res["n"] == 100
    assert res["delta"] == pytest.approx(0.2)
    assert res["p"] == pytest.approx(mcnemar_exact(0, 20))
    res = paired_test([0.5, 0.25, 1.0], [0.5, 0.5, 1.0])
    assert res["test"] == "paired_sign_flip" and res["delta"] == pytest.approx(0.25 / 3)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1.0], [1.0, 0.0])
