"""Small mixed steps as decode-graph rows (--mixed-graph-tokens; engine/cuda_graphs.fits_as_rows,
DriverRunner.host_inputs): a step of decodes beside prompt chunks, each prompt token run as a
one-token row over its sequence's positions up to its own, gives the logits of the ordinary
mixed forward on the Llama attention path (stories260k) and on MLA's absorbed decode path
against its prefill path (tiny DeepSeek-V3), with a chunk that continues a cached prefix among
them; an engine whose "graphs" run such rows (replayed eagerly here: capture needs CUDA) gives
plain decoding's greedy tokens; the size limits and the flag's defaults."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import transformers

from deepserve import LLM, SamplingParams
from deepserve.config import EngineArgs
from deepserve.engine import driver_runner, spec_decode
from deepserve.engine.cuda_graphs import MIXED_ROWS_CONTEXT, CudaGraphRunner, decode_graph_sizes, step_rows
from deepserve.engine.scheduler import ScheduledBatch
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import as_decode_rows, verify_inputs
from deepserve.engine.step_inputs import StepInputs, StepMessage
from tests.engine.eager_graphs import install
from tests.engine.test_spec_decode_mtp import PROMPTS, r1_with_mtp  # noqa: F401 (a fixture)
from tests.models.test_deepseek import r1_style, save_deepseek

STORIES = ["Tom and Lily went to the park. Tom and Lily", "Once upon a time", "The dog saw a big red ball.",
           "Lily had a cat. Lily had a dog and a big red ball and a"]


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3_mixed_rows")
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), path)
    return str(path)


def mixed_logits_both_ways(engine, decoding: list[list[int]], prompts: list[list[int]], cached: int,
                           drafts: Optional[list[list[int]]] = None):
    """Prefill the `decoding` prompts but their last token and the first `cached` tokens of the
    last prompt; then one mixed step: those last tokens as decodes (each verified with its
    `drafts`, as speculative decoding's verify step), the other prompts whole and the last
    one's remaining tokens as chunks. Logits of every row, the flat forward and the
    one-token-row forward (the same KV slots written)."""
    runner, bm = engine.runner, engine.block_manager
    greedy = SamplingParams(temperature=0)
    dec = [Sequence(f"d{i}", 0, p, greedy) for i, p in enumerate(decoding)]
    new = [Sequence(f"p{i}", 0, p, greedy) for i, p in enumerate(prompts)]
    seqs = dec + new
    drafts = (drafts or [[] for _ in dec]) + [[] for _ in new]
    try:
        first = [(s, s.num_tokens - 1) for s in dec] + [(new[-1], cached)]
        for s, n in first:
            bm.allocate(s, n)
        runner.run_step(StepMessage(StepInputs.from_batch(ScheduledBatch([s for s, _ in first], [n for _, n in first], 0),
                                                          bm.block_size)))
        for (s, n), d in zip(first, drafts):
            s.num_computed_tokens = n
            bm.append_slots(s, s.num_tokens + len(d))
        for s in new[:-1]:
            bm.allocate(s, s.num_tokens)
        inputs, _ = verify_inputs(seqs, [1] * len(dec) + [s.num_tokens - s.num_computed_tokens for s in new], drafts,
                                  bm.block_size)
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
    install(llm, max_bs=12)
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


# ------------------------------------------------------- with speculative decoding's verify rows
def test_mixed_verify_rows_equal_the_flat_forward_llama():
    """A verify step (decodes with drafts) beside prompt chunks, one continuing a cached prefix."""
    llm = LLM(block_size=4, enable_prefix_caching=False)
    tok = llm.get_tokenizer()
    p = [tok.encode(t) for t in STORIES]
    want, got = mixed_logits_both_ways(llm.engine, p[:2], p[2:], cached=5, drafts=[[5, 9, 11], [7]])
    assert want.shape[0] == 4 + 2 + len(p[2]) + len(p[3]) - 5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_verify_rows_equal_the_flat_forward_mla(r1_with_mtp):  # noqa: F811
    llm = LLM(model=r1_with_mtp, dtype="float32", block_size=4, enable_prefix_caching=False)
    decoding = [[5, 17, 42, 8, 99, 3, 61], [7, 7, 123]]
    prompts = [[200, 11, 54, 9, 1], [2, 3, 4, 5, 6, 7, 8, 9, 10, 31, 44, 45, 46]]
    want, got = mixed_logits_both_ways(llm.engine, decoding, prompts, cached=6, drafts=[[3, 4], [100, 101, 102]])
    assert want.shape[0] == 3 + 4 + 5 + 7
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _verify_steps(llm, monkeypatch) -> list[list]:
    """[prompt tokens, draft tokens, ran as one-token rows] of each speculative step."""
    steps, runner = [], llm.engine.runner
    real_verify, real_run = spec_decode.verify_inputs, runner.run_step

    def verify(seqs, num_new, drafts, block_size):
        prompt = sum(n for s, n in zip(seqs, num_new) if n > 1 or s.num_computed_tokens + n < s.num_tokens)
        steps.append([prompt, sum(map(len, drafts)), None])
        return real_verify(seqs, num_new, drafts, block_size)

    def run_step(msg, *a, **k):
        steps[-1][2] = msg.inputs.decode_only
        return real_run(msg, *a, **k)
    monkeypatch.setattr(spec_decode, "verify_inputs", verify)
    monkeypatch.setattr(runner, "run_step", run_step)
    return steps


def _staggered(llm, prompts: list, params: SamplingParams, every: int = 3) -> list[list[int]]:
    """Each prompt added `every` engine steps after the one before (so new prompts meet decodes
    that draft); each request's tokens."""
    engine, ids, out, step = llm.engine, [], {}, 0
    while len(ids) < len(prompts) or engine.has_unfinished_requests():
        if len(ids) < len(prompts) and step % every == 0:
            ids.append(engine.add_request(None, prompts[len(ids)], params))
        out.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        step += 1
    return [out[i] for i in ids]


def _same_speculation(llm, flat) -> None:
    """`llm` drafted, and had accepted, as many tokens as `flat` (the same requests, verified
    flat); its pool is whole again."""
    g, f = llm.engine.gauges(), flat.engine.gauges()
    counters = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
    assert g["spec_decode_num_drafts"] > 0 and [g[c] for c in counters] == [f[c] for c in counters]
    assert g["num_free_blocks"] == g["num_blocks"]


@pytest.mark.parametrize("mixed_tokens", [6, 256])
def test_engine_ngram_mixed_verify_steps_as_rows_equal_plain(mixed_tokens, monkeypatch):
    """n-gram drafts (stories260k), prompts arriving while others decode: their prompts are
    verified beside the decodes' drafts, as rows where at most `mixed_tokens` prompt tokens."""
    kw = dict(block_size=4, max_num_seqs=4, enable_prefix_caching=False)
    # the first repeats itself (n-gram drafts from its first decode); 21, 5 and 6 prompt tokens
    prompts = ["The ball was very happy. The ball was very happy. The ball was",
               "Tom and Lily went to the park. Tom and Lily went to the", "Once upon a time", "Lily had a cat"]
    params = SamplingParams(temperature=0, max_tokens=24)
    want = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params)]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    flat = LLM(**kw, speculative_config=spec)                # no graphs: every verify step flat
    assert _staggered(flat, prompts, params, every=1) == want
    llm = LLM(**kw, mixed_graph_tokens=mixed_tokens, speculative_config=spec)
    install(llm, max_bs=4 * 4 + mixed_tokens)
    steps = _verify_steps(llm, monkeypatch)
    assert _staggered(llm, prompts, params, every=1) == want
    assert [p for p, d, _ in steps if p and d] == [21, 5], steps        # prompts beside drafts
    assert all(rows == (p <= mixed_tokens) for p, d, rows in steps), steps
    _same_speculation(llm, flat)


