"""Speculative decoding steps (engine/spec_decode.py) on the real stories260k model, driven
through the runner and block manager of an engine: n-gram drafts verified over k + 1
positions per sequence in one flat batch give greedy output token for token equal to plain
decoding (and accept drafts: the stories repeat), rejected positions' blocks go back to the
pool, and sampled first tokens follow the target distribution."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.config import SpeculativeConfig
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import SpecDecoder, can_speculate, verify_inputs, verify_sampled
from deepserve.engine.step_inputs import StepMessage
from deepserve.ops.sampling import sampling_probs

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=4)


@pytest.fixture(scope="module")
def llm():
    return LLM(block_size=4, enable_prefix_caching=False)


def speculative_generate(engine, prompts: list[list[int]], params: list[SamplingParams], spec=NGRAM):
    """Every sequence advanced together: the first step prefills the prompts, later steps
    verify each sequence's last token plus its n-gram drafts. Returns (output ids, stats)."""
    runner, bm = engine.runner, engine.block_manager
    decoder = SpecDecoder(spec, engine.max_model_len)
    seqs = [Sequence(f"s{i}", 0, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    for s in seqs:
        bm.allocate(s, 0)
    live = list(seqs)
    drafts = [[] for _ in live]
    while live:
        num_new = [s.num_tokens - s.num_computed_tokens for s in live]
        for s, n, d in zip(live, num_new, drafts):
            bm.append_slots(s, s.num_computed_tokens + n + len(d))
        inputs, order = verify_inputs(live, num_new, drafts, bm.block_size)
        logits = runner.run_step(StepMessage(inputs))
        ordered = [live[i] for i in order]
        emitted = decoder.verify(logits, ordered, [drafts[i] for i in order])
        for i, toks in zip(order, emitted):
            s = live[i]
            s.num_computed_tokens += num_new[i] + len(toks) - 1
            bm.trim(s, s.num_computed_tokens)
            assert len(s.block_table) == -(-s.num_computed_tokens // bm.block_size)
            for t in toks:
                s.token_ids.append(t)
                if s.num_output_tokens >= s.params.max_tokens or (
                        t in engine.eos_token_ids and not s.params.ignore_eos):
                    s.finish_reason = "done"
                    break
        for s in [s for s in live if s.finish_reason]:
            bm.free_seq(s)
        live = [s for s in live if not s.finish_reason]
        drafts = [decoder.propose(s) for s in live]
    return [s.output_token_ids for s in seqs], decoder.stats


def story_prompts(llm):
    tok = llm.get_tokenizer()
    return [tok.encode(t) for t in ("Once upon a time", "Tom and Lily went to the park. Tom and Lily",
                                    "The dog saw a big red ball. The dog")]


def test_greedy_ngram_speculation_equals_plain_decoding(llm):
    prompts = story_prompts(llm)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (32, 24, 24)]
    plain = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    engine = llm.engine
    got, stats = speculative_generate(engine, prompts, params)
    assert got == plain
    # the stories repeat themselves: drafts are made and some accepted, never more than made
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1]
    assert sum(stats.accepted_per_position) == stats.num_accepted_tokens
    assert stats.mean_acceptance_length > 1.0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_that_read_history_get_no_drafts(llm):
    prompts = story_prompts(llm)[:2]
    params = [SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=16, logprobs=2)]
    assert not any(can_speculate(Sequence("x", 0, [1], p)) for p in params)
    got, stats = speculative_generate(llm.engine, prompts, [SamplingParams(temperature=0, max_tokens=32)] * 2)
    assert stats.num_drafts > 0
    _, none = speculative_generate(llm.engine, prompts[:1], params[1:])
    assert none.num_drafts == 0


