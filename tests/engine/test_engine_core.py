"""The engine core in a process of its own (DEEPSERVE_ENGINE_CORE_PROCESS=1 for the offline LLM;
always so for `deepserve serve` and data parallel): the front end sends requests over ZeroMQ
and rebuilds each request's output from the core's deltas. Outputs equal the in-process
engine's (text, tokens, n > 1, stop strings, logprobs); behind the API server (one, or two
with --api-server-count 2), killing the core turns /health to 503 and the server exits naming it."""
import os

import httpx
import pytest

from deepserve import LLM, SamplingParams
from deepserve.engine.dp_engine import DataParallelEngine
from tests.conftest import DEMO_MODEL
from tests.server.conftest import launch
from tests.server.test_server_worker_death import LONG_CONTEXT, kill_and_see_it_named, spawned_children

PARAMS = [SamplingParams(temperature=0, max_tokens=20, stop=[" Lily"]),
          SamplingParams(temperature=0.8, seed=5, max_tokens=12, n=2),
          SamplingParams(temperature=0, max_tokens=6, logprobs=2)]


def _outputs(llm):
    prompts = ["Once upon a time", "The little dog", "Tom saw a big"]
    return [[(c.text, c.token_ids, c.finish_reason, c.stop_reason,
              [sorted(d) for d in c.logprobs] if c.logprobs else None) for c in o.outputs]
            for o in llm.generate(prompts, PARAMS)]


def test_core_process_outputs_equal_in_process(monkeypatch):
    with LLM(str(DEMO_MODEL), block_size=4) as here:
        want = _outputs(here)
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), block_size=4) as apart:
        assert isinstance(apart.engine, DataParallelEngine) and apart.engine.dp_size == 1
        assert _outputs(apart) == want
        assert apart.engine.gauges()["num_free_blocks"] == apart.engine.gauges()["num_blocks"]
    assert any(c[2] == "stop" for o in want for c in o)


def _first_completion(server) -> None:
    r = httpx.post(server.v1 + "/completions", json={"model": "stories260k", "prompt": [1], "max_tokens": 12,
                                                     "temperature": 0}, timeout=60)
    assert r.json()["choices"][0]["text"].startswith("Once upon a time")


def test_server_fails_health_when_the_core_dies():
    server = launch("--block-size", "4", *LONG_CONTEXT, timeout=180)   # deepserve serve: the core apart by default
    try:
        _first_completion(server)
        assert httpx.get(server.url + "/health").status_code == 200
        cores = spawned_children(server)
        assert len(cores) == 1, cores                 # the one engine core (TP=1: no other rank)
        kill_and_see_it_named(server, cores[0], "rank 0 (pid", in_flight=True)
    finally:
        server.stop()


def test_two_api_servers_fail_health_and_exit_when_the_core_dies():
    server = launch("--api-server-count", "2", "--block-size", "4", *LONG_CONTEXT, timeout=240)
    try:
        _first_completion(server)
        children = spawned_children(server)
        assert len(children) == 3, children            # the engine core, then the two API servers
        kill_and_see_it_named(server, children[0], "rank 0 (pid", in_flight=True)
        assert all(not os.path.exists(f"/proc/{p}") or open(f"/proc/{p}/stat").read().split(") ")[1][0] == "Z"
                   for p in children[1:])
    finally:
        server.stop()


def test_core_not_ready_in_time_names_the_variable(monkeypatch):
    """A core that has joined but is not ready within DEEPSERVE_ENGINE_READY_TIMEOUT fails the
    start, naming the variable (loading, profiling, graphs and the warm-up share that window)."""
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    monkeypatch.setenv("DEEPSERVE_ENGINE_READY_TIMEOUT", "0.05")
    with pytest.raises(RuntimeError, match=r"did not report ready within 0 s \(DEEPSERVE_ENGINE_READY_TIMEOUT"):
        LLM(str(DEMO_MODEL))


