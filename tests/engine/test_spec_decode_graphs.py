"""Verify steps as CUDA-graph decode rows (engine/spec_decode.as_decode_rows,
engine/cuda_graphs.py): a verify step of decodes (each sequence's last token and its drafts)
run as one-token rows gives the logits of the ordinary verify forward, on the Llama attention
path (stories260k) and on MLA's absorbed decode path against its prefill path (tiny
DeepSeek-V3); engines forced to verify that way (as they do where graphs are captured) give
plain decoding's greedy tokens with n-gram and MTP drafts; the graph sizes count tokens, up to
max_num_seqs * (k + 1). The capture itself needs CUDA: the `gpu` tests replay verify steps."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.config import SpeculativeConfig
from deepserve.engine.cuda_graphs import CudaGraphRunner
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import as_decode_rows, verify_inputs
from deepserve.engine.step_inputs import StepMessage
from deepserve.ops import OpTable
from tests.engine.eager_graphs import install
from tests.engine.test_spec_decode_mtp import PROMPTS, plain_outputs, r1_with_mtp  # noqa: F401 (fixtures)

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
STORIES = ["Tom and Lily went to the park. Tom and Lily", "Once upon a time", "The dog saw a big red ball. The dog"]


def verify_logits_both_ways(engine, prompts: list[list[int]], drafts: list[list[int]]):
    """Prefill each prompt but its last token, then verify the last token + drafts: logits of
    the ordinary flat forward and of the decode-row forward (the same KV slots written)."""
    runner, bm = engine.runner, engine.block_manager
    seqs = [Sequence(f"v{i}", 0, p, SamplingParams(temperature=0)) for i, p in enumerate(prompts)]
    try:
        for s in seqs:
            bm.allocate(s, s.num_tokens - 1)
        inputs, _ = verify_inputs(seqs, [s.num_tokens - 1 for s in seqs], [[]] * len(seqs), bm.block_size)
        inputs.logits_rows = []
        runner.run_step(StepMessage(inputs))
        for s, d in zip(seqs, drafts):
            s.num_computed_tokens = s.num_tokens - 1
            bm.append_slots(s, s.num_tokens + len(d))
        inputs, _ = verify_inputs(seqs, [1] * len(seqs), drafts, bm.block_size)
        assert len(inputs.logits_rows) == inputs.num_tokens and not inputs.decode_only
        want = runner.run_step(StepMessage(inputs)).float()
        rows = as_decode_rows(inputs)
        assert rows.decode_only and rows.num_tokens == inputs.num_tokens
        got = runner.run_step(StepMessage(rows)).float()
    finally:
        for s in seqs:
            bm.free_seq(s)
    return want, got


def test_decode_rows_equal_the_verify_forward_llama():
    llm = LLM(block_size=4, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(t) for t in STORIES]
    want, got = verify_logits_both_ways(llm.engine, prompts, [[5, 9, 11], [], [7, 300]])
    assert want.shape[0] == 4 + 1 + 3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_rows_equal_the_verify_forward_mla(r1_with_mtp):  # noqa: F811
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4, enable_prefix_caching=False)
    want, got = verify_logits_both_ways(llm.engine, PROMPTS, [[3, 4], [9], [100, 101, 102]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _forced_decode_rows(llm, monkeypatch):
    """Verify as decode rows (as under CUDA graphs, replayed eagerly); record each forward's row
    layout."""
    install(llm, max_bs=1024)
    seen, real = [], llm.engine.runner.run_step
    monkeypatch.setattr(llm.engine.runner, "run_step",
                        lambda msg, *a, **k: (seen.append(msg.inputs.decode_only), real(msg, *a, **k))[1])
    return seen


def test_engine_ngram_verifying_as_decode_rows_equals_plain(monkeypatch):
    plain = LLM(block_size=4)
    prompts = STORIES + ["Lily had a cat. Lily had"]
    params = SamplingParams(temperature=0, max_tokens=40)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    spec = LLM(block_size=4, speculative_config=json.dumps(NGRAM), mixed_graph_tokens=0)   # (prompts flat)
    seen = _forced_decode_rows(spec, monkeypatch)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == want
    g = spec.engine.gauges()
    assert g["spec_decode_num_accepted_tokens"] > 0 and g["steps"] < g["generation_tokens"]
    assert seen.count(True) > 5 and seen[0] is False                     # decode rows after the prefill


def test_engine_mtp_verifying_as_decode_rows_equals_plain(r1_with_mtp, plain_outputs, monkeypatch):  # noqa: F811
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    seen = _forced_decode_rows(llm, monkeypatch)
    got = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=24))
    assert [o.outputs[0].token_ids for o in got] == plain_outputs
    assert seen.count(True) > 5
    assert llm.engine.gauges()["num_free_blocks"] == llm.engine.gauges()["num_blocks"]


@pytest.mark.parametrize("k,sizes", [(None, [1, 2, 4]), (1, [1, 2, 4, 8]), (3, [1, 2, 4, 8, 16])])
def test_graph_sizes_count_verify_tokens(k, sizes):
    """max_num_seqs 4: decode graphs up to 4 rows; with k drafts up to 4 * (k + 1) tokens."""
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=k) if k else None
    runner = SimpleNamespace(config=SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=4, max_model_len=64),
                                                    speculative=spec, mixed_graph_tokens=0),
                             model=None, pctx=SimpleNamespace(moe_dp_exchange=False, dp_size=1),
                             ops=OpTable("torch"))
    graphs = CudaGraphRunner(runner, [1, 2, 4, 8, 16, 32, 64])   # the torch backend: sizes, no capture
    assert graphs.sizes == sizes and not graphs.enabled


# --------------------------------------------------------------------------- on a CUDA device
def _replays(llm, monkeypatch) -> list[int]:
    """Rows of every graph replay (more rows than sequences: drafts among them)."""
    rows, graphs = [], llm.engine.runner.graphs
    real = graphs.run
    monkeypatch.setattr(graphs, "run", lambda input_ids, *a, **k: (rows.append(input_ids.shape[0]),
                                                                   real(input_ids, *a, **k))[1])
    return rows


@pytest.mark.gpu
def test_gpu_ngram_verify_steps_replay_graphs(monkeypatch):
    """stories260k on CUDA (Triton ops, graphs captured up to max_num_seqs * 4 tokens): verify
    steps replay decode graphs and greedy tokens equal plain eager decoding."""
    prompts = STORIES + ["Lily had a cat. Lily had"]
    params = SamplingParams(temperature=0, max_tokens=48)
    with LLM(dtype="float32", block_size=16, enforce_eager=True) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    with LLM(dtype="float32", block_size=16, max_num_seqs=8, speculative_config=json.dumps(NGRAM),
             mixed_graph_tokens=0) as llm:
        graphs = llm.engine.runner.graphs
        assert graphs is not None and graphs.enabled and graphs.sizes[-1] == 32
        assert llm.engine.runner.mtp is None
        rows = _replays(llm, monkeypatch)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        assert max(rows) > len(prompts) and llm.engine.gauges()["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.gpu
def test_gpu_mtp_verify_steps_replay_graphs(r1_with_mtp, monkeypatch):  # noqa: F811
    """Tiny DeepSeek-V3 with its MTP layer on CUDA (fp32): verify steps replay decode graphs,
    the MTP step reads the graph's hidden states and replays graphs of its own, and greedy
    tokens equal plain decoding."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24)
    with LLM(model=r1_with_mtp, dtype="float32", block_size=16) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    with LLM(model=r1_with_mtp, dtype="float32", block_size=16, max_num_seqs=8,
             speculative_config={"method": "mtp", "num_speculative_tokens": 1}) as llm:
        rows = _replays(llm, monkeypatch)
        mtp_graphs = llm.engine.runner.mtp.graphs
        assert mtp_graphs is not None and mtp_graphs.enabled
        mtp_rows, real = [], mtp_graphs.run_mtp
        monkeypatch.setattr(mtp_graphs, "run_mtp", lambda ids, *a: (mtp_rows.append(ids.shape[0]), real(ids, *a))[1])
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        assert max(rows) > len(prompts) and mtp_rows