def test_sampled_first_tokens_follow_the_target(llm):
    """A repetitive prompt's verify rows (last prompt token + 3 n-gram drafts), verified for
    2000 sampled copies (temperature 0.8, top-p 0.95): the emitted first token's histogram
    against the target distribution, by chi-square over the 8 likeliest tokens and the rest."""
    engine = llm.engine
    prompt = story_prompts(llm)[1]
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=10)
    decoder = SpecDecoder(NGRAM, engine.max_model_len)
    n = 2000
    seq = Sequence("p", 0, prompt, params)
    d = decoder.propose(seq)
    assert len(d) == 3
    bm = engine.block_manager
    bm.allocate(seq, len(prompt) + len(d))
    try:
        inputs, _ = verify_inputs([seq], [len(prompt)], [d], bm.block_size)
        logits = engine.runner.run_step(StepMessage(inputs))                   # [4, V]
    finally:
        bm.free_seq(seq)
    # n copies of the sequence at this step, each verified with its own draws
    torch.manual_seed(0)
    copies = [Sequence(f"r{i}", 0, prompt, params) for i in range(n)]
    first = torch.tensor([t[0] for t in decoder.verify(logits.repeat(n, 1), copies, [d] * n)])
    target = sampling_probs(logits[:1].float(), torch.tensor([0.8]), torch.tensor([0]), torch.tensor([0.95]),
                            torch.tensor([0.0]))[0]
    top = target.topk(8).indices
    observed = torch.stack([(first == t).sum() for t in top] + [(~torch.isin(first, top)).sum()]).float()
    expected = torch.cat((target[top], (1 - target[top].sum()).view(1))) * n
    keep = expected > 0
    chi2 = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    a = 2.0 / (9.0 * df)
    assert chi2 < df * (1.0 - a + 3.09 * math.sqrt(a)) ** 3      # the 0.999 quantile
    # the first draft was accepted about as often as the target gives it
    p_draft = float(target[d[0]])
    assert abs(float((first == d[0]).float().mean()) - p_draft) < 4 * math.sqrt(p_draft * (1 - p_draft) / n) + 1e-3


# --------------------------------------------------------------------------- through LLMEngine.step
@pytest.fixture(scope="module")
def spec_llm():
    return LLM(block_size=4, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}))


def test_engine_greedy_with_ngram_equals_plain(llm, spec_llm, caplog):
    prompts = [{"prompt_token_ids": p} for p in story_prompts(llm)] + ["Lily had a cat. Lily had"]
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = llm.generate(prompts, params)
    spec_llm.engine.spec.log_interval_s = 0.0
    with caplog.at_level(logging.INFO, logger="deepserve"):
        spec = spec_llm.generate(prompts, params)
    assert "mean acceptance length" in caplog.text
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert [o.outputs[0].text for o in spec] == [o.outputs[0].text for o in plain]
    g = spec_llm.engine.gauges()
    assert g["spec_decode_num_drafts"] > 0
    assert 0 < g["spec_decode_num_accepted_tokens"] <= g["spec_decode_num_draft_tokens"]
    assert g["spec_decode_num_accepted_tokens_per_pos_0"] >= g["spec_decode_num_accepted_tokens_per_pos_2"]
    # fewer steps than tokens: accepted drafts are tokens without their own step
    assert g["steps"] < g["generation_tokens"]
    assert g["num_free_blocks"] == g["num_blocks"]


def test_engine_stops_logprobs_and_n_as_without_speculation(llm, spec_llm):
    prompt = "Tom and Lily went to the park. Tom and Lily"
    cases = [SamplingParams(temperature=0, max_tokens=40, stop=["park"]),
             SamplingParams(temperature=0, max_tokens=7),
             SamplingParams(temperature=0, max_tokens=12, logprobs=2),          # decodes without drafts
             SamplingParams(temperature=0.8, seed=5, max_tokens=20, n=2, min_tokens=3)]   # (drafts off)
    for params in cases:
        want, got = llm.generate(prompt, params)[0], spec_llm.generate(prompt, params)[0]
        for w, g in zip(want.outputs, got.outputs, strict=True):
            assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == \
                (w.token_ids, w.text, w.finish_reason, w.stop_reason), params
            if params.logprobs:
                assert [list(e) for e in g.logprobs] == [list(e) for e in w.logprobs]
                assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-5)
    assert len(spec_llm.generate(prompt, cases[1])[0].outputs[0].token_ids) == 7


def test_engine_seeded_sampling_repeats(spec_llm):
    prompt = "Tom and Lily went to the park. Tom and Lily"
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=30)
    first = spec_llm.generate(prompt, params)[0].outputs[0].token_ids
    assert spec_llm.generate(prompt, params)[0].outputs[0].token_ids == first
    assert len(first) == 30


