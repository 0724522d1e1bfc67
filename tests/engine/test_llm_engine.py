"""End-to-end engine behaviour on the real stories260k model: known greedy text, batching
with preemption, chunked prefill, prefix caching, sampling controls."""
import pytest

from deepserve import LLM, SamplingParams
from deepserve.engine.llm_engine import RequestError

KNOWN = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high")
GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def llm():
    return LLM(block_size=4)


def _prompts(llm, n=12):
    tok = llm.get_tokenizer()
    words = "the little dog saw a big red ball and ran to the park with his friend Tom".split()
    return [{"prompt_token_ids": tok.encode(" ".join(words[: 1 + (i * 7) % len(words)]))} for i in range(n)]


def test_stories260k_known_greedy_text(llm):
    out = llm.generate({"prompt_token_ids": [1]}, SamplingParams(temperature=0, max_tokens=60))[0]
    assert out.outputs[0].text.startswith(KNOWN)


def test_batch_with_preemption_equals_alone(llm):
    prompts = _prompts(llm)
    expected = [llm.generate(p, GREEDY)[0].outputs[0].token_ids for p in prompts]
    # 40 blocks of 4 tokens cannot hold 12 sequences of ~20-40 tokens: preemption must happen
    small = LLM(block_size=4, num_gpu_blocks_override=40, enable_prefix_caching=False)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, GREEDY)]
    engine = small.engine
    assert engine.scheduler.num_preemptions > 0
    assert got == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_chunked_prefill_and_prefix_cache_unchanged(llm):
    tok = llm.get_tokenizer()
    long_prompt = {"prompt_token_ids": tok.encode("Once upon a time there was a dog. " * 8)}
    expected = llm.generate(long_prompt, GREEDY)[0].outputs[0].token_ids
    chunked = LLM(block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert len(long_prompt["prompt_token_ids"]) > 16
    assert chunked.generate(long_prompt, GREEDY)[0].outputs[0].token_ids == expected
    cached = LLM(block_size=4)
    first = cached.generate(long_prompt, GREEDY)[0]
    hits_before = cached.engine.block_manager.prefix_hits
    second = cached.generate(long_prompt, GREEDY)[0]
    assert cached.engine.block_manager.prefix_hits - hits_before >= len(long_prompt["prompt_token_ids"]) - 4
    assert second.num_cached_tokens > 0
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected


def test_seeded_sampling_reproducible_and_topk1_is_greedy(llm):
    p = {"prompt_token_ids": [1]}
    sp = SamplingParams(temperature=1.0, max_tokens=20, seed=7)
    a = llm.generate(p, sp)[0].outputs[0].token_ids
    # batched with other requests, the seeded one must not change
    outs = llm.generate([p, p, p], [SamplingParams(temperature=1.0, max_tokens=20), sp,
                                     SamplingParams(temperature=1.0, max_tokens=20, seed=8)])
    assert outs[1].outputs[0].token_ids == a
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].token_ids
    topk1 = llm.generate(p, SamplingParams(temperature=1.3, top_k=1, max_tokens=20))[0].outputs[0].token_ids
    assert topk1 == greedy


def test_stop_strings_cut_and_n2(llm):
    p = {"prompt_token_ids": [1]}
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=60, stop=["Lily"]))[0].outputs[0]
    assert out.text == "Once upon a time, there was a little girl named "
    assert out.finish_reason == "stop" and out.stop_reason == "Lily"
    kept = llm.generate(p, SamplingParams(temperature=0, max_tokens=60, stop=["Lily"],
                                          include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text.endswith("named Lily")
    six = llm.generate(p, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0].text
    full = llm.generate(p, SamplingParams(temperature=0, max_tokens=20))[0].outputs[0].text
    late = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, stop=["a"], min_tokens=6))[0].outputs[0]
    # a stop string counts only in text after min_tokens tokens (it stopped at once, in "upon a")
    assert "a" in six and late.text == full[:full.index("a", len(six))] and late.stop_reason == "a"
    two = llm.generate(p, SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=3))[0]
    assert [c.index for c in two.outputs] == [0, 1] and all(len(c.token_ids) == 16 for c in two.outputs)
    assert two.outputs[0].token_ids != two.outputs[1].token_ids


