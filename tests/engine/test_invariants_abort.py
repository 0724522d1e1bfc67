"""Aborts leave the KV pool and the prefix cache whole: a request aborted mid-prefill-chunk,
mid-speculative-step or with an async step in flight frees every block at once, the block
manager's counts agree with the live block tables after every step, and the prompts computed
before the abort are then served from the cache with the tokens of a run without it."""
from __future__ import annotations

from collections import Counter

import pytest

from deepserve import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
TEXTS = ["Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
         "Tom and Lily went to the park. Tom and Lily played with the ball. Tom and Lily"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def assert_consistent(engine):
    """Reference counts are the live block tables' uses, the free queue is the unused blocks,
    and the prefix cache's key -> block map is the inverse of each block's key."""
    bm, sched = engine.block_manager, engine.scheduler
    uses = Counter(b for s in [*sched.running, *sched.waiting] for b in s.block_table)
    assert bm.ref_counts == [uses[b] for b in range(bm.num_blocks)]
    assert set(bm.free) == {b for b in range(bm.num_blocks) if uses[b] == 0}
    assert {b: h for h, b in bm.cached.items()} == {b: h for b, h in enumerate(bm.hash_of) if h is not None}


@pytest.fixture(scope="module")
def expected():
    llm = LLM(block_size=4, enable_prefix_caching=False)
    return [o.outputs[0].token_ids for o in llm.generate(TEXTS, GREEDY)]


@pytest.mark.parametrize("kwargs", [
    dict(max_num_batched_tokens=5, max_model_len=128),                               # mid-prefill-chunk
    dict(max_num_batched_tokens=9, max_model_len=128, speculative_config=NGRAM),     # mid-spec-step
    dict(max_num_batched_tokens=5, max_model_len=128, async_scheduling=True),        # a step in flight
], ids=["chunked", "ngram", "async"])
def test_aborts_free_every_block_and_keep_the_cache_whole(expected, kwargs):
    llm = LLM(block_size=4, **kwargs)
    engine = llm.engine
    drafted_before_abort = 0
    for steps in (1, 2, 3, 5, 8, 13, 21, 34):
        ids = [engine.add_request(None, t, SamplingParams(temperature=0.8, seed=1, max_tokens=40, n=2)) for t in TEXTS]
        for _ in range(steps):
            engine.step()
            assert_consistent(engine)
        drafted_before_abort = engine.gauges().get("spec_decode_num_drafts", 0)
        for rid in ids:
            engine.abort_request(rid)
            assert_consistent(engine)
        while engine.has_unfinished_requests():    # (async: the step in flight lands and is dropped)
            engine.step()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    hits = engine.block_manager.prefix_hits
    assert [o.outputs[0].token_ids for o in llm.generate(TEXTS, GREEDY)] == expected
    assert engine.block_manager.prefix_hits > hits
    if "speculative_config" in kwargs:
        assert drafted_before_abort > 0
    assert_consistent(engine)
