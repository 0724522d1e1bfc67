"""Scheduler on fake sequences (no model): token budgets, chunked prefill, decode-first order,
preemption by recompute, prefix reuse on admission, abort freeing blocks."""
from __future__ import annotations

from deepserve.config import SchedulerConfig
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.scheduler import Scheduler
from deepserve.engine.sequence import Sequence, SeqStatus

BS = 4


def make(num_blocks=32, max_tokens=16, max_seqs=8, chunked=True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max_tokens,
                             max_model_len=256, enable_chunked_prefill=chunked)
    return Scheduler(config, BlockManager(num_blocks, BS))


def seq(n_tokens, rid, start=0) -> Sequence:
    return Sequence(rid, 0, list(range(start, start + n_tokens)), SamplingParams())


def step(sched: Scheduler, next_token=1000):
    """What the engine does after the model ran: advance the computed counts, publish full
    blocks, append a sampled token to every sequence that reached its end."""
    batch = sched.schedule()
    plan = [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]
    sampling = batch.sampling_seqs()
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        sched.block_manager.register_full_blocks(s)
    for s in sampling:
        s.token_ids.append(next_token)
    return plan


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    sched = make(max_tokens=8)
    a = seq(20, "a")
    sched.add(a)
    assert step(sched) == [("a", 8)]
    assert step(sched) == [("a", 8)]
    assert a.num_output_tokens == 0
    assert step(sched) == [("a", 4)]          # the last chunk samples a token
    assert a.num_output_tokens == 1
    assert step(sched) == [("a", 1)]          # then decodes
    assert len(a.block_table) == -(-a.num_tokens // BS)


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_step():
    sched = make(max_tokens=8, chunked=False)
    sched.add(seq(20, "a"))
    assert step(sched) == []
    sched = make(max_tokens=8, chunked=False)
    sched.add(seq(6, "a"))
    sched.add(seq(6, "b", start=100))         # does not fit beside a's 6 tokens
    assert step(sched) == [("a", 6)]
    assert step(sched) == [("a", 1), ("b", 6)]


def test_decodes_come_first_and_budget_is_shared():
    sched = make(max_tokens=10)
    sched.add(seq(4, "a"))
    step(sched)                               # a prefilled: now decodes
    sched.add(seq(12, "b", start=100))
    assert step(sched) == [("a", 1), ("b", 9)]
    assert step(sched) == [("a", 1), ("b", 3)]


def test_max_num_seqs_bounds_the_running_set():
    sched = make(max_seqs=2)
    for r in "abc":
        sched.add(seq(3, r))
    assert [r for r, _ in step(sched)] == ["a", "b"]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_preemption_frees_the_newest_and_recomputes_it_later():
    sched = make(num_blocks=4, max_tokens=64)
    a, b = seq(8, "a"), seq(8, "b", start=100)   # 2 blocks each: the pool is full
    sched.add(a)
    sched.add(b)
    assert step(sched) == [("a", 8), ("b", 8)]
    assert sched.block_manager.num_free_blocks == 0
    # a's decode needs a third block: b (admitted last) is preempted, its blocks freed
    assert step(sched) == [("a", 1)]
    assert b.status == SeqStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1 and sched.waiting[0] is b
    assert b.num_tokens == 9                   # its sampled token is kept and recomputed as prompt
    sched.finish(a, "stop")
    # a's third block was b's freed tail block (evicted first); b's first block is still cached
    assert step(sched) == [("b", 9 - BS)]
    assert b.num_cached_tokens == 0            # its usage keeps its first admission's hits (vLLM's)
    assert b.status == SeqStatus.RUNNING and b.num_output_tokens == 2


def test_admission_reuses_cached_prefix_blocks():
    sched = make(max_tokens=64)
    a = seq(10, "a")
    sched.add(a)
    step(sched)
    a_blocks = list(a.block_table)
    sched.finish(a, "stop")                   # freed, but its two full blocks stay cached
    b = seq(10, "b")                          # the same prompt
    sched.add(b)
    assert step(sched) == [("b", 2)]          # only the tokens past the cached 8 are computed
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a_blocks[:2]


def test_abort_frees_blocks_at_once_in_any_state():
    sched = make(num_blocks=8, max_tokens=8)
    running, waiting = seq(12, "run"), seq(4, "wait", start=50)
    sched.add(running)
    sched.add(waiting)
    step(sched)                               # running is mid-prefill; waiting has no room in the budget
    assert running.block_table and waiting.status == SeqStatus.WAITING
    sched.finish(running, "abort")
    sched.finish(waiting, "abort")
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished()
    assert running.finish_reason == "abort" and running.is_finished and waiting.is_finished
    assert step(sched) == []


def _launch(sched: Scheduler, max_seqs=None):
    """What the micro-batch pipeline does at launch: advance the computed counts and mark the
    batch's sequences in flight (their tokens come back later)."""
    batch = sched.schedule(max_seqs=max_seqs)
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        s.in_flight = True
    return batch


def test_sequences_in_flight_are_not_scheduled_again():
    sched = make(max_tokens=64)
    seqs = [seq(3, r, start=10 * i) for i, r in enumerate("abcd")]
    for s in seqs:
        sched.add(s)
    first = _launch(sched, max_seqs=2)
    second = _launch(sched, max_seqs=2)
    assert [s.request_id for s in first.seqs] == ["a", "b"]
    assert [s.request_id for s in second.seqs] == ["c", "d"]
    assert not _launch(sched, max_seqs=2)                  # everything is in flight
    for s in first.seqs:                                    # the first micro-batch's tokens come back
        s.token_ids.append(1000)
        s.in_flight = False
    third = sched.schedule(max_seqs=2)
    assert [(s.request_id, n) for s, n in zip(third.seqs, third.num_new_tokens)] == [("a", 1), ("b", 1)]


def test_preemption_never_takes_a_sequence_in_flight():
    sched = make(num_blocks=4, max_tokens=64)
    a, b = seq(8, "a"), seq(8, "b", start=100)              # 2 blocks each: the pool is full
    sched.add(a)
    sched.add(b)
    _launch(sched, max_seqs=1)                              # a
    _launch(sched, max_seqs=1)                              # b, admitted last, still in flight
    a.token_ids.append(1000)
    a.in_flight = False
    # a's decode needs a third block; the most recently admitted (b) is in flight, so a
    # preempts itself and nothing is scheduled
    assert not sched.schedule()
    assert a.status == SeqStatus.WAITING and a.block_table == [] and b.status == SeqStatus.RUNNING
    assert b.block_table and sched.num_preemptions == 1
