"""benchmarks/bench_spec.py's projection of MTP speedup from measured step costs (issue 18),
on hand-computed numbers: tokens per step 1 + a + ... + a^k, speedup = E x plain / (verify +
k x draft), R1's 56 extra MoE layers added at the plain and the verify row counts."""

import pytest

from tests.bench.conftest import benchmark_module


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("bench_spec")


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


@pytest.mark.slow
def test_tiny_run_writes_every_figure(bench, tmp_path):
    """The whole script at toy sizes on the CPU (in one process): step costs for plain and
    k = 1..3, the MTP draft and layer costs, both projections, n-gram runs with greedy tokens
    equal to plain decoding."""
    out = tmp_path / "spec.json"
    assert bench.main(["--tiny", "--device", "cpu", "--batches", "1", "2", "--ngram-batches", "1",
                       "--max-tokens", "8", "--context", "16", "--iters", "1", "--max-model-len", "128",
                       "--prompt-tokens", "32", "--in-process", "--out", str(out)]) == 0
    import json
    result = json.loads(out.read_text())
    for name in ("r1", "llama8b"):
        steps = result[name]["steps"]
        assert set(steps) == {"1", "2"} and all(set(v) == {"0", "1", "2", "3"} for v in steps.values())
        assert all(c["step_ms"] > 0 for v in steps.values() for c in v.values())
        assert steps["2"]["3"]["rows"] == 8 and steps["2"]["0"]["rows"] == 2
    r1 = result["r1"]
    assert set(r1["projection_r1_61_layers"]["1"]["1"]["speedup"]) == {"0.7", "0.8", "0.85", "0.9"}
    for run in result["demo"]["stories"] + result["llama8b"]["sharegpt_self_repeating"]:
        assert run["greedy_equal"] and run["plain_tok_s"] > 0 and run["spec_tok_s"] > 0
