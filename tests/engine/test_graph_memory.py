"""CUDA graph memory kept out of the KV pool (engine/graph_memory.py): which graphs a layout
captures, the estimate's arithmetic, the budget, the start-up line; on a GPU the line after
capture, with the graphs' measured memory beside the estimate."""
import logging
import re

import pytest

from deepserve.config import EngineArgs
from deepserve.engine.graph_memory import GraphPlan, estimate_graph_bytes, graph_plan, graphs_line, kv_budget
from deepserve.engine.piecewise_graphs import capture_sizes


def _config(**kw):
    return EngineArgs(max_num_seqs=64, **kw).create_engine_config()


DECODE_64 = [1, 2, 4, 8, 16, 32, 64]      # the default sizes up to max_num_seqs


@pytest.mark.parametrize("kw, device, backend, pp, exchange, want", [
    ({}, "cuda", "triton", 1, False, (DECODE_64, [], capture_sizes(512))),     # FULL_AND_PIECEWISE
    ({"cudagraph_mode": "FULL_DECODE_ONLY"}, "cuda", "triton", 1, False, (DECODE_64, [], [])),
    ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "cuda", "triton", 1, False, (DECODE_64, [], capture_sizes(512))),
    ({"cudagraph_mode": "PIECEWISE", "piecewise_max_tokens": 64}, "cuda", "triton", 1, False,
     ([], [], capture_sizes(64))),
    ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "cuda", "triton", 2, False, (DECODE_64, [], [])),   # per stage
    ({"cudagraph_mode": "FULL_AND_PIECEWISE"}, "cuda", "triton", 1, True, (DECODE_64, [], [])),    # DP x EP
    ({"all2all_backend": "alltoall"}, "cuda", "triton", 1, True, ([], [], [])),
    ({}, "cuda", "torch", 1, False, ([], [], [])),                  # host syncs: no capture
    ({"enforce_eager": True}, "cuda", "triton", 1, False, ([], [], [])),
    ({}, "cpu", "torch", 1, False, ([], [], [])),
])
def test_plan_follows_what_the_runner_captures(kw, device, backend, pp, exchange, want):
    plan = graph_plan(_config(**kw), device, backend, pp, exchange, splittable=True)
    assert (plan.decode_sizes, plan.mtp_sizes, plan.piecewise_sizes) == want


def test_plan_with_mtp_drafts_counts_their_rows_and_graphs():
    cfg = EngineArgs(model="deepseek-v2-lite", hf_overrides={"num_nextn_predict_layers": 1}, max_num_seqs=16,
                     speculative_config={"method": "mtp", "num_speculative_tokens": 1}).create_engine_config()
    plan = graph_plan(cfg, "cuda", "triton", 1, False, splittable=True)
    assert plan.decode_sizes == plan.mtp_sizes == [1, 2, 4, 8, 16, 32]      # rows: 16 x (1 + 1)
    assert plan.piecewise_sizes == capture_sizes(cfg.piecewise_max_tokens)  # the default mode's prefill graphs
    assert plan.num_sizes == 12 + len(plan.piecewise_sizes)


def test_estimate_and_budget_arithmetic():
    plan = GraphPlan([1, 2, 4, 8], [], [1, 2, 4, 8, 16])
    # 1,000 bytes a token over 8,192 profiled tokens; rows keep 100 bytes each
    got = estimate_graph_bytes(plan, 8_192_000, 8192, 100)
    assert got == 1000 * 8 + 1000 * 16 + 100 * (1 + 2 + 4 + 8)
    assert estimate_graph_bytes(GraphPlan(), 8_192_000, 8192, 100) == 0
    gib = 2**30
    # 80 GiB device at 0.9, 20 GiB peak, 1 GiB held by another process (free 58, reserved 21)
    assert kv_budget(80 * gib, 0.9, 20 * gib, 58 * gib, 21 * gib, 0) == int(72 * gib - 20 * gib - gib)
    assert kv_budget(80 * gib, 0.9, 20 * gib, 58 * gib, 21 * gib, gib // 2) == int(72 * gib - 21.5 * gib)


def test_graphs_line():
    plan = GraphPlan([1, 2], [], [1, 2, 4])
    line = graphs_line(plan, 3.25, 3 * 2**29, 2**30)
    assert line == ("CUDA graphs: 5 sizes (2 decode, 3 piecewise) captured in 3.2 s, 1.50 GiB; "
                    "1.00 GiB was estimated and kept from the KV pool")
    assert "sized by --num-gpu-blocks-override" in graphs_line(plan, 1.0, 0, None)


@pytest.mark.gpu
def test_gpu_graph_memory_logged_beside_the_estimate(caplog):
    """On a CUDA device: decode and piecewise graphs of an 8B-wide Llama (2 layers, dummy
    weights) take memory that the line reports, and the estimate kept from the pool is within
    a factor of 3 of it."""
    from deepserve import LLM, SamplingParams
    with caplog.at_level(logging.INFO, logger="deepserve"):
        llm = LLM("r1-distill-llama-8b", hf_overrides={"num_hidden_layers": 2}, max_model_len=4096,
                  gpu_memory_utilization=0.5, compilation_config={"cudagraph_mode": "FULL_AND_PIECEWISE"})
    try:
        m = re.search(r"CUDA graphs: (\d+) sizes \((\d+) decode, (\d+) piecewise\) captured in [\d.]+ s, "
                      r"([\d.]+) GiB; ([\d.]+) GiB was estimated", caplog.text)
        assert m, caplog.text
        taken, estimate = float(m.group(4)), float(m.group(5))
        print(f"graphs took {taken:.3f} GiB, estimated {estimate:.3f} GiB")
        assert taken > 0 and estimate / 3 <= taken <= estimate * 3
        assert llm.engine.runner.graph_estimate == pytest.approx(estimate * 2**30, rel=0.01, abs=2**20)
        out = llm.generate({"prompt_token_ids": list(range(10, 2010))}, SamplingParams(temperature=0, max_tokens=4))
        assert len(out[0].outputs[0].token_ids) == 4      # an eager step beyond the graphs still fits
    finally:
        llm.shutdown()
