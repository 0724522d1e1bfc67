"""Parallel layouts behind an engine core process, as `deepserve serve` runs them: what the
front end hears after a client goes away while the request's pipeline micro-batch is in flight."""
import time

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL


def test_pp2_abort_in_flight_reports_every_block_free(monkeypatch):
    """The abort frees the blocks at once, but the core still steps to drain the micro-batch;
    that step outputs nothing, so the core must send its gauges itself once it is idle."""
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), block_size=4, max_model_len=256, pipeline_parallel_size=2) as llm:
        engine = llm.engine
        engine.add_request("long", {"prompt": "Once upon a time"},
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        deadline = time.monotonic() + 60
        while not any(o.outputs[0].token_ids for o in engine.step()):   # decoding: blocks held
            assert time.monotonic() < deadline
        assert engine.gauges()["num_free_blocks"] < engine.gauges()["num_blocks"]
        engine.abort_request("long")
        deadline = time.monotonic() + 10
        while engine.gauges()["num_free_blocks"] < engine.gauges()["num_blocks"] and time.monotonic() < deadline:
            engine.step()
        gauges = engine.gauges()
        assert gauges["num_free_blocks"] == gauges["num_blocks"]
        assert gauges["num_requests_running"] == 0