def test_abort_mid_speculation_frees_every_block(spec_llm):
    engine = spec_llm.engine
    before = engine.gauges()["spec_decode_num_drafts"]
    ids = [engine.add_request(None, "Lily had a cat. Lily had a cat. Lily", SamplingParams(temperature=0, max_tokens=200))
           for _ in range(3)]
    while engine.gauges()["spec_decode_num_drafts"] == before:
        engine.step()
    for rid in ids:
        engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_tp2_ngram_equals_plain(llm):
    """The verify step's inputs reach the TP peer like any step's (one forward, two ranks)."""
    prompts = [{"prompt_token_ids": p} for p in story_prompts(llm)[1:]]
    params = SamplingParams(temperature=0, max_tokens=24)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    tp = LLM(block_size=4, tensor_parallel_size=2, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}))
    try:
        assert [o.outputs[0].token_ids for o in tp.generate(prompts, params)] == plain
        assert tp.engine.gauges()["spec_decode_num_accepted_tokens"] > 0
    finally:
        tp.engine.shutdown()


def test_ngram_through_preemption_equals_plain(llm):
    """A pool too small for the batch: sequences are preempted and recomputed while others
    verify drafts; outputs stay those of plain decoding and every block comes back."""
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(f"Tom had {w}. Tom had {w}. Tom")} for w in
               ("a dog", "a cat", "a red ball", "a big box", "a toy", "a friend")]
    params = SamplingParams(temperature=0, max_tokens=28)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    small = LLM(block_size=4, num_gpu_blocks_override=30, enable_prefix_caching=False, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}))
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
    g = small.engine.gauges()
    assert g["num_preemptions"] > 0 and g["spec_decode_num_accepted_tokens"] > 0
    assert got == plain
    assert g["num_free_blocks"] == g["num_blocks"]


def test_drafts_stay_within_the_token_budget(llm):
    """max_num_batched_tokens 6 with four decoding sequences: at most 2 draft tokens a step."""
    prompts = [{"prompt_token_ids": p} for p in story_prompts(llm)] + ["Lily had a cat. Lily had"]
    params = SamplingParams(temperature=0, max_tokens=20)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    tight = LLM(block_size=4, max_num_batched_tokens=6, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}))
    engine = tight.engine
    seen = []
    real = engine.runner.run_step

    def counting(msg, *a, **kw):
        seen.append(msg.inputs.num_tokens)
        return real(msg, *a, **kw)
    engine.runner.run_step = counting
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params)] == plain
    assert max(seen) <= 6 and engine.gauges()["spec_decode_num_drafts"] > 0


def test_async_scheduling_with_ngram_equals_plain(llm, monkeypatch):
    """--async-scheduling with n-gram drafts: steps that draft run synchronously, the others
    (the prefill, a request with logit_bias decoding alone) launch ahead; greedy tokens and
    texts equal synchronous plain decoding, drafts are accepted, every block comes back."""
    prompts = [{"prompt_token_ids": p} for p in story_prompts(llm)] + ["Lily had a cat. Lily had"]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (40, 12, 30)] + [
        SamplingParams(temperature=0, max_tokens=60, logit_bias={5: -2.0})]
    plain = llm.generate(prompts, params)
    spec = LLM(block_size=4, async_scheduling=True, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}))
    runner, calls = spec.engine.runner, []
    real = runner.launch
    monkeypatch.setattr(runner, "launch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    got = spec.generate(prompts, params)
    assert [(o.outputs[0].token_ids, o.outputs[0].text) for o in got] == \
        [(o.outputs[0].token_ids, o.outputs[0].text) for o in plain]
    g = spec.engine.gauges()
    assert len(calls) > 10 and g["spec_decode_num_accepted_tokens"] > 0
    assert g["steps"] < g["generation_tokens"]
    assert g["num_free_blocks"] == g["num_blocks"]


def test_greedy_verify_equals_the_rejection_sampler():
    """All-greedy steps skip the rejection sampler: kept drafts and the token after them are
    what its greedy rows give, for drafts of every length matching the argmax for a while."""
    torch.manual_seed(0)
    decoder = SpecDecoder(NGRAM, 512)
    seqs = [Sequence(f"g{i}", 0, [1, 2], SamplingParams(temperature=0)) for i in range(6)]
    lens = [3, 0, 1, 3, 2, 3]
    logits = torch.randn(sum(n + 1 for n in lens), 50)
    best = logits.argmax(dim=-1).tolist()
    drafts, row = [], 0
    for i, n in enumerate(lens):       # sequence i matches the argmax for its first i % 4 drafts
        drafts.append([best[row + j] if j < i % 4 else (best[row + j] + 1) % 50 for j in range(n)])
        row += n + 1
    fast = decoder.verify(logits, seqs, drafts)
    assert fast == verify_sampled(logits, seqs, drafts)
    assert [len(t) - 1 for t in fast] == [0, 0, 1, 3, 0, 1]
