"""vLLM 0.26's offline API beyond generate(): LLMEngine.from_engine_args, reset_prefix_cache,
get_metrics, and a clear refusal (never an AttributeError) for what deepserve does not serve:
sleep mode, worker RPCs, pooling models. On the demo model (stories260k)."""
from __future__ import annotations

import argparse

import pytest

from deepserve import LLM, SamplingParams
from deepserve.config import EngineArgs
from deepserve.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=4)
PROMPT = {"prompt_token_ids": list(range(5, 45))}   # 40 tokens: two full blocks of 16


DEMO_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=64, block_size=16, chat_template=DEMO_TEMPLATE) as llm:
        yield llm


def test_llm_engine_from_engine_args_runs_vllms_example_loop():
    """vLLM's llm_engine_example: the parser add_cli_args returns, from_engine_args, add_request,
    step until done."""
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(parser.parse_args(["--max-model-len", "64"])))
    try:
        engine.add_request("0", "Once upon a time", GREEDY)
        outs = []
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.finished]
        assert [o.request_id for o in outs] == ["0"] and len(outs[0].outputs[0].token_ids) == 4
        assert engine.get_num_unfinished_requests() == 0 and not engine.is_sleeping()
        engine.add_request("1", "Once", GREEDY)
        engine.add_request("2", "Once", GREEDY)
        assert engine.abort_request(["1", "2"]) is None   # vLLM's form: a list of ids
        assert not engine.has_unfinished_requests()
        with pytest.raises(ValueError, match="priority scheduling is not enabled"):
            engine.add_request("3", "Once", GREEDY, priority=1)
        with pytest.raises(ValueError, match="lora_request is not supported"):
            engine.add_request("3", "Once", GREEDY, lora_request=object())
        assert not engine.has_unfinished_requests()
        assert engine.get_supported_tasks() == ("generate",) and engine.get_tokenizer() is engine.tokenizer
        with pytest.raises(NotImplementedError, match="stat_loggers"):
            LLMEngine.from_engine_args(EngineArgs(max_model_len=64), stat_loggers=[object()])
    finally:
        engine.shutdown()


def test_reset_prefix_cache_forgets_cached_blocks(llm):
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 0
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache() is True
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 0
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 32


def test_reset_prefix_cache_with_requests_queued(llm):
    """Requests enqueue() added wait without KV blocks: the reset goes ahead."""
    llm.generate(PROMPT, GREEDY)
    ids = llm.enqueue(PROMPT, GREEDY)
    assert llm.reset_prefix_cache() is True
    assert [o.num_cached_tokens for o in llm.wait_for_completion()] == [0] and len(ids) == 1


def test_reset_prefix_cache_refuses_while_blocks_are_held(llm):
    """vLLM's rule: False, and the cache kept, while a request holds KV blocks."""
    llm.generate(PROMPT, GREEDY)
    engine = llm.engine
    rid = engine.add_request(None, {"prompt_token_ids": list(range(100, 120))},
                             SamplingParams(temperature=0, max_tokens=8))
    engine.step()   # its prefill: it holds blocks now
    try:
        assert llm.reset_prefix_cache() is False
    finally:
        engine.abort_request(rid)
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 32   # the cache was kept
    with pytest.raises(NotImplementedError, match="KV connector"):
        llm.reset_prefix_cache(reset_connector=True)