def test_max_tokens_min_tokens_ignore_eos_and_stop_token(llm):
    p = {"prompt_token_ids": [1]}
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=7))[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].token_ids
    stop_tok = greedy[5]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert out.token_ids == greedy[:6] and out.stop_reason == stop_tok
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, min_tokens=8,
                                         stop_token_ids=[stop_tok]))[0].outputs[0]
    assert stop_tok not in out.token_ids[:7]
    long = llm.generate(p, SamplingParams(temperature=0, max_tokens=300, ignore_eos=True))[0].outputs[0]
    assert len(long.token_ids) == 300
    # the demo model never picks EOS by itself: biased towards it, greedy stops at once unless
    # ignore_eos, which samples it and goes on
    eos = min(llm.engine.eos_token_ids)
    forced = dict(temperature=0, max_tokens=9, logit_bias={eos: 100.0})
    out = llm.generate(p, SamplingParams(**forced))[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = llm.generate(p, SamplingParams(**forced, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == [eos] * 9 and out.finish_reason == "length"


def test_penalties_and_logprobs(llm):
    p = {"prompt_token_ids": [1]}
    base = llm.generate(p, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].token_ids
    pen = llm.generate(p, SamplingParams(temperature=0, max_tokens=40, frequency_penalty=2.0,
                                         presence_penalty=2.0))[0].outputs[0].token_ids
    assert len(set(pen)) > len(set(base))  # penalties reduce repetition
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 5
    for tid, entry in zip(out.token_ids, out.logprobs):
        assert entry[tid].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())


def test_bad_requests_are_clear_errors(llm):
    with pytest.raises(RequestError, match="512.*513|513.*512"):
        llm.generate({"prompt_token_ids": [1] * 513}, GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, 99999]}, GREEDY)
    with pytest.raises(ValueError, match="temperature must be non-negative, got -1"):
        SamplingParams(temperature=-1)
    # the engine still serves afterwards, with every block free
    assert llm.generate({"prompt_token_ids": [1]}, GREEDY)[0].outputs[0].text.startswith("Once")
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_default_schedules_ahead_on_a_device_and_matches(llm, monkeypatch, caplog):
    """async_scheduling unset: off on the CPU, on on a GPU. Where the plan turns it on, greedy
    text, seeded samples, stop strings, n=2 and max_tokens equal the synchronous engine's, and
    an abort with a step in flight frees every block."""
    import logging

    import deepserve.engine.llm_engine as llm_engine
    real = llm_engine.async_scheduling_plan
    assert llm.engine.async_scheduling is (llm.engine.platform.device_type != "cpu")
    sync = LLM(block_size=4, async_scheduling=False) if llm.engine.async_scheduling else llm
    monkeypatch.setattr(llm_engine, "async_scheduling_plan", lambda config, device: real(config, "cuda"))
    with caplog.at_level(logging.INFO, logger="deepserve"):
        ahead = LLM(block_size=4)
    assert ahead.engine.async_scheduling
    assert "async scheduling on (the default" in caplog.text
    prompts = _prompts(llm, 6)
    params = [SamplingParams(temperature=0, max_tokens=5 + 3 * i) if i % 3 == 0 else
              SamplingParams(temperature=0.9, seed=i, max_tokens=12, n=2) if i % 3 == 1 else
              SamplingParams(temperature=0, max_tokens=40, stop=[" ball", "."]) for i in range(len(prompts))]

    def texts(engine_llm):
        return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs]
                for o in engine_llm.generate(prompts, params)]
    assert texts(ahead) == texts(sync)
    engine = ahead.engine
    for i, p in enumerate(prompts[:3]):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    engine.abort_request("r1")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()                                   # reads the dropped rows of the last launch
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
