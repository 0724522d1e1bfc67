"""Pipeline-parallel micro-batches in flight (vLLM's virtual engines, SGLang's PP micro-batching).

With P pipeline stages one batch at a time leaves P - 1 stages idle. Here the engine keeps up
to P micro-batches of disjoint sequences in flight: each `step` schedules a micro-batch from
the sequences not in flight, launches it (the driver runs the first stage and posts the
receive of its logits, engine/pipeline.py) and returns at once while fewer than P are in
flight; once P are (or nothing more can be scheduled) it waits for the oldest, samples it
and hands its tokens to the engine. So stage s works on micro-batch k while stage s + 1
works on k - 1.

A micro-batch takes at most ceil(min(live sequences, max_num_seqs) / P) sequences, so the
running ones spread over the P micro-batches instead of all riding in the first. A sequence
in flight is not scheduled again (its next input is the token still to be sampled) nor
preempted (its blocks are being written); an abort frees its blocks at once: a later
micro-batch that reuses them runs after this one at every stage. The sampler sees each
sequence's full token history, so every sampling parameter works as in synchronous steps.

With DP x EP the engine cores step in rounds (engine/engine_core.py): every round each core
launches one micro-batch, a dummy when it has none, since the stages' MoE layers exchange
tokens between the DP ranks' k-th micro-batches; finishing one is local to a core (it only
waits for logits already on their way).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

from deepserve.engine.driver_runner import MicroBatch
from deepserve.engine.scheduler import ScheduledBatch


class MicroBatchPipeline:
    def __init__(self, depth: int, max_num_seqs: int):
        self.depth = depth
        self.max_num_seqs = max_num_seqs
        self.in_flight: deque[MicroBatch] = deque()
        self.most_in_flight = 0   # the most micro-batches that were in flight at once

    def __bool__(self) -> bool:
        """Whether a micro-batch of sequences (not a dummy) is in flight."""
        return any(mb.batch is not None for mb in self.in_flight)

    def full(self) -> bool:
        return len(self.in_flight) >= self.depth

    def share(self, scheduler) -> int:
        """How many sequences one micro-batch takes now."""
        live = len(scheduler.running) + len(scheduler.waiting)
        return max(1, math.ceil(min(live, self.max_num_seqs) / self.depth))

    def schedule(self, engine) -> Optional[ScheduledBatch]:
        """The next micro-batch (empty: nothing to launch), None while the pipeline is full."""
        if self.full():
            return None
        return engine.scheduler.schedule(max_seqs=self.share(engine.scheduler))

    def launch(self, engine, batch: Optional[ScheduledBatch]) -> list:
        """Start `batch` through the stages; without one a dummy micro-batch (DP x EP: every
        DP rank launches one per round, as their MoE layers meet in each). Returns no outputs."""
        if batch and engine.ops_profiler is not None:   # --ops-profile windows count these steps
            engine.ops_profiler.tick(engine.stats["steps"])
        with engine.profile_step(batch):   # --profiler-config's per-step range
            self.in_flight.append(engine.runner.launch_micro_batch(batch or None))
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        if batch:
            engine.stats["steps"] += 1
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                seq.num_computed_tokens += n
                seq.in_flight = True
                engine.block_manager.register_full_blocks(seq)
        return []

    def finish_oldest(self, engine) -> list:
        """Wait for the oldest micro-batch's logits, sample; its RequestOutputs."""
        mb = self.in_flight.popleft()
        seqs, sampled = engine.runner.finish_micro_batch(mb)
        if mb.batch is None:
            return []
        for seq in mb.batch.seqs:
            seq.in_flight = False
        return engine._postprocess(seqs, sampled)

    def step(self, engine) -> list:
        """Launch the next micro-batch if there is one and room for it; when the pipeline is
        full or nothing more can start, finish the oldest: its RequestOutputs."""
        batch = self.schedule(engine)
        if batch:
            self.launch(engine, batch)
            if not self.full():
                return []
        return self.finish_oldest(engine) if self.in_flight else []