def _finish(engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_reset_prefix_cache_preempting_the_running_requests(llm):
    """reset_running_requests=True: the running request is preempted (its blocks freed), the
    cache is forgotten, and the request then finishes with the tokens it gives alone."""
    ids = {"prompt_token_ids": list(range(100, 120))}
    params = SamplingParams(temperature=0, max_tokens=8)
    alone = llm.generate(ids, params)[0].outputs[0].token_ids
    llm.generate(PROMPT, GREEDY)
    engine = llm.engine
    rid = engine.add_request(None, ids, params)
    engine.step()
    engine.step()
    preemptions = engine.scheduler.num_preemptions
    assert llm.reset_prefix_cache(reset_running_requests=True) is True
    assert engine.scheduler.num_preemptions == preemptions + 1
    assert _finish(engine) == {rid: alone}
    assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 0   # the cache was forgotten


def test_reset_prefix_cache_with_the_engine_core_apart(monkeypatch):
    """The front end asks the engine core process (one DP rank here) to reset its cache."""
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    from deepserve.engine.dp_engine import DataParallelEngine

    with LLM(max_model_len=64, block_size=16) as llm:
        assert isinstance(llm.engine, DataParallelEngine)
        llm.generate(PROMPT, GREEDY)
        assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 32
        assert llm.reset_prefix_cache() is True
        assert llm.generate(PROMPT, GREEDY)[0].num_cached_tokens == 0
        llm.engine.add_request("a", PROMPT, GREEDY)
        llm.engine.abort_request(["a"])
        assert not llm.engine.has_unfinished_requests()
        llm.engine.add_request("b", PROMPT, GREEDY)
        llm.engine.step()
        assert llm.reset_prefix_cache(reset_running_requests=True) is True
        assert list(_finish(llm.engine)) == ["b"]


def test_get_metrics_in_vllms_names(llm):
    from deepserve.engine.metrics_reader import Counter, Gauge

    llm.generate(["Once upon a time"], GREEDY)
    metrics = {m.name: m for m in llm.get_metrics()}
    assert isinstance(metrics["vllm:num_requests_running"], Gauge)
    assert metrics["vllm:num_requests_running"].value == 0
    assert 0.0 <= metrics["vllm:kv_cache_usage_perc"].value <= 1.0
    tokens = metrics["vllm:generation_tokens"]
    assert isinstance(tokens, Counter) and tokens.value >= 4
    assert metrics["vllm:prompt_tokens"].value > 0
    assert {"vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions"} <= set(metrics)
    assert tokens.labels == {"model_name": "stories260k", "engine": "0"}


@pytest.mark.parametrize("call, what", [
    (lambda llm: llm.sleep(level=1), "sleep mode"),
    (lambda llm: llm.wake_up(), "sleep mode"),
    (lambda llm: llm.collective_rpc("echo"), "collective_rpc"),
    (lambda llm: llm.apply_model(lambda m: None), "apply_model"),
    (lambda llm: llm.engine.sleep(), "sleep mode"),
    (lambda llm: llm.update_weights({}), "weight transfer"),
    (lambda llm: llm.init_weight_transfer_engine({}), "weight transfer"),
    (lambda llm: llm.engine.add_lora(None), "LoRA"),
    (lambda llm: llm.embed(["hi"]), "embed"),
    (lambda llm: llm.encode(["hi"]), "encode"),
    (lambda llm: llm.classify(["hi"]), "classify"),
    (lambda llm: llm.score("a", ["b"]), "score"),
    (lambda llm: llm.reward(["hi"]), "reward"),
])
def test_unsupported_calls_are_refused_by_name(llm, call, what):
    with pytest.raises(NotImplementedError, match=what):
        call(llm)


def test_add_request_priority_with_priority_scheduling():
    """vLLM's add_request(..., priority=): lower runs first."""
    engine = LLMEngine(EngineArgs(max_model_len=64, scheduling_policy="priority", max_num_seqs=1))
    try:
        engine.add_request("late", "Once", GREEDY, priority=5)
        engine.add_request("first", "Once", GREEDY, priority=-1)
        order = []
        while engine.has_unfinished_requests():
            order += [o.request_id for o in engine.step() if o.finished]
        assert order == ["first", "late"]
    finally:
        engine.shutdown()


def test_enqueue_chat_then_wait_for_completion(llm):
    conversation = [{"role": "user", "content": "Once upon a time"}]
    ids = llm.enqueue_chat([conversation, conversation], GREEDY)
    assert len(ids) == 2 and llm.engine.get_num_unfinished_requests() == 2
    outs = llm.wait_for_completion()
    assert [o.request_id for o in outs] == ids
    assert outs[0].outputs[0].text == llm.chat(conversation, GREEDY)[0].outputs[0].text


def test_world_size_and_mm_cache(llm):
    assert llm.get_world_size() == llm.get_world_size(include_dp=False) == 1
    llm.reset_mm_cache()   # text only: nothing to clear


def test_add_request_takes_vllms_arguments_in_order(llm):
    """vLLM's add_request(request_id, prompt, params, arrival_time, lora_request,
    tokenization_kwargs, trace_headers, priority, prompt_text): an arrival time given
    positionally dates the request; tracing and tokenization options are refused by name."""
    import time

    engine = llm.engine
    rid = engine.add_request("late", PROMPT, GREEDY, time.time() - 5.0)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    metrics = done[rid].metrics
    assert metrics["first_token_time"] - metrics["arrival_time"] >= 4.9
    for kwargs in ({"trace_headers": {"traceparent": "00-1-2-01"}}, {"tokenization_kwargs": {"truncate_prompt_tokens": 3}}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            engine.add_request("x", PROMPT, GREEDY, **kwargs)
    assert not engine.has_unfinished_requests()


def test_request_output_metrics_are_vllms(llm):
    """vLLM's offline LLM logs no stats by default, so RequestOutput.metrics is None; with
    disable_log_stats=False it is a RequestStateStats (wall-clock arrival, monotonic phases)."""
    import time

    from deepserve.engine.outputs import RequestStateStats

    assert llm.generate(PROMPT, GREEDY)[0].metrics is None
    with LLM(max_model_len=64, block_size=16, disable_log_stats=False) as logged:
        before, mono = time.time(), time.monotonic()
        out = logged.generate([PROMPT, PROMPT], SamplingParams(temperature=0, max_tokens=4, n=1))[1]
        after = time.monotonic()
    stats = out.metrics
    assert isinstance(stats, RequestStateStats) and stats.num_generation_tokens == 4 and not stats.is_corrupted
    assert mono <= stats.queued_ts <= stats.scheduled_ts <= stats.first_token_ts <= stats.last_token_ts <= after
    assert stats.first_token_latency == pytest.approx(stats.first_token_ts - stats.queued_ts)
    assert before - 0.5 <= stats.arrival_time <= time.time()
