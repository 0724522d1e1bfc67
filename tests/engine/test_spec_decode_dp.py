"""Speculative decoding with DP attention x expert parallel (one engine core per DP rank,
spawned, gloo): the cores' MoE layers exchange tokens in the verify step and in each MTP
forward, so every core runs the module k times a step (dummy forwards where it drafts less
or idles). Greedy output with mtp k = 2 at DP2 x EP2 equals plain decoding in one process
through chunked prefill, preemption (a small pool) and prefix-cache hits; aborts in the
middle of speculation give every block back."""
from __future__ import annotations

from deepserve import LLM, SamplingParams
from tests.engine.test_spec_decode_mtp import PROMPTS, plain_outputs, r1_with_mtp  # noqa: F401 (fixtures)


def _per_rank(engine, key):
    return [g[key] for g in engine._gauges]


def test_dp2_ep2_greedy_with_mtp_equals_plain(r1_with_mtp, plain_outputs, monkeypatch):  # noqa: F811
    # the start-up warm-up as on a GPU: both cores run its steps together (their MoE layers meet)
    monkeypatch.setenv("DEEPSERVE_WARM_UP", "1")
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24)
    # 8-token steps chunk the 15-token prompt; 12 blocks of 4 per DP rank cannot hold the two
    # sequences DP rank 0 gets (8 + 10 blocks): one is preempted and recomputed
    with LLM(model=r1_with_mtp, dtype="float32", block_size=4, data_parallel_size=2, enable_expert_parallel=True,
             max_num_batched_tokens=8, num_gpu_blocks_override=12,
             speculative_config={"method": "mtp", "num_speculative_tokens": 2}) as llm:
        engine = llm.engine
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == plain_outputs
        g = engine.gauges()
        assert g["num_preemptions"] > 0 and g["spec_decode_num_drafts"] > 0
        assert all(d > 0 for d in _per_rank(engine, "spec_decode_num_drafts"))       # both cores drafted
        assert _per_rank(engine, "num_free_blocks") == _per_rank(engine, "num_blocks")
        # again: the prompts' full blocks come from the prefix cache
        hits = g["prefix_cache_hits"]
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == plain_outputs
        assert engine.gauges()["prefix_cache_hits"] > hits

        # aborted mid-speculation on both cores (the other core idles or drafts meanwhile)
        drafts = engine.gauges()["spec_decode_num_drafts"]
        ids = [engine.add_request(None, p, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
               for p in prompts[:2]]
        while engine.gauges()["spec_decode_num_drafts"] < drafts + 4:
            engine.step()
        for rid in ids:
            engine.abort_request(rid)
        assert not engine.has_unfinished_requests()
        # one short request per core afterwards: their last outputs carry the cores' pools
        llm.generate(prompts[1:3], SamplingParams(temperature=0, max_tokens=3))
        assert _per_rank(engine, "num_free_blocks") == _per_rank(engine, "num_blocks")


def test_dp2_ep2_mtp_to_the_context_end(r1_with_mtp):  # noqa: F811
    """The vllm-ascend guide's layout (DP x EP, mtp k = 3) with a request that runs to the end of
    a context as long as the model's positions: the drafts past it are dropped on the core that
    makes them, the other core's dummy MTP forwards meet them, and the output is the plain one."""
    kw = dict(dtype="float32", block_size=4, max_model_len=64, hf_overrides={"max_position_embeddings": 64})
    params = SamplingParams(temperature=0, max_tokens=64 - len(PROMPTS[0]), ignore_eos=True)
    plain = LLM(model=r1_with_mtp, **kw).generate([{"prompt_token_ids": PROMPTS[0]}], params)[0].outputs[0]
    with LLM(model=r1_with_mtp, data_parallel_size=2, enable_expert_parallel=True,
             speculative_config={"method": "mtp", "num_speculative_tokens": 3}, **kw) as llm:
        out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params)[0].outputs[0]
        assert (out.token_ids, out.finish_reason) == (plain.token_ids, "length")
        assert _per_rank(llm.engine, "num_free_blocks") == _per_rank(llm.engine, "num_blocks")
