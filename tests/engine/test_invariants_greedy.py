"""Every scheduling, caching and speculation setting gives the greedy tokens of the plainest
run (each request alone, no prefix caching, no chunking, a large pool): prompts sharing 1,
k and k + 1 blocks, prompts of an exact number of blocks, n > 1, lengths that finish at
different steps, sent twice so the second round meets a pool that others filled and evicted."""
from __future__ import annotations

import pytest

from deepserve import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def _requests(tok):
    story = tok.encode(STORY)
    prompts = [story[:n] for n in (4, 8, 9, 12, 16, len(story))]          # block size 4
    prompts += [story[:4] + tok.encode(" dog"), story[:9] + tok.encode(" big cat"),
                tok.encode("Tom and Lily went to the park. Tom and Lily"), tok.encode("Sam")]
    params = [_greedy(n=1 + (i % 3 == 1), max_tokens=6 + 4 * (i % 5), ignore_eos=i % 2 == 0)
              for i in range(len(prompts))]
    return [{"prompt_token_ids": p} for p in prompts], params


def _greedy(n: int, **kw) -> SamplingParams:
    """Greedy params with n samples, which SamplingParams refuses (as vLLM's): set after it, so
    the engine's n > 1 path (siblings sharing the prompt's blocks) runs with known tokens."""
    params = SamplingParams(temperature=0, **kw)
    params.n = n
    return params


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def oracle():
    llm = LLM(block_size=4, enable_prefix_caching=False, enforce_eager=True)
    prompts, params = _requests(llm.get_tokenizer())
    return [_tokens(llm.generate(p, sp))[0] for p, sp in zip(prompts, params)]


@pytest.mark.parametrize("kwargs", [
    dict(num_gpu_blocks_override=24),
    dict(max_num_batched_tokens=5, max_model_len=96, num_gpu_blocks_override=40),
    dict(num_gpu_blocks_override=24, speculative_config=NGRAM),
    dict(max_num_batched_tokens=7, max_model_len=96, async_scheduling=True, speculative_config=NGRAM),
], ids=["preempting", "chunked", "ngram", "ngram-chunked-async"])
def test_greedy_tokens_equal_the_plainest_run(oracle, kwargs):
    llm = LLM(block_size=4, **kwargs)
    prompts, params = _requests(llm.get_tokenizer())
    for _ in range(2):
        assert _tokens(llm.generate(prompts, params)) == oracle
    engine = llm.engine
    if kwargs.get("num_gpu_blocks_override") == 24:
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.prefix_hits > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
