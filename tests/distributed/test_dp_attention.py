"""Data-parallel attention with expert parallel (DP x EP) on CPU (gloo, spawned processes).

Each DP rank is an engine core of its own (scheduler, KV pool, sampler); MoE layers exchange
tokens across the DP group and an idle core runs dummy steps. Greedy outputs (and seeded
samples, and prompt logits) must equal one process's, with chunked prefill, a DP rank left
idle and every block free afterwards; what a rank sends per decode step is the same at DP2
and DP4. The rank layout is checked without processes. Plain DP=2 on the dense Llama is in
test_parallel_engine.py's layout table."""
import os
import signal
import time

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.distributed.parallel_state import rank_layout
from deepserve.engine.dp_engine import DataParallelEngine
from deepserve.engine.llm_engine import RequestError
from tests.distributed.test_parallel_engine import tiny_deepseek

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
# mixed lengths; 16-token steps make the long prompts prefill in chunks (steps without logits)
MIXED = [{"prompt_token_ids": list(range(3, 40))}, {"prompt_token_ids": [1]},
         {"prompt_token_ids": [1, 40, 41, 26, 7, 9, 11]}, {"prompt_token_ids": list(range(50, 72))},
         {"prompt_token_ids": [5, 6]}]
SINGLE = [{"prompt_token_ids": [1, 40, 41, 26, 7, 9, 11, 13]}]
SCORED = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)
ENGINE = dict(block_size=4, max_model_len=128, max_num_batched_tokens=16)


def _tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def _logprobs(out):
    return [e and e[t].logprob for e, t in zip(out.prompt_logprobs, out.prompt_token_ids)]


def _per_rank(engine, key):
    return [g[key] for g in engine._gauges]


def _all_free(engine):
    return _per_rank(engine, "num_free_blocks") == _per_rank(engine, "num_blocks")


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return str(tiny_deepseek(tmp_path_factory.mktemp("dsv3-dp")))


@pytest.fixture(scope="module")
def reference(deepseek):
    """One process: the outputs every layout must reproduce."""
    llm = LLM(deepseek, **ENGINE)
    try:
        return {"mixed": _tokens(llm, MIXED), "single": _tokens(llm, SINGLE),
                "seeded": _tokens(llm, MIXED[:3], SEEDED),
                "logits": llm.engine.prompt_logits(MIXED[2]), "long_logits": llm.engine.prompt_logits(MIXED[0]),
                "scored": llm.generate(MIXED[0], SCORED)[0]}
    finally:
        llm.shutdown()


@pytest.fixture(scope="class", params=["allgather_reducescatter", "alltoall"])
def dp_ep(deepseek, reference, request):
    # one process group per process: this engine is shut down before the next one starts
    llm = LLM(deepseek, data_parallel_size=2, enable_expert_parallel=True, all2all_backend=request.param,
              **ENGINE)
    yield llm
    llm.shutdown()


