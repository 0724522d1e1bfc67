"""benchmarks/bench_spec.py's projection of MTP speedup from measured step costs (issue 18),
on hand-computed numbers: tokens per step 1 + a + ... + a^k, speedup = E x plain / (verify +
k x draft), R1's 56 extra MoE layers added at the plain and the verify row counts."""
import importlib.util

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_spec", REPO / "benchmarks" / "bench_spec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokens_per_step(bench):
    assert bench.tokens_per_step(0.85, 1) == pytest.approx(1.85)
    assert bench.tokens_per_step(0.5, 3) == pytest.approx(1.875)
    assert bench.tokens_per_step(0.0, 3) == 1.0


def test_projection_from_measured_costs(bench):
    steps = {1: {0: {"step_ms": 10.0}, 1: {"step_ms": 11.0}, 2: {"step_ms": 12.0}, 3: {"step_ms": 13.0}}}
    mtp = {1: {"mtp_forward_ms": 1.0, "layer_ms": {0: 0.1, 1: 0.12, 2: 0.14, 3: 0.16}}}
    cut = bench.projection(steps, mtp, full_model=False)[1]
    assert cut[1]["speedup"]["0.85"] == pytest.approx(1.85 * 10 / 12)
    assert cut[3]["speedup"]["0.9"] == pytest.approx((1 + 0.9 + 0.81 + 0.729) * 10 / 16)
    assert cut[1]["verify_overhead"] == pytest.approx(0.1)
    full = bench.projection(steps, mtp, full_model=True)[1]
    assert full[1]["plain_ms"] == pytest.approx(10 + 56 * 0.1)
    assert full[1]["speedup"]["0.7"] == pytest.approx(1.7 * 15.6 / (11 + 56 * 0.12 + 1))
