"""Beam search (engine/beam_search.py) against a reference search written over the model's own
logits: a tiny random Llama with a 24-token vocabulary (so EOS comes up among the candidates)
and the demo model; same best hypotheses and scores (ties allowed), length_penalty, ignore_eos,
max_model_len, and every KV block free afterwards."""
from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from deepserve import LLM, BeamSearchParams
from deepserve.engine.beam_search import BeamSearch, beam_search, get_beam_search_score

VOCAB, EOS = 24, 2


def write_random_llama(folder, seed: int = 0, max_len: int = 64):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    hidden, inter, heads, head_dim = 32, 64, 2, 16

    def w(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale
    t = {"model.embed_tokens.weight": w(VOCAB, hidden, scale=1.0), "lm_head.weight": w(VOCAB, hidden),
         "model.norm.weight": torch.ones(hidden)}
    p = "model.layers.0."
    t.update({p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
              p + "self_attn.q_proj.weight": w(heads * head_dim, hidden), p + "self_attn.k_proj.weight": w(heads * head_dim, hidden),
              p + "self_attn.v_proj.weight": w(heads * head_dim, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
              p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
              p + "mlp.down_proj.weight": w(hidden, inter)})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": head_dim, "vocab_size": VOCAB,
              "max_position_embeddings": max_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
              "eos_token_id": EOS, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def reference(llm: LLM, prompt: list[int], width: int, max_tokens: int, eos: set[int], length_penalty=1.0,
              ignore_eos=False) -> list[tuple[list[int], float]]:
    """vLLM's algorithm over full-vocabulary logprobs from prompt_logits: each beam's 2 * width
    most likely tokens are candidates; EOS ends a hypothesis; the best `width` others go on;
    finished and live ones ranked by cumulative logprob / length ** length_penalty."""
    beams, done = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        cands = []
        for tokens, score in beams:
            logprobs = llm.prompt_logits([{"prompt_token_ids": tokens}])[0][-1].double().log_softmax(-1)
            top = torch.topk(logprobs, 2 * width)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                if tok in eos and not ignore_eos:
                    done.append((tokens, score + lp))
                else:
                    cands.append((tokens + [tok], score + lp))
        beams = sorted(cands, key=lambda c: -c[1])[:width]
        if not beams:
            break
    ranked = sorted(done + beams, key=lambda b: -b[1] / len(b[0]) ** length_penalty)
    return [(b[0][len(prompt):], b[1] / len(b[0]) ** length_penalty) for b in ranked[:width]]


def assert_same(got, want, prompt_len: int, length_penalty: float, eos: set[int], ignore_eos: bool = False):
    assert len(got) == len(want)
    scores = [get_beam_search_score(s.tokens, s.cum_logprob, eos, length_penalty) for s in got]
    assert scores == sorted(scores, reverse=True)
    for i, (seq, score, (ids, ref_score)) in enumerate(zip(got, scores, want)):
        assert score == pytest.approx(ref_score, abs=1e-4)
        tied = any(j != i and abs(w[1] - ref_score) < 1e-4 for j, w in enumerate(want))
        if not tied:   # the reference keeps no EOS
            ended = not ignore_eos and seq.tokens[-1] in eos
            assert seq.tokens[prompt_len:len(seq.tokens) - ended] == ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    llm = LLM(str(write_random_llama(tmp_path_factory.mktemp("beam") / "m")), num_gpu_blocks_override=64,
              block_size=4, max_model_len=64)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("width,length_penalty,ignore_eos", [(1, 1.0, False), (3, 1.0, False), (4, 0.5, False),
                                                             (3, 2.0, False), (3, 1.0, True)])
def test_matches_reference_search(tiny, width, length_penalty, ignore_eos):
    prompts = [[1, 5, 9], [1, 7], [1, 11, 3, 20, 8]]
    params = BeamSearchParams(beam_width=width, max_tokens=8, length_penalty=length_penalty, ignore_eos=ignore_eos)
    outs = tiny.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    eos = {EOS}
    stopped = 0
    for p, out in zip(prompts, outs):
        want = reference(tiny, p, width, 8, eos, length_penalty, ignore_eos)
        assert_same(out.sequences, want, len(p), length_penalty, eos, ignore_eos)
        stopped += sum(s.tokens[-1] == EOS and not ignore_eos for s in out.sequences)
        # vLLM's offline sequences: an EOS ends the tokens, finish_reason and stop_reason stay None
        assert all(s.finish_reason is None and s.stop_reason is None for s in out.sequences)
        assert all(s.tokens[:len(p)] == p for s in out.sequences)
        if ignore_eos:
            assert all(len(s.tokens) == len(p) + 8 for s in out.sequences)
    bm = tiny.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not tiny.engine.requests
    if length_penalty == 0.5:   # short hypotheses rank high: some end with EOS
        assert stopped >= 3, "the test model should end some hypotheses with EOS"
    if length_penalty == 2.0 or ignore_eos:
        assert stopped == 0


def test_eos_in_token_ids_only_with_include_stop_str(tiny):
    prompt = [1, 5, 9]
    for include in (False, True):
        search = BeamSearch(prompt, BeamSearchParams(beam_width=3, max_tokens=8, length_penalty=0.5,
                                                     include_stop_str_in_output=include), {EOS})
        while not search.done:
            outs = tiny.generate([{"prompt_token_ids": ids} for ids in search.step_prompts()], search.step_params())
            search.advance([o.outputs[0].logprobs[0] for o in outs])
        res = search.request_output("r", None, lambda ids: " ".join(map(str, ids)))
        stops = [o for o in res.outputs if o.finish_reason == "stop"]
        assert stops and all(o.stop_reason == EOS and (o.token_ids[-1] == EOS) == include for o in stops)
        assert all(str(EOS) not in o.text.split() for o in stops)


def test_stops_at_max_model_len(tiny):
    prompt = list(range(3, 23)) * 3                     # 60 of max_model_len 64: room for 4 tokens
    out = tiny.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=2, max_tokens=50,
                                                                            ignore_eos=True))[0]
    assert [len(s.tokens) for s in out.sequences] == [64, 64]
    with pytest.raises(ValueError, match="max_model_len"):
        tiny.beam_search([{"prompt_token_ids": list(range(3, 23)) * 4}], BeamSearchParams(beam_width=2, max_tokens=4))