class TestDataParallelExpertParallel:
    """DP=2 x EP=2 (tp=1) on the tiny DeepSeek-V3: one engine per MoE exchange backend."""

    def test_dp_ep_mixed_batch_matches_single_process(self, dp_ep, reference):
        engine = dp_ep.engine
        assert isinstance(engine, DataParallelEngine) and engine.dp_size == 2
        before = _per_rank(engine, "prefix_cache_queries")
        assert _tokens(dp_ep, MIXED) == reference["mixed"]
        # both DP ranks served requests, and every block came back
        assert all(q > b for q, b in zip(_per_rank(engine, "prefix_cache_queries"), before))
        assert _all_free(engine) and not engine.has_unfinished_requests()

    def test_dp_ep_idle_rank_runs_dummy_batch(self, dp_ep, reference):
        engine = dp_ep.engine
        before = _per_rank(engine, "prefix_cache_queries")
        assert _tokens(dp_ep, SINGLE) == reference["single"]
        # the request went to DP rank 0; rank 1 only ran dummy batches (its pool untouched)
        assert [q - b for q, b in zip(_per_rank(engine, "prefix_cache_queries"), before)] == \
            [len(SINGLE[0]["prompt_token_ids"]), 0]
        assert _all_free(engine)

    def test_dp_ep_seeded_sampling_and_prompt_logits(self, dp_ep, reference):
        assert _tokens(dp_ep, MIXED[:3], SEEDED) == reference["seeded"]
        logits = dp_ep.engine.prompt_logits(MIXED[2])
        assert logits.shape == reference["logits"].shape
        torch.testing.assert_close(logits, reference["logits"], rtol=1e-4, atol=1e-4)
        # longer than a step: a chunk per sync round, the other cores running dummy steps
        torch.testing.assert_close(dp_ep.engine.prompt_logits(MIXED[0]), reference["long_logits"],
                                   rtol=1e-4, atol=1e-4)
        scored = dp_ep.generate(MIXED[:2], [SCORED, GREEDY])
        assert [o.outputs[0].token_ids for o in scored] == [reference["scored"].outputs[0].token_ids,
                                                           reference["mixed"][1][:GREEDY.max_tokens]]
        assert _logprobs(scored[0])[0] is None
        assert _logprobs(scored[0])[1:] == pytest.approx(_logprobs(reference["scored"])[1:], abs=1e-4)
        # a prompt refused before its forward: the other core's round still completes
        with pytest.raises(RequestError, match="longer than --max-model-len 128"):
            dp_ep.engine.prompt_logits({"prompt_token_ids": list(range(3, 140))})
        assert _tokens(dp_ep, SINGLE) == reference["single"]
        assert _all_free(dp_ep.engine)


def _decode_step_bytes(llm, dp_size):
    """Bytes each DP rank sent for its last step, one 6-token request per rank, all finishing
    on the same decode step."""
    engine = llm.engine
    for r in range(dp_size):
        engine.add_request(f"r{r}", {"prompt_token_ids": [1, 40 + r, 41, 26, 7, 9]}, GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    return engine.step_bytes


def test_rank_traffic_per_decode_step_does_not_grow_with_dp(deepseek, monkeypatch):
    monkeypatch.setenv("DEEPSERVE_COUNT_STEP_BYTES", "1")
    sizes = {}
    for dp in (2, 4):
        with LLM(deepseek, data_parallel_size=dp, enable_expert_parallel=True, **ENGINE) as llm:
            sizes[dp] = _decode_step_bytes(llm, dp)
    assert len(set(sizes[2] + sizes[4])) == 1, sizes
    # one request's output and the gauges: no other rank's inputs or logits
    assert sizes[2][0] < 2500


@pytest.mark.parametrize("all2all", ["allgather_reducescatter", "alltoall"])
def test_tp2_x_dp2_with_ep_matches_single_process(deepseek, reference, all2all):
    with LLM(deepseek, tensor_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True,
             all2all_backend=all2all, **ENGINE) as llm:
        assert _tokens(llm, MIXED[:3]) == reference["mixed"][:3]
        assert _all_free(llm.engine)


def test_dead_dp_rank_is_reported(monkeypatch):
    from tests.conftest import DEMO_MODEL
    monkeypatch.setenv("DEEPSERVE_DIST_TIMEOUT", "20")
    llm = LLM(str(DEMO_MODEL), data_parallel_size=2, **ENGINE)
    try:
        os.kill(llm.engine.executor.procs[1].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) on host .* exited with code -9"):
            for _ in range(50):
                llm.generate(MIXED[:2], GREEDY)
                time.sleep(0.2)
        assert time.monotonic() - start < 30
    finally:
        llm.shutdown()


def test_dp2_x_pp2_with_ep_matches_single_process(deepseek, reference):
    """Each DP rank a 2-stage pipeline; each stage's MoE layers exchange tokens with the same
    stage of the other DP rank (experts over the 2 ranks of a stage)."""
    with LLM(deepseek, data_parallel_size=2, pipeline_parallel_size=2, enable_expert_parallel=True,
             **ENGINE) as llm:
        assert _tokens(llm, MIXED) == reference["mixed"]
        assert _tokens(llm, SINGLE) == reference["single"]     # DP rank 1 runs dummy steps
        assert _all_free(llm.engine)


# ---------------------------------------------------------------- no processes
def test_rank_layout():
    # tp=2, pp=2: rank = dp*4 + pp*2 + tp
    assert [rank_layout(r, 2, 2) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    assert [rank_layout(r, 1, 1) for r in range(3)] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