def test_a_request_the_core_refuses_gets_a_request_error():
    """A request the engine core refuses before any forward (its own checks) fails at the
    front end with the core's message as a RequestError, which the API answers 400 (it hung
    once, then was a failed step's 500); the request running beside it and the next one are
    served."""
    import asyncio

    from deepserve.config import EngineArgs
    from deepserve.engine.async_llm import AsyncLLM
    from deepserve.engine.llm_engine import RequestError
    from deepserve.server.serving_common import api_error_from

    engine = DataParallelEngine(EngineArgs(model=str(DEMO_MODEL), num_gpu_blocks_override=64))
    engine.runner.vocab_size = 10**6   # the front end lets id 727 through; the core's checks refuse it
    llm = AsyncLLM(engine)

    async def last(prompt, params, rid):
        out = None
        async for out in llm.generate(prompt, params, rid):
            pass
        return out

    async def main():
        llm.start()
        greedy = SamplingParams(max_tokens=8, temperature=0)
        beside = asyncio.ensure_future(last("Once upon a time", greedy, "beside"))
        bad = SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=[727])
        with pytest.raises(RequestError, match="stop_token_ids token id 727 is outside the vocabulary") as refused:
            await asyncio.wait_for(last("Once upon a time", bad, "bad"), 30)
        error = api_error_from(refused.value)
        assert (error.status, error.body()["error"]["type"]) == (400, "BadRequestError")
        with pytest.raises(RequestError, match="prompt token id 727 is outside the vocabulary"):
            await asyncio.wait_for(last({"prompt_token_ids": [1, 727]}, greedy, "bad2"), 30)
        assert (await asyncio.wait_for(beside, 30)).outputs[0].text == ", there was a little girl"
        good = await asyncio.wait_for(last("Once upon a time", greedy, "ok"), 30)
        assert good.outputs[0].text == ", there was a little girl"
        assert llm.num_step_errors == 0

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()


def test_front_end_serves_the_contexts_the_pool_holds(monkeypatch):
    """A KV pool of 64 tokens caps the core's contexts at 64: the front end takes a request whose
    output would pass it and the core stops it there, the front end itself refuses a prompt past
    it naming 64, and the offline LLM stops such a request at 64 tokens, as vLLM's."""
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), num_gpu_blocks_override=4, block_size=16) as llm:
        assert llm.engine.max_model_len == 64
        rid = llm.engine.add_request(None, "Once upon a time", SamplingParams(max_tokens=100, ignore_eos=True))
        final = None
        while llm.engine.has_unfinished_requests():
            final = next((o for o in llm.engine.step() if o.request_id == rid and o.finished), final)
        assert final.outputs[0].finish_reason == "length"
        assert len(final.prompt_token_ids) + len(final.outputs[0].token_ids) == 64
        with pytest.raises(ValueError, match="longer than the maximum model length of 64"):
            llm.engine.add_request(None, {"prompt_token_ids": [5] * 65}, SamplingParams(max_tokens=1))
        capped = llm.generate("Once upon a time", SamplingParams(max_tokens=100, ignore_eos=True))[0]
        assert len(capped.prompt_token_ids) + len(capped.outputs[0].token_ids) == 64
        assert capped.outputs[0].finish_reason == "length"
        out = llm.generate("Once upon a time", SamplingParams(max_tokens=50, ignore_eos=True, temperature=0))
        assert len(out[0].outputs[0].token_ids) == 50


@pytest.mark.parametrize("sync_group", [None, "the cores' group"], ids=["replicas", "expert-parallel"])
def test_a_failed_step_with_expert_parallel_ends_the_core(sync_group):
    """A step that raises fails its requests (each front end hears which, with the error). A
    replica core steps on; under expert parallel (the cores' MoE layers exchange tokens every
    round) the other cores wait in exchanges this one never reached, so it ends, naming them."""
    from types import SimpleNamespace

    from deepserve.engine.engine_core import EngineCore

    def step():
        raise IndexError("index 64 is out of bounds for dimension 0 with size 64")

    engine = SimpleNamespace(stats={"steps": 0}, step=step, requests={"a": 1, "b": 2},
                             abort_request=lambda rid: None)
    core = object.__new__(EngineCore)
    sent = []
    core.__dict__.update(engine=engine, executor=SimpleNamespace(sent_bytes=0), dp_rank=1, sync_group=sync_group,
                         client_of={"a": 0, "b": 1}, deltas=SimpleNamespace(forget=lambda rid: None),
                         gauges=dict, _send=lambda msg, client: sent.append((client, msg.failed_requests, msg.error)))
    error = "IndexError: index 64 is out of bounds for dimension 0 with size 64"
    if sync_group is None:
        assert core._step(None) is True
    else:
        with pytest.raises(RuntimeError, match=f"^DP rank 1: a step failed with expert parallel, leaving the other "
                                               f"DP ranks' MoE exchanges unmatched: {error}$"):
            core._step(None)
    assert sent == [(0, ["a"], error), (1, ["b"], error)]
