"""A request with prompt_logprobs is served whatever else holds the KV pool: scoring its prompt
preempts running sequences as a step short of blocks does (they are recomputed later and
finish with their own tokens), where it was refused while the pool was full."""
from __future__ import annotations

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.config import SchedulerConfig
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.scheduler import Scheduler
from deepserve.engine.sequence import Sequence, SeqStatus

BUSY = "Once upon a time, there was a little girl"
SCORED = "Tom and Lily went to the park."
LONG = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
SCORE = SamplingParams(temperature=0, max_tokens=5, prompt_logprobs=2)


def _entries(out):
    return [None if e is None else {t: (lp.rank, round(lp.logprob, 4)) for t, lp in e.items()}
            for e in out.prompt_logprobs]


@pytest.fixture(scope="module")
def alone():
    llm = LLM(block_size=4, enable_prefix_caching=False)
    return llm.generate(SCORED, SCORE)[0], llm.generate(BUSY, LONG)[0].outputs[0].token_ids


@pytest.mark.parametrize("kwargs", [{}, {"async_scheduling": True}], ids=["sync", "async"])
def test_prompt_logprobs_with_the_pool_full(alone, kwargs):
    want, busy_tokens = alone
    llm = LLM(block_size=4, num_gpu_blocks_override=24, **kwargs)
    engine = llm.engine
    busy = [engine.add_request(None, BUSY, LONG) for _ in range(4)]
    while engine.block_manager.num_free_blocks > 2:
        engine.step()
    scored = engine.add_request(None, SCORED, SCORE)
    assert engine.scheduler.num_preemptions > 0
    finished = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
    out = finished.pop(scored)
    assert _entries(out) == _entries(want)
    assert out.outputs[0].token_ids == want.outputs[0].token_ids
    assert sorted(finished) == sorted(busy)       # the preempted ones recomputed, with their own tokens
    assert all(o.outputs[0].token_ids == busy_tokens for o in finished.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_make_room_preempts_the_newest_and_never_one_in_flight():
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    sched = Scheduler(config, BlockManager(6, 4))
    seqs = [Sequence(r, 0, list(range(i * 100, i * 100 + 8)), SamplingParams()) for i, r in enumerate("abc")]
    for s in seqs:
        sched.add(s)
    sched.schedule()                                  # 2 blocks each: the pool is full
    a, b, c = seqs
    b.in_flight = True
    assert sched.make_room(2) and c.status == SeqStatus.WAITING and not c.block_table
    assert not sched.make_room(6)                     # a goes too; b is in flight
    assert a.status == SeqStatus.WAITING and b.status == SeqStatus.RUNNING and b.block_table
    assert sched.block_manager.num_free_blocks == 4 and sched.num_preemptions == 2


def _close(got, want):
    """Entries equal up to float summation order (ranks, and logprobs within 1e-4)."""
    assert len(got) == len(want) and got[0] is None and want[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert sorted(g) == sorted(w)
        assert [g[t].rank for t in sorted(g)] == [w[t].rank for t in sorted(w)]
        assert [g[t].logprob for t in sorted(g)] == pytest.approx([w[t].logprob for t in sorted(w)], abs=1e-4)


def test_a_prompt_longer_than_a_step_is_scored_in_chunks():
    """Chunks of --max-num-batched-tokens (6: across block boundaries of 4), each reading the
    KV of the ones before, give the one-step logits and prompt logprobs (lm-eval's long
    contexts were refused); the blocks are freed, and a prompt past --max-model-len is refused
    naming it."""
    prompt = " ".join([SCORED] * 3)
    whole = LLM(block_size=4, max_model_len=64)
    chunked = LLM(block_size=4, max_num_batched_tokens=6, max_model_len=64)
    want, got = whole.generate(prompt, SCORE)[0], chunked.generate(prompt, SCORE)[0]
    assert len(got.prompt_token_ids) > 3 * 6
    _close(got.prompt_logprobs, want.prompt_logprobs)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    torch.testing.assert_close(chunked.prompt_logits([prompt])[0], whole.prompt_logits([prompt])[0],
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="longer than --max-model-len 64"):
        chunked.prompt_logits([list(range(1, 80))])
    for llm in (whole, chunked):
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
        assert not llm.engine.has_unfinished_requests()
