"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a token budget (`max_num_batched_tokens`) and a sequence budget
(`max_num_seqs`). Running sequences go first, each getting its next token (decode) or its
next prompt chunk; then waiting sequences are admitted, their cached prefix blocks reused.
When the pool runs out of blocks the most recently admitted running sequence is preempted:
its blocks are freed and it goes back to the front of the queue to be recomputed later
(its generated tokens are kept and recomputed as prompt).

With pipeline micro-batches (engine/micro_batches.py) a sequence in a batch still on its way
through the stages (`Sequence.in_flight`) is neither scheduled nor preempted, and
`schedule(max_seqs=...)` caps a micro-batch's sequences so that the running ones spread over
the micro-batches.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from deepserve.config import SchedulerConfig
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.sequence import Sequence, SeqStatus


# vLLM's buckets of vllm:iteration_tokens_total (tokens an engine step computes)
STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class StepTokenCounts:
    """A histogram of the tokens each scheduled step computes, kept as plain counts (one per
    bucket of STEP_TOKEN_BUCKETS, then +Inf) so that DP ranks' gauges sum into one."""

    def __init__(self):
        self.counts = [0] * (len(STEP_TOKEN_BUCKETS) + 1)
        self.total = 0

    def observe(self, tokens: int) -> None:
        i = next((i for i, b in enumerate(STEP_TOKEN_BUCKETS) if tokens <= b), len(STEP_TOKEN_BUCKETS))
        self.counts[i] += 1
        self.total += tokens

    def gauges(self) -> dict:
        """step_tokens_le_{bucket} (not cumulative; le_inf the rest) and step_tokens_sum."""
        keys = [f"step_tokens_le_{b}" for b in STEP_TOKEN_BUCKETS] + ["step_tokens_le_inf"]
        return {**dict(zip(keys, self.counts)), "step_tokens_sum": self.total}


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]          # decodes first, then prefill chunks
    num_new_tokens: list[int]     # tokens each sequence computes this step
    num_decodes: int

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def seq_lens(self) -> list[int]:
        """Each sequence's length once this step's tokens are computed."""
        return [s.num_computed_tokens + n for s, n in zip(self.seqs, self.num_new_tokens)]

    def sampling_seqs(self) -> list[Sequence]:
        """The sequences whose step reaches their last token, so they sample one (before the
        step: num_computed_tokens not yet advanced)."""
        return [s for s, n in zip(self.seqs, self.num_new_tokens) if s.num_computed_tokens + n == s.num_tokens]

    def without_finished(self) -> "ScheduledBatch":
        """This batch less the sequences that finished after it was scheduled."""
        live = [(s, n) for s, n in zip(self.seqs, self.num_new_tokens) if not s.is_finished]
        return ScheduledBatch([s for s, _ in live], [n for _, n in live], sum(1 for _, n in live if n == 1))


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.step_tokens = StepTokenCounts()

    def add(self, seq: Sequence) -> None:
        if self.config.policy == "priority":
            self._insert_by_priority(seq)
        else:
            self.waiting.append(seq)

    @staticmethod
    def _priority_key(seq: Sequence) -> tuple[int, int]:
        return seq.params.priority, seq.seq_id   # lower first, then arrival

    def _insert_by_priority(self, seq: Sequence) -> None:
        key = self._priority_key(seq)
        at = next((i for i, s in enumerate(self.waiting) if self._priority_key(s) > key), len(self.waiting))
        self.waiting.insert(at, seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.policy == "priority":
            self._insert_by_priority(seq)
        else:
            self.waiting.appendleft(seq)

    def _victim(self, first: int) -> Sequence:
        """The running sequence to preempt, from index `first` on (those before it are
        scheduled this step) and never one in flight: the lowest priority, or the most
        recently admitted."""
        candidates = [s for s in self.running[first:] if not s.in_flight]
        if self.config.policy == "priority":
            return max(candidates, key=self._priority_key)
        return candidates[-1]

    def make_room(self, num_blocks: int) -> bool:
        """Preempt running sequences, as a step short of blocks does (`_victim`: never one in
        flight), until `num_blocks` blocks are free (work outside the schedule that needs the
        pool, such as scoring a prompt, then waits on no one); whether they are."""
        while self.block_manager.num_free_blocks < num_blocks:
            if all(s.in_flight for s in self.running):
                return False
            victim = self._victim(0)
            self.running.remove(victim)
            self._preempt(victim)
        return True

    def schedule(self, max_seqs: Optional[int] = None) -> ScheduledBatch:
        """The next step's batch; `max_seqs`: at most this many sequences (a pipeline
        micro-batch's share)."""
        budget = self.config.max_num_batched_tokens
        max_seqs = self.config.max_num_seqs if max_seqs is None else max_seqs
        chosen: list[tuple[Sequence, int]] = []
        preempted = False
        bm = self.block_manager

        # 1. running sequences: next decode token or next prefill chunk
        i = 0
        while i < len(self.running) and budget > 0 and len(chosen) < max_seqs:
            seq = self.running[i]
            if seq.in_flight:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while bm.blocks_needed(seq, seq.num_computed_tokens + n) > bm.num_free_blocks:
                victim = self._victim(i)
                self.running.remove(victim)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.append_slots(seq, seq.num_computed_tokens + n)
                chosen.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted: nothing later can fit either

        # 2. waiting sequences, unless this step already had to preempt
        while (self.waiting and budget > 0 and not preempted and len(chosen) < max_seqs
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            hits = bm.match_prefix(seq)
            remaining = seq.num_tokens - len(hits) * bm.block_size
            n = min(remaining, budget)
            if n < remaining and not self.config.enable_chunked_prefill:
                break
            if not bm.can_allocate(seq, seq.num_tokens - remaining + n, hits):
                break
            self.waiting.popleft()
            bm.allocate(seq, seq.num_tokens - remaining + n, hits)
            seq.status = SeqStatus.RUNNING
            if seq.first_scheduled_time is None:   # the end of its queue time (vllm:request_queue_time_seconds)
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n

        # one-token rows (decodes) first: attention kernels and MLA split the batch there
        chosen.sort(key=lambda c: c[1] != 1)
        num_decodes = sum(1 for _, n in chosen if n == 1)
        if chosen:
            self.step_tokens.observe(sum(n for _, n in chosen))
        return ScheduledBatch([s for s, _ in chosen], [n for _, n in chosen], num_decodes)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (finished or aborted) and free its blocks at once."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free_seq(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or reason
