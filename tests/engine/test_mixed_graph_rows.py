"""Small mixed steps as decode-graph rows (--mixed-graph-tokens; engine/cuda_graphs.fits_as_rows,
DriverRunner.host_inputs): a step of decodes beside prompt chunks, each prompt token run as a
one-token row over its sequence's positions up to its own, gives the logits of the ordinary
mixed forward on the Llama attention path (stories260k) and on MLA's absorbed decode path
against its prefill path (tiny DeepSeek-V3), with a chunk that continues a cached prefix among
them; an engine whose "graphs" run such rows (replayed eagerly here: capture needs CUDA) gives
plain decoding's greedy tokens; the size limits and the flag's defaults."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from deepserve import LLM, SamplingParams
from deepserve.config import EngineArgs
from deepserve.engine import driver_runner
from deepserve.engine.cuda_graphs import MIXED_ROWS_CONTEXT, decode_graph_sizes, fits_as_rows
from deepserve.engine.scheduler import ScheduledBatch
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import as_decode_rows
from deepserve.engine.step_inputs import StepInputs, StepMessage
from tests.models.test_deepseek import r1_style, save_deepseek

STORIES = ["Tom and Lily went to the park. Tom and Lily", "Once upon a time", "The dog saw a big red ball.",
           "Lily had a cat. Lily had a dog and a big red ball and a"]


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3_mixed_rows")
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), path)
    return str(path)


def mixed_logits_both_ways(engine, decoding: list[list[int]], prompts: list[list[int]], cached: int):
    """Prefill the `decoding` prompts but their last token and the first `cached` tokens of the
    last prompt; then one mixed step: those last tokens as decodes, the other prompts whole and
    the last one's remaining tokens as chunks. Logits of every row, the flat forward and the
    one-token-row forward (the same KV slots written)."""
    runner, bm = engine.runner, engine.block_manager
    greedy = SamplingParams(temperature=0)
    dec = [Sequence(f"d{i}", 0, p, greedy) for i, p in enumerate(decoding)]
    new = [Sequence(f"p{i}", 0, p, greedy) for i, p in enumerate(prompts)]
    seqs = dec + new
    try:
        first = [(s, s.num_tokens - 1) for s in dec] + [(new[-1], cached)]
        for s, n in first:
            bm.allocate(s, n)
        runner.run_step(StepMessage(StepInputs.from_batch(ScheduledBatch([s for s, _ in first], [n for _, n in first], 0),
                                                          bm.block_size)))
        for s, n in first:
            s.num_computed_tokens = n
            bm.append_slots(s, s.num_tokens)
        for s in new[:-1]:
            bm.allocate(s, s.num_tokens)
        inputs = StepInputs.from_batch(ScheduledBatch(seqs, [1] * len(dec) + [s.num_tokens - s.num_computed_tokens
                                                                             for s in new], len(dec)), bm.block_size)
        inputs.logits_rows = list(range(inputs.num_tokens))
        assert not inputs.decode_only
        want = runner.run_step(StepMessage(inputs)).float()
        rows = as_decode_rows(inputs)
        assert rows.decode_only and rows.num_tokens == inputs.num_tokens
        got = runner.run_step(StepMessage(rows)).float()
    finally:
        for s in seqs:
            bm.free_seq(s)
    return want, got


def test_mixed_rows_equal_the_mixed_forward_llama():
    llm = LLM(block_size=4, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    p = [tok.encode(t) for t in STORIES]
    want, got = mixed_logits_both_ways(llm.engine, p[:2], p[2:], cached=5)
    assert want.shape[0] == 2 + len(p[2]) + len(p[3]) - 5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_rows_equal_the_mixed_forward_mla(tiny_v3):
    llm = LLM(model=tiny_v3, dtype="float32", block_size=4, enable_prefix_caching=False)
    decoding = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 123]]
    prompts = [[200, 11, 54, 9, 1], [2, 3, 4, 5, 6, 7, 8, 9, 10, 31, 44, 45, 46]]
    want, got = mixed_logits_both_ways(llm.engine, decoding, prompts, cached=6)
    assert want.shape[0] == 2 + 5 + 7
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class EagerGraphs:
    """Stands in for CudaGraphRunner on the CPU: replays a decode-only batch by running the
    forward a captured graph holds (every row's logits, then the sampled rows')."""
    enabled = True

    def __init__(self, runner, max_bs: int):
        self.runner, self.max_bs = runner, max_bs
        self.max_len = runner.config.scheduler.max_model_len
        self.replayed: list[int] = []

    def can_run(self, meta) -> bool:
        return meta.num_decodes == meta.num_seqs and meta.max_query_len == 1 and meta.num_seqs <= self.max_bs

    def run(self, input_ids, positions, meta, bs: int = 0):
        self.replayed.append(input_ids.shape[0])
        hidden = self.runner.model(input_ids, positions, meta)
        return hidden, self.runner.model.compute_logits(hidden)[meta.logits_indices]


@pytest.mark.parametrize("mixed_tokens", [6, 256])
def test_engine_running_small_mixed_steps_as_rows_equals_plain(mixed_tokens, monkeypatch):
    """max_num_batched_tokens 8 with 4 sequences: most steps carry decodes beside a prompt
    chunk; those of at most `mixed_tokens` prompt tokens run as rows."""
    kw = dict(block_size=4, max_num_seqs=4, max_num_batched_tokens=8, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=20)
    want = [o.outputs[0].token_ids for o in LLM(**kw).generate(STORIES, params)]
    llm = LLM(**kw, mixed_graph_tokens=mixed_tokens)
    runner = llm.engine.runner
    assert runner.config.mixed_graph_tokens == mixed_tokens
    runner.graphs = EagerGraphs(runner, max_bs=12)
    converted = []
    real = driver_runner.as_decode_rows
    monkeypatch.setattr(driver_runner, "as_decode_rows", lambda inputs: (converted.append(
        (inputs.num_decodes, inputs.num_tokens)), real(inputs))[1])
    got = [o.outputs[0].token_ids for o in llm.generate(STORIES, params)]
    assert got == want
    assert any(d > 0 for d, _ in converted), converted               # decodes beside a prompt chunk
    assert all(t - d <= mixed_tokens and t <= 12 for d, t in converted)
    assert len(runner.graphs.replayed) > len(converted)               # plain decode steps too
    g = llm.engine.gauges()
    assert g["num_free_blocks"] == g["num_blocks"]


def _inputs(q_lens: list[int], seq_lens: list[int]) -> StepInputs:
    n = sum(q_lens)
    return StepInputs(ids=[0] * n, positions=np.zeros(n, dtype=np.int64), slots=np.zeros(n, dtype=np.int64),
                      q_lens=q_lens, seq_lens=seq_lens, tables=[[0]] * len(q_lens), logits_rows=[],
                      num_decodes=sum(1 for q in q_lens if q == 1))


def test_which_steps_run_as_rows():
    mixed = _inputs([1, 1, 3, 2], [10, 20, 3, 40])
    assert fits_as_rows(mixed, 5, 7, 64)
    assert not fits_as_rows(mixed, 0, 7, 64)          # off
    assert not fits_as_rows(mixed, 4, 7, 64)          # 5 prompt tokens
    assert not fits_as_rows(mixed, 5, 6, 64)          # 7 rows
    assert not fits_as_rows(mixed, 5, 7, 39)          # a sequence past the graphs' length
    assert not fits_as_rows(_inputs([1, 1], [5, 9]), 5, 7, 64)     # decode-only: the graphs' own
    assert fits_as_rows(_inputs([4], [4]), 5, 7, 64)                # a short prompt alone
    deep = MIXED_ROWS_CONTEXT // 256 + 1                             # 256 rows deep into a long prompt
    assert not fits_as_rows(_inputs([1, 256], [9, deep]), 256, 512, 1 << 22)
    assert fits_as_rows(_inputs([1, 256], [9, deep - 1]), 256, 512, 1 << 22)


def test_the_flag_and_the_graph_sizes(tmp_path):
    model = "deepseek-v2-lite"
    config = EngineArgs(model=model, load_format="dummy").create_engine_config()
    assert config.mixed_graph_tokens == 256
    assert decode_graph_sizes(config, config.cuda_graph_sizes)[-5:] == [256, 320, 384, 448, 512]
    off = EngineArgs(model=model, load_format="dummy", mixed_graph_tokens=0).create_engine_config()
    assert decode_graph_sizes(off, off.cuda_graph_sizes)[-1] == 256
    for kw in ({"enforce_eager": True}, {"cudagraph_mode": "FULL_DECODE_ONLY"}, {"cudagraph_mode": "PIECEWISE"},
               {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}):
        assert EngineArgs(model=model, load_format="dummy", **kw).create_engine_config().mixed_graph_tokens == 0
    with pytest.raises(ValueError, match="mixed_graph_tokens \\(64\\) is not supported with speculative decoding"):
        EngineArgs(model=model, load_format="dummy", mixed_graph_tokens=64,
                   speculative_config={"method": "ngram", "num_speculative_tokens": 2}).create_engine_config()
    with pytest.raises(ValueError, match="mixed_graph_tokens must be >= 0"):
        EngineArgs(model=model, load_format="dummy", mixed_graph_tokens=-1)


# --------------------------------------------------------------------------- on a CUDA device
@pytest.mark.gpu
@pytest.mark.parametrize("model", ["stories", "v3"])
def test_gpu_small_mixed_steps_replay_decode_graphs(model, tiny_v3, monkeypatch):
    """On CUDA (Triton ops, fp32), graphs captured up to max_num_seqs + 16 rows: steps of decodes
    beside prompt chunks replay them (more rows than sequences), and greedy tokens equal eager
    decoding's; the one-token-row logits of a mixed step equal its piecewise forward's."""
    kw = dict(dtype="float32", block_size=16, max_num_seqs=4, max_num_batched_tokens=8,
              enable_prefix_caching=False)
    if model == "v3":
        kw["model"] = tiny_v3
    prompts = STORIES if model == "stories" else [{"prompt_token_ids": p} for p in
                                                  ([5, 17, 42, 8, 99, 3, 61], [7, 7, 123], [200, 11, 54, 9, 1],
                                                   [2, 3, 4, 5, 6, 7, 8, 9, 10, 31, 44, 45])]
    params = SamplingParams(temperature=0, max_tokens=32)
    with LLM(enforce_eager=True, **kw) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    with LLM(mixed_graph_tokens=16, cuda_graph_sizes=[1, 2, 4, 8, 12, 16, 20], **kw) as llm:
        graphs = llm.engine.runner.graphs
        assert graphs.enabled and graphs.sizes[-1] == 20
        rows, real = [], graphs.run
        monkeypatch.setattr(graphs, "run", lambda input_ids, *a, **k: (rows.append(input_ids.shape[0]),
                                                                       real(input_ids, *a, **k))[1])
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
        assert max(rows) > len(prompts)
        decoding = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 123]]
        want_l, got_l = mixed_logits_both_ways(llm.engine, decoding, [[200, 11, 54, 9, 1], list(range(2, 15))], 6)
        torch.testing.assert_close(got_l, want_l, rtol=2e-3, atol=2e-3)
