"""Async scheduling (step n+1 launched before step n's tokens reach the host) gives exactly the
outputs of the synchronous engine on stories260k: greedy and seeded sampling, n > 1, stop
strings and stop token ids (a finished sequence's extra row is dropped), max_tokens, chunked
prefill, preemption, prefix caching, steps that must run synchronously (logprobs, penalties,
min_tokens) mixed in, and an abort while a step is in flight; every block comes back. Over
several processes (TP2, PP2, DP2 x EP2, TP2 x DP2 x EP, DP2 x PP2 x EP) async gives one
synchronous process's tokens; with pipeline stages the engine keeps micro-batches in flight
instead of launching steps ahead (the same with or without async scheduling)."""
import pytest

from deepserve import LLM, SamplingParams

COMMA = 432
WORDS = "the little dog saw a big red ball and ran to the park with his friend Tom".split()


def _prompts(llm, n):
    tok = llm.get_tokenizer()
    return [{"prompt_token_ids": tok.encode(" ".join(WORDS[: 1 + (i * 7) % len(WORDS)]))} for i in range(n)]


def _params(i: int) -> SamplingParams:
    kinds = [SamplingParams(temperature=0, max_tokens=3 + i % 17),
             SamplingParams(temperature=0.8, seed=i, max_tokens=20, n=2),
             SamplingParams(temperature=0, max_tokens=40, stop=[" ball", "."]),
             # a token-id stop, as EOS ends a sequence (stories260k's EOS comes only after ~200
             # tokens): 432 is ",", which greedy outputs here reach after 5 to 40 tokens
             SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[COMMA]),
             SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=100 + i, max_tokens=15)]
    return kinds[i % len(kinds)]


def _texts(llm, prompts, params):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
            for o in llm.generate(prompts, params)]


def _both(**engine):
    sync = LLM(block_size=4, async_scheduling=False, **engine)   # (the default is on where steps overlap)
    asyn = LLM(block_size=4, async_scheduling=True, **engine)
    assert asyn.engine.async_scheduling and not sync.engine.async_scheduling
    return sync, asyn


def _all_free(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(s.num_pending == 0 for s in llm.engine.scheduler.running)


@pytest.mark.parametrize("engine", [{}, {"max_num_batched_tokens": 16},
                                    {"num_gpu_blocks_override": 40, "enable_prefix_caching": False}],
                         ids=["plain", "chunked-prefill", "preemption"])
def test_async_equals_sync(engine):
    sync, asyn = _both(**engine)
    prompts = _prompts(sync, 12)
    params = [_params(i) for i in range(len(prompts))]
    want = _texts(sync, prompts, params)
    assert _texts(asyn, prompts, params) == want
    stops = {c[3] for o in want for c in o if c[2] == "stop"}
    assert COMMA in stops and stops & {" ball", "."}              # both kinds of stop happened
    if "num_gpu_blocks_override" in engine:
        assert asyn.engine.scheduler.num_preemptions > 0
    _all_free(asyn)
    # again, now with prefix-cache hits where enabled
    assert _texts(asyn, prompts, params) == want
    _all_free(asyn)


def test_steps_needing_host_history_run_synchronously_and_match():
    sync, asyn = _both()
    prompts = _prompts(sync, 8)
    params = [SamplingParams(temperature=0, max_tokens=12, logprobs=2) if i == 2 else
              SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3) if i == 5 else
              SamplingParams(temperature=0, max_tokens=12, min_tokens=10) if i == 6 else
              SamplingParams(temperature=0, max_tokens=5 + i) for i in range(8)]
    want = [o.outputs[0] for o in sync.generate(prompts, params)]
    got = [o.outputs[0] for o in asyn.generate(prompts, params)]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [[sorted(d) for d in c.logprobs] for c in got if c.logprobs] == \
        [[sorted(d) for d in c.logprobs] for c in want if c.logprobs]
    _all_free(asyn)


def test_abort_with_a_step_in_flight_frees_its_blocks():
    llm = LLM(block_size=4, async_scheduling=True)
    engine = llm.engine
    prompts = _prompts(llm, 4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine._inflight is not None                      # a step is on its way
    engine.abort_request("r1")
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert sorted(done) == ["r0", "r2", "r3"] and all(len(t) == 30 for t in done.values())
    engine.step()                                             # reads the last (dropped) rows
    _all_free(llm)


def test_async_steps_launch_without_waiting(monkeypatch):
    """The async engine runs every step through `launch` (none through the synchronous
    `execute`): 60 tokens from one prompt are 60 launches plus one whose row is dropped."""
    llm = LLM(block_size=4, async_scheduling=True)
    runner, calls = llm.engine.runner, {"launch": 0, "execute": 0}
    for name in calls:
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name, lambda *a, _real=real, _name=name, **k:
                            (calls.__setitem__(_name, calls[_name] + 1), _real(*a, **k))[1])
    out = llm.generate({"prompt_token_ids": [1]}, SamplingParams(temperature=0, max_tokens=60))[0]
    assert len(out.outputs[0].token_ids) == 60
    assert calls == {"launch": 61, "execute": 0}


ASYNC_PROMPTS = [{"prompt_token_ids": list(range(3, 40))}, {"prompt_token_ids": [1]},
                 {"prompt_token_ids": [1, 40, 41, 26, 7, 9, 11]}]
ASYNC_PARAMS = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                SamplingParams(temperature=1.0, seed=3, max_tokens=9, ignore_eos=True),
                SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]
LAYOUT_ENGINE = dict(block_size=4, max_model_len=128, max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from tests.conftest import DEMO_MODEL
    from tests.distributed.test_parallel_engine import tiny_deepseek
    return {"llama": str(DEMO_MODEL), "deepseek": str(tiny_deepseek(tmp_path_factory.mktemp("dsv3-async")))}


@pytest.mark.parametrize("name,layout", [
    ("llama", {"tensor_parallel_size": 2}),
    ("llama", {"pipeline_parallel_size": 2}),
    ("deepseek", {"data_parallel_size": 2, "enable_expert_parallel": True}),
    ("deepseek", {"tensor_parallel_size": 2, "data_parallel_size": 2, "enable_expert_parallel": True}),
    ("deepseek", {"data_parallel_size": 2, "pipeline_parallel_size": 2, "enable_expert_parallel": True})],
    ids=["tp2", "pp2", "dp2-ep2", "tp2-dp2-ep", "dp2-pp2-ep"])
def test_async_on_every_layout_equals_one_synchronous_process(tiny_models, name, layout):
    """Chunked prefill, greedy and seeded rows: async scheduling over several processes gives
    one synchronous process's tokens (TP peers get the device-side ids from the driver). With
    pipeline stages it is accepted and every engine (each DP rank's core) keeps one
    micro-batch in flight per stage."""
    with LLM(tiny_models[name], async_scheduling=False, **LAYOUT_ENGINE) as ref:
        want = [o.outputs[0].token_ids for o in ref.generate(ASYNC_PROMPTS, ASYNC_PARAMS)]
    with LLM(tiny_models[name], async_scheduling=True, **layout, **LAYOUT_ENGINE) as llm:
        assert llm.engine.async_scheduling
        got = [o.outputs[0].token_ids for o in llm.generate(ASYNC_PROMPTS, ASYNC_PARAMS)]
        gauges = llm.engine.gauges()
    assert got == want
    pp, dp = layout.get("pipeline_parallel_size", 1), layout.get("data_parallel_size", 1)
    # summed over the DP ranks' cores; absent without stages
    assert gauges.get("pp_most_micro_batches_in_flight") == (pp * dp if pp > 1 else None)