def test_demo_model_text():
    with LLM(num_gpu_blocks_override=256) as llm:
        out = llm.beam_search(["Once upon a time"], BeamSearchParams(beam_width=2, max_tokens=6))[0]
        ids = llm.tokenizer.encode("Once upon a time")
        want = reference(llm, ids, 2, 6, llm.engine.eos_token_ids)
        assert_same(out.sequences, want, len(ids), 1.0, llm.engine.eos_token_ids)
        # vLLM's text: tokenizer.decode(tokens), special tokens kept (transformers' default)
        assert out.sequences[0].text == llm.tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=False)
        assert out.sequences[0].text.startswith("<s> Once upon a time")


def test_score_and_params():
    assert get_beam_search_score([1, 2, 3, EOS], -3.0, {EOS}, 1.0) == pytest.approx(-1.0)
    assert get_beam_search_score([1, 2, 3, 4], -4.0, {EOS}, 0.5) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    search = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=4), {EOS})
    search.advance([None])   # the engine ended the only beam without a token
    assert search.done and search.best() == [] and not math.isnan(search.steps)


class FakeLLM:
    """AsyncLLM's generate over a fixed next-token table; `hang_at`: the step whose requests
    never answer. Records each request's params and which requests ended unfinished."""

    def __init__(self, hang_at: int = 99):
        self.hang_at, self.params, self.unfinished, self.started = hang_at, [], [], []

    async def generate(self, prompt, params, request_id):
        from deepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
        self.params.append(params)
        self.started.append(request_id)
        done = False
        try:
            if len(prompt["prompt_token_ids"]) - 2 >= self.hang_at:
                await asyncio.Event().wait()
            entry = {t: Logprob(-0.5 * r, r, str(t)) for r, t in enumerate((7, 8, 9, 10), start=1)}
            done = True
            yield RequestOutput(request_id, None, prompt["prompt_token_ids"],
                                [CompletionOutput(0, "", [7], logprobs=[entry], finish_reason="length")], True)
        finally:
            if not done:
                self.unfinished.append(request_id)


