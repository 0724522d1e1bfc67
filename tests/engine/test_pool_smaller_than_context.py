"""A KV pool that holds fewer tokens than max_model_len: the engine serves contexts up to the
pool's size, where a sequence that outgrew the whole pool preempted itself forever."""
from __future__ import annotations

import pytest

from deepserve import LLM, SamplingParams
from deepserve.engine.llm_engine import RequestError


@pytest.mark.timeout(120)
def test_context_is_capped_at_the_pool_and_a_long_request_finishes():
    llm = LLM(num_gpu_blocks_override=4, block_size=16, enable_prefix_caching=False)
    assert llm.engine.max_model_len == 64
    prompt = llm.tokenizer.encode("Once upon a time")
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=64 - len(prompt), ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 64 - len(prompt)
    # the engine stops a request past the 64 tokens there, as vLLM's; a prompt filling them is refused
    rid = llm.engine.add_request(None, {"prompt_token_ids": prompt}, SamplingParams(max_tokens=100))
    assert llm.engine.requests[rid].params.max_tokens == 64 - len(prompt)
    llm.engine.abort_request([rid])
    with pytest.raises(RequestError, match="longer than the maximum model length of 64"):
        llm.engine.add_request(None, {"prompt_token_ids": prompt * 16}, SamplingParams(max_tokens=1))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 64 - len(prompt)


@pytest.mark.timeout(120)
def test_min_tokens_past_the_context_stops_there():
    """min_tokens beyond the room the prompt leaves: the output stops at the context's end
    (finish_reason "length"), as vLLM's engine, with no 'min_tokens must be less than or equal to
    max_tokens' naming a max_tokens the caller never sent."""
    llm = LLM(num_gpu_blocks_override=4, block_size=16, enable_prefix_caching=False)
    prompt = llm.tokenizer.encode("Once upon a time")
    room = 64 - len(prompt)
    params = SamplingParams(temperature=0, max_tokens=100, min_tokens=90)
    rid = llm.engine.add_request(None, {"prompt_token_ids": prompt}, params)
    taken = llm.engine.requests[rid].params
    assert (taken.max_tokens, taken.min_tokens) == (room, room)
    llm.engine.abort_request([rid])
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == room


@pytest.mark.timeout(120)
def test_a_given_max_model_len_the_pool_cannot_hold_is_refused_as_vllm_does(caplog):
    """vLLM's check_enough_kv_cache_memory: --max-model-len 100 over a 64-token pool is an error at
    start naming both and the length the pool holds; -1 (auto) fits it to the pool; without the
    flag the pool's length is served with a warning (the demo's default start)."""
    with pytest.raises(ValueError) as info:
        LLM(num_gpu_blocks_override=4, block_size=16, max_model_len=100)
    msg = str(info.value)
    assert msg.startswith("To serve at least one request with the model's max seq len (100), ")
    assert "the estimated maximum model length is 64." in msg and "raise --num-gpu-blocks-override" in msg
    assert LLM(num_gpu_blocks_override=4, block_size=16, max_model_len=64).engine.max_model_len == 64
    with caplog.at_level("INFO", logger="deepserve"):
        assert LLM(num_gpu_blocks_override=4, block_size=16, max_model_len=-1).engine.max_model_len == 64
    assert "max_model_len auto: 64 tokens" in caplog.text and "fewer than max_model_len" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="deepserve"):
        assert LLM(num_gpu_blocks_override=4, block_size=16).engine.max_model_len == 64
    assert "the KV cache holds 64 tokens, fewer than max_model_len 512" in caplog.text
    with pytest.raises(ValueError, match="max_model_len must be >= 1, or -1"):
        LLM(max_model_len=-2)
