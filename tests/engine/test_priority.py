"""--scheduling-policy priority: with one sequence per step, requests finish in priority order
(lower first, then arrival); fcfs keeps arrival order."""
from __future__ import annotations

import pytest

from deepserve.config import EngineArgs
from deepserve.engine.llm_engine import LLMEngine
from deepserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("policy,expected", [("priority", ["c", "a", "b", "d"]), ("fcfs", ["a", "b", "c", "d"])])
def test_finish_order_follows_the_policy(policy, expected):
    engine = LLMEngine(EngineArgs(max_num_seqs=1, num_gpu_blocks_override=64, scheduling_policy=policy))
    for rid, priority in (("a", 0), ("b", 5), ("c", -1), ("d", 5)):
        engine.add_request(rid, "Once upon a time", SamplingParams(max_tokens=3, temperature=0, priority=priority))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == expected


def test_unknown_policy():
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineArgs(scheduling_policy="lifo")


def test_preemption_takes_the_lowest_priority_and_outputs_stay_exact():
    """A pool too small for all four: the scheduler preempts (the lowest priority first) and
    recomputes; greedy texts equal those of each request run alone."""
    prompts = {"a": ("Once upon a time", 3), "b": ("One day, a little", -2), "c": ("The cat", 1),
               "d": ("Lily and Ben", 0)}
    params = lambda p: SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, priority=p)  # noqa: E731

    def run(engine: LLMEngine) -> dict:
        for rid, (text, p) in prompts.items():
            engine.add_request(rid, text, params(p))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].text for o in engine.step() if o.finished})
        return done
    alone = run(LLMEngine(EngineArgs(max_num_seqs=1, num_gpu_blocks_override=64)))   # one at a time
    engine = LLMEngine(EngineArgs(max_num_seqs=4, num_gpu_blocks_override=5, block_size=16,
                                  scheduling_policy="priority"))
    assert run(engine) == alone
    assert engine.scheduler.num_preemptions > 0