def test_steps_carry_priority_and_logprobs():
    llm = FakeLLM()

    async def main():
        return [o async for o in beam_search(llm, {"prompt_token_ids": [1, 2]}, BeamSearchParams(2, 3), "r", {EOS},
                                             str, logprobs=6, priority=-3)]
    outs = asyncio.run(main())
    assert len(outs) == 1 and [o.token_ids for o in outs[0].outputs] == [[7, 7, 7], [7, 7, 8]]
    assert {(p.priority, p.logprobs, p.max_tokens) for p in llm.params} == {(-3, 6, 1)}


def test_cancelled_search_ends_its_step_requests():
    llm = FakeLLM(hang_at=2)

    async def main():
        task = asyncio.ensure_future(beam_search(llm, {"prompt_token_ids": [1, 2]}, BeamSearchParams(3, 8), "r",
                                                 {EOS}, str).__anext__())
        while len(llm.started) < 1 + 3 + 3:   # steps 0 and 1 answered, step 2's three beams waiting
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
    asyncio.run(main())
    assert sorted(llm.unfinished) == sorted(llm.started[4:]) and len(llm.unfinished) == 3


def structured_reference(llm: LLM, prompt: list[int], width: int, max_tokens: int, spec, eos: set[int]):
    """vLLM 0.26's structured beam search (_beam_search_step) over full logprobs: a beam whose
    grammar ended leaves as a hypothesis; the others' step is greedy among the tokens the grammar
    allows, and their candidates are the raw 2 * width most likely tokens and that sampled one,
    those the grammar allows only. xgrammar's own bitmask says which tokens those are."""
    import xgrammar as xgr

    vocab = llm.engine.runner.vocab_size
    beams, done = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        cands = []
        for tokens, score in beams:
            matcher = xgr.GrammarMatcher(spec.compiled)
            assert all(matcher.accept_token(t) for t in tokens[len(prompt):])
            if matcher.is_terminated():
                done.append((tokens, score))
                continue
            bitmask = xgr.allocate_token_bitmask(1, vocab)
            matcher.fill_next_token_bitmask(bitmask)
            mask = torch.zeros(1, vocab)
            xgr.apply_token_bitmask_inplace(mask, bitmask)
            allowed = set(torch.nonzero(mask[0] == 0)[:, 0].tolist())
            logprobs = llm.prompt_logits([{"prompt_token_ids": tokens}])[0][-1].double().log_softmax(-1)
            sampled = max(allowed, key=lambda t: logprobs[t].item())
            for tok in (set(torch.topk(logprobs, 2 * width).indices.tolist()) | {sampled}) & allowed:
                (done if tok in eos else cands).append((tokens + [tok], score + logprobs[tok].item()))
        beams = sorted(cands, key=lambda c: -c[1])[:width]
        if not beams:
            break
    ranked = sorted(done + beams, key=lambda b: -get_beam_search_score(b[0], b[1], eos))
    return [(b[0][len(prompt):], b[1]) for b in ranked[:width]]


@pytest.mark.parametrize("constraint", [
    {"regex": ", there (was|were) (a|an|two) (little|big|small) [a-z]+\\."},
    {"choice": [", there was a girl", ", in a big house", " there lived a cat", ", a dog"]},
])
def test_structured_outputs_follow_vllms_search(constraint):
    """BeamSearchParams.structured_outputs (vLLM's): every hypothesis follows the grammar, and
    the hypotheses and their scores are those of vLLM's algorithm."""
    from deepserve.sampling_params import StructuredOutputsParams

    spec = StructuredOutputsParams(**constraint)
    with LLM(num_gpu_blocks_override=256) as llm:
        prompt = llm.tokenizer.encode("Once upon a time")
        out = llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=3, max_tokens=12,
                                                                               structured_outputs=spec))[0]
        eos = llm.engine.eos_token_ids
        want = structured_reference(llm, prompt, 3, 12, spec, eos)
        assert [(s.tokens[len(prompt):], pytest.approx(s.cum_logprob, abs=1e-4)) for s in out.sequences] == want
        texts = [llm.tokenizer.decode(s.tokens[len(prompt):], skip_special_tokens=True) for s in out.sequences]
        if "choice" in constraint:
            assert set(texts) <= {c.strip() for c in constraint["choice"]} | set(constraint["choice"])
        else:
            assert len(set(texts)) == 3 and all(t.startswith(", there was a ") for t in texts)
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not llm.engine.requests
