"""--ops-profile under pipeline parallel: every micro-batch launched with sequences is a step
the profiler's windows count (MicroBatchPipeline.launch ticks it), dummy rounds are not."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

from deepserve.engine.micro_batches import MicroBatchPipeline


class _Profiler:
    def __init__(self):
        self.ticks = []

    def tick(self, step):
        self.ticks.append(step)


def _engine(profiler):
    runner = SimpleNamespace(launch_micro_batch=lambda batch: SimpleNamespace(batch=batch))
    return SimpleNamespace(runner=runner, ops_profiler=profiler, stats={"steps": 0},
                           block_manager=SimpleNamespace(register_full_blocks=lambda seq: None),
                           profile_step=lambda batch: contextlib.nullcontext())   # no --profiler-config


def test_launching_micro_batches_ticks_the_ops_profiler():
    profiler = _Profiler()
    engine = _engine(profiler)
    pipe = MicroBatchPipeline(depth=2, max_num_seqs=4)
    seq = SimpleNamespace(num_computed_tokens=0, in_flight=False)
    pipe.launch(engine, SimpleNamespace(seqs=[seq], num_new_tokens=[3]))
    pipe.launch(engine, None)                                   # a DP round's dummy: no step
    pipe.launch(engine, SimpleNamespace(seqs=[seq], num_new_tokens=[1]))
    assert profiler.ticks == [0, 1] and engine.stats["steps"] == 2 and seq.in_flight
    pipe.launch(_engine(None), SimpleNamespace(seqs=[seq], num_new_tokens=[1]))   # profiling off
