"""/metrics reports the operator calls the engine made and the share that ran as Triton kernels
(deepserve:triton_op_call_share, vllm: alias too), from the engine's own call counts."""
from __future__ import annotations

import pytest
import torch

from deepserve import LLM, SamplingParams, ops
from deepserve.server.metrics import ServerMetrics, parse_metrics
from tests.conftest import DEMO_MODEL

LAB = 'model_name="demo"'


@pytest.fixture
def clean_counts():
    ops.call_counts.clear()
    yield
    ops.set_backend("torch")
    ops.call_counts.clear()


def test_metrics_share_of_triton_op_calls(clean_counts):
    pytest.importorskip("triton")
    llm = LLM(str(DEMO_MODEL), ops="torch", max_model_len=64)
    llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=4))
    metrics = ServerMetrics("demo", llm.engine.gauges)
    values = parse_metrics(metrics.render())
    torch_calls = sum(ops.call_counts.values())
    assert torch_calls > 0
    assert values[f"deepserve:op_calls_total{{{LAB}}}"] == torch_calls
    assert values[f"deepserve:triton_op_calls_total{{{LAB}}}"] == 0
    assert values[f"deepserve:triton_op_call_share{{{LAB}}}"] == 0.0

    # three real Triton kernel calls (interpreted on CPU hosts) through the dispatcher
    ops.set_backend("triton")
    x, w = torch.randn(2, 32), torch.ones(32)
    for _ in range(3):
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    values = parse_metrics(metrics.render())
    assert ops.call_counts[("rms_norm", "triton")] == 3
    assert values[f"deepserve:op_calls_total{{{LAB}}}"] == torch_calls + 3
    assert values[f"deepserve:triton_op_calls_total{{{LAB}}}"] == 3
    share = values[f"deepserve:triton_op_call_share{{{LAB}}}"]
    assert share == pytest.approx(3 / (torch_calls + 3)) == pytest.approx(ops.triton_share())
    assert values[f"vllm:triton_op_call_share{{{LAB}}}"] == share


def test_share_summed_over_dp_ranks_stays_a_share():
    """The DP front end sums each core's gauges; the share is computed after the sum."""
    snap = {"op_calls": 100 + 300, "triton_op_calls": 90 + 150}
    values = parse_metrics(ServerMetrics("demo", lambda: snap).render())
    assert values[f"deepserve:triton_op_call_share{{{LAB}}}"] == pytest.approx(240 / 400)
    assert parse_metrics(ServerMetrics("demo", dict).render())[f"deepserve:triton_op_call_share{{{LAB}}}"] == 0.0