def test_engine_mtp_mixed_verify_steps_as_rows_equal_plain(r1_with_mtp, monkeypatch):  # noqa: F811
    """MTP drafts (tiny DeepSeek-V3 with its MTP layer), prompts arriving while others decode:
    verified beside the decodes' drafts as rows, and the MTP module's forward after each step
    runs over one-token rows too."""
    kw = dict(model=r1_with_mtp, dtype="float32", block_size=4, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=24)
    want = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params)]
    spec = {"method": "mtp", "num_speculative_tokens": 2}
    flat = LLM(**kw, speculative_config=spec)                # no graphs: every verify step flat
    assert _staggered(flat, prompts, params) == want
    llm = LLM(**kw, speculative_config=spec)
    install(llm, max_bs=64)
    steps = _verify_steps(llm, monkeypatch)
    mtp_rows, real_mtp = [], llm.engine.runner.run_mtp
    monkeypatch.setattr(llm.engine.runner, "run_mtp", lambda msg: (mtp_rows.append(msg.inputs.decode_only),
                                                                   real_mtp(msg))[1])
    assert _staggered(llm, prompts, params) == want
    assert any(p and d and rows for p, d, rows in steps), steps
    assert all(rows for _, _, rows in steps) and all(mtp_rows) and len(mtp_rows) == len(steps)
    _same_speculation(llm, flat)


def _batch(q_lens: list[int], seq_lens: list[int]) -> ScheduledBatch:
    """A scheduled step of sequences computing q_lens tokens up to seq_lens (one-token ones first
    count as decodes)."""
    seqs = [SimpleNamespace(num_computed_tokens=s - q) for q, s in zip(q_lens, seq_lens)]
    return ScheduledBatch(seqs, q_lens, sum(1 for q in q_lens if q == 1))


def _graphs(max_bs: int, max_len: int) -> CudaGraphRunner:
    graphs = object.__new__(CudaGraphRunner)
    graphs.enabled, graphs.max_bs, graphs.max_len = True, max_bs, max_len
    return graphs


