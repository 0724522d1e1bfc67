"""/metrics reports the operator calls the engine counted and the share that ran as Triton kernels
(deepserve:triton_op_call_share, vllm: alias too), from the engine's own op table: its start-up
step, and every call with DEEPSERVE_OPS_COUNT=1."""
from __future__ import annotations

import pytest

from deepserve import LLM, SamplingParams
from deepserve.ops import OpTable, bind
from deepserve.server.metrics import ServerMetrics, parse_metrics
from tests.conftest import DEMO_MODEL

LAB = 'model_name="demo",engine="0"'
GREEDY = SamplingParams(temperature=0, max_tokens=4)


def test_metrics_share_of_triton_op_calls(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("DEEPSERVE_OPS_COUNT", raising=False)
    llm = LLM(str(DEMO_MODEL), ops="torch", max_model_len=64)
    runner = llm.engine.runner
    counted = sum(runner.ops.counts.values())                     # the start-up step
    assert counted > 0
    llm.generate(["Once upon a time"], GREEDY)
    assert sum(runner.ops.counts.values()) == counted             # served steps count nothing
    metrics = ServerMetrics("demo", llm.engine.gauges)
    values = parse_metrics(metrics.render())
    assert values[f"deepserve:op_calls_total{{{LAB}}}"] == counted
    assert values[f"deepserve:triton_op_calls_total{{{LAB}}}"] == 0
    assert values[f"deepserve:triton_op_call_share{{{LAB}}}"] == 0.0

    # the same model on a counting triton table (kernels interpreted on CPU hosts): /metrics
    # reads whatever table the engine's runner holds
    table = runner.ops = OpTable("triton", count=True)
    bind(runner.model, table)
    llm.generate(["Once upon a time"], GREEDY)
    values = parse_metrics(metrics.render())
    totals = table.call_totals()
    assert totals["op_calls"] > counted and totals["triton_op_calls"] > totals["op_calls"] / 2
    assert values[f"deepserve:op_calls_total{{{LAB}}}"] == totals["op_calls"]
    assert values[f"deepserve:triton_op_calls_total{{{LAB}}}"] == totals["triton_op_calls"]
    share = values[f"deepserve:triton_op_call_share{{{LAB}}}"]
    assert share == pytest.approx(table.triton_share())
    assert values[f"vllm:triton_op_call_share{{{LAB}}}"] == share


def test_share_summed_over_dp_ranks_stays_a_share():
    """The DP front end sums each core's gauges; the share is computed after the sum."""
    snap = {"op_calls": 100 + 300, "triton_op_calls": 90 + 150}
    values = parse_metrics(ServerMetrics("demo", lambda: snap).render())
    assert values[f"deepserve:triton_op_call_share{{{LAB}}}"] == pytest.approx(240 / 400)
    assert parse_metrics(ServerMetrics("demo", dict).render())[f"deepserve:triton_op_call_share{{{LAB}}}"] == 0.0