def test_which_steps_run_as_rows():
    mixed = _batch([1, 1, 3, 2], [10, 20, 3, 40])
    assert _graphs(7, 64).fits_as_rows(mixed, 5)
    assert not _graphs(7, 64).fits_as_rows(mixed, 0)          # off
    assert not _graphs(7, 64).fits_as_rows(mixed, 4)          # 5 prompt tokens
    assert not _graphs(6, 64).fits_as_rows(mixed, 5)          # 7 rows
    assert not _graphs(7, 39).fits_as_rows(mixed, 5)          # a sequence past the graphs' length
    off = _graphs(7, 64)
    off.enabled = False
    assert not off.fits_as_rows(mixed, 5)                     # no graphs captured
    assert not _graphs(7, 64).fits_as_rows(_batch([1, 1], [5, 9]), 5)     # decode-only: the graphs' own
    assert _graphs(7, 64).fits_as_rows(_batch([4], [4]), 5)                # a short prompt alone
    deep = MIXED_ROWS_CONTEXT // 256 + 1                                    # 256 rows deep into a long prompt
    assert not _graphs(512, 1 << 22).fits_as_rows(_batch([1, 256], [9, deep]), 256)
    assert _graphs(512, 1 << 22).fits_as_rows(_batch([1, 256], [9, deep - 1]), 256)
    # speculative decoding: up to k drafts beside each one-token row, counted before drafting
    assert step_rows([1, 1, 3, 2], 2) == 7 + 2 * 2
    assert _graphs(11, 64).fits_as_rows(mixed, 5, drafts=2)
    assert not _graphs(10, 64).fits_as_rows(mixed, 5, drafts=2)


def test_the_flag_and_the_graph_sizes(tmp_path):
    model = "deepseek-v2-lite"
    config = EngineArgs(model=model, load_format="dummy").create_engine_config()
    assert config.mixed_graph_tokens == 256
    assert decode_graph_sizes(config, config.cuda_graph_sizes)[-5:] == [256, 320, 384, 448, 512]
    off = EngineArgs(model=model, load_format="dummy", mixed_graph_tokens=0).create_engine_config()
    assert decode_graph_sizes(off, off.cuda_graph_sizes)[-1] == 256
    for kw in ({"enforce_eager": True}, {"cudagraph_mode": "FULL_DECODE_ONLY"}, {"cudagraph_mode": "PIECEWISE"}):
        assert EngineArgs(model=model, load_format="dummy", **kw).create_engine_config().mixed_graph_tokens == 0
    # speculative decoding: verify rows beside the prompt rows, max_num_seqs * (1 + k) + 64
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    spec = EngineArgs(model=model, load_format="dummy", max_num_seqs=8, mixed_graph_tokens=64,
                      speculative_config=ngram).create_engine_config()
    assert spec.mixed_graph_tokens == 64
    assert decode_graph_sizes(spec, [1, 2, 4, 8, 16, 24, 32, 64, 88, 89, 128]) == [1, 2, 4, 8, 16, 24, 32, 64, 88]
    default = EngineArgs(model=model, load_format="dummy", speculative_config=ngram).create_engine_config()
    assert default.mixed_graph_tokens == 256
    with pytest.raises(ValueError, match="mixed_graph_tokens \\(64\\) is not supported with pipeline parallel"):
        EngineArgs(model=model, load_format="dummy", mixed_graph_tokens=64,
                   pipeline_parallel_size=2).create_engine_config()
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


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ngram", "mtp"])
def test_gpu_mixed_verify_steps_replay_decode_graphs(method, r1_with_mtp, monkeypatch):  # noqa: F811
    """On CUDA (Triton ops, fp32), with speculative decoding and --mixed-graph-tokens 32: prompts
    arriving while others decode are verified beside the decodes' drafts as rows that replay the
    decode graphs (and, with mtp, the MTP module's graphs after them); greedy tokens equal eager
    plain decoding's."""
    if method == "ngram":
        kw = dict(dtype="float32", block_size=16, max_num_seqs=4, enable_prefix_caching=False)
        prompts = ["The ball was very happy. The ball was very happy. The ball was",
                   "Tom and Lily went to the park. Tom and Lily went to the", "Once upon a time", "Lily had a cat"]
        spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    else:
        kw = dict(model=r1_with_mtp, dtype="float32", block_size=16, max_num_seqs=4, enable_prefix_caching=False)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        spec = {"method": "mtp", "num_speculative_tokens": 2}
    params = SamplingParams(temperature=0, max_tokens=24)
    with LLM(enforce_eager=True, **kw) as plain:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    # (synchronous steps: each runs through the recorded verify step)
    with LLM(mixed_graph_tokens=32, speculative_config=spec, async_scheduling=False,
             cuda_graph_sizes=[1, 2, 4, 8, 16, 24, 32, 40], **kw) as llm:
        graphs = llm.engine.runner.graphs
        assert graphs.enabled and graphs.sizes[-1] == 40        # 4 x (1 + k) verify rows + 32 prompt rows
        steps = _verify_steps(llm, monkeypatch)
        replays, real = [], graphs.run
        monkeypatch.setattr(graphs, "run", lambda input_ids, *a, **k: (replays.append(input_ids.shape[0]),
                                                                       real(input_ids, *a, **k))[1])
        assert _staggered(llm, prompts, params, every=1) == want
        assert any(p and d and rows for p, d, rows in steps), steps
        assert len(replays) == sum(rows for _, _, rows in steps)
