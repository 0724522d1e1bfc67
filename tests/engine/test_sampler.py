"""Sampler additions: logit_bias, grammar bitmasks on the constrained rows only, top-k
logprobs; checked against plain torch on random logits."""
from __future__ import annotations

import pytest
import torch

from deepserve.config import DEMO_MODEL
from deepserve.engine.sampler import Sampler, top_logprobs
from deepserve.engine.sampling_params import GuidedDecoding, SamplingParams
from deepserve.engine.sequence import Sequence

VOCAB = 512


def seqs_for(*params: SamplingParams) -> list[Sequence]:
    return [Sequence(f"r{i}", 0, [1, 5, 9], p) for i, p in enumerate(params)]


def test_logit_bias_moves_only_its_row():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    sampler = Sampler({2}, VOCAB)
    seqs = seqs_for(SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={7: 100.0}),
                    SamplingParams(temperature=0, logit_bias={int(logits[2].argmax()): -100.0}))
    out = sampler(logits.clone(), seqs).token_ids
    assert out[0] == logits[0].argmax().item()
    assert out[1] == 7
    assert out[2] == logits[2].topk(2).indices[1].item()


def test_top_logprobs_ranks():
    torch.manual_seed(1)
    lp = torch.randn(4, 50).log_softmax(-1)
    chosen = torch.tensor([0, 1, 2, 3])
    for row, (value, rank, top) in enumerate(top_logprobs(lp, chosen, 3)):
        assert value == pytest.approx(lp[row, row].item())
        assert rank == int((lp[row] > lp[row, row]).sum()) + 1
        assert [t for t, _ in top] == lp[row].topk(3).indices.tolist()


def test_grammar_masks_constrained_rows_only():
    pytest.importorskip("xgrammar")
    from deepserve.engine.grammar import GrammarCompiler
    from deepserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(DEMO_MODEL)
    compiler = GrammarCompiler(tok, VOCAB, tok.eos_token_ids)
    specs = [GuidedDecoding(regex="[ab]{3}"), GuidedDecoding(choice=["cat", "dog"]),
             GuidedDecoding(grammar='root ::= "x" digit digit\ndigit ::= [0-9]')]
    for spec in specs:
        compiler.compile(spec)
    sampler = Sampler(tok.eos_token_ids, VOCAB)
    free, *constrained = seqs_for(SamplingParams(temperature=0), *(SamplingParams(temperature=1.0, seed=4, guided=g)
                                                                   for g in specs))
    torch.manual_seed(2)
    texts = ["", "", ""]
    done = [False, False, False]
    for _ in range(6):
        logits = torch.randn(4, VOCAB)
        out = sampler(logits.clone(), [free, *constrained]).token_ids
        assert out[0] == logits[0].argmax().item()        # the free row is untouched
        free.token_ids.append(out[0])
        for j, seq in enumerate(constrained):
            seq.token_ids.append(out[j + 1])
            if not done[j]:
                done[j] = out[j + 1] in tok.eos_token_ids
                texts[j] += "" if done[j] else tok.decode(seq.output_token_ids, skip_special_tokens=True)[len(texts[j]):]
    assert all(done), texts
    assert len(texts[0]) == 3 and set(texts[0]) <= {"a", "b"} and texts[1] in ("cat", "dog"), texts
    assert len(texts[2]) == 3 and texts[2][0] == "x" and texts[2][1:].isdigit(), texts


def test_guided_spec_checks_and_pickles_without_its_compiled_grammar():
    import pickle

    with pytest.raises(ValueError, match="exactly one"):
        GuidedDecoding(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="not valid JSON"):
        GuidedDecoding(json="{nope")
    spec = GuidedDecoding(choice=["x", "y"])
    spec.compiled = object()
    params = pickle.loads(pickle.dumps(SamplingParams(guided=spec, logit_bias={"3": 1})))
    assert params.guided.choice == ["x", "y"] and params.guided.compiled is None   # another process recompiles
    assert params.logit_bias == {3: 1.0}
    assert SamplingParams(logit_bias={5: 150}).logit_bias == {5: 150.0}   # vLLM's SamplingParams takes any value
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})


def test_grammar_tables_are_shared_by_the_tokenizer_files(tmp_path, monkeypatch):
    """Engines of one process over the same tokenizer files, width and stop ids share one
    xgrammar compiler (its vocabulary table takes seconds at 129K tokens); another width,
    other stop ids or a changed file get their own."""
    pytest.importorskip("xgrammar")
    import shutil

    from deepserve.engine import grammar
    from deepserve.engine.grammar import GrammarCompiler
    from deepserve.engine.tokenizer import Tokenizer

    monkeypatch.setattr(grammar, "_SHARED", {})
    built = []
    build = GrammarCompiler._build
    monkeypatch.setattr(GrammarCompiler, "_build", lambda self: built.append(self) or build(self))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{DEMO_MODEL}/{f}", tmp_path / f)
    tok_a, tok_b = Tokenizer(tmp_path), Tokenizer(tmp_path)
    a = GrammarCompiler(tok_a, VOCAB, tok_a.eos_token_ids)._get()
    assert GrammarCompiler(tok_b, VOCAB, tok_b.eos_token_ids)._get() is a and len(built) == 1
    assert GrammarCompiler(tok_b, VOCAB + 64, tok_b.eos_token_ids)._get() is not a
    assert GrammarCompiler(tok_b, VOCAB, [0])._get() is not a and len(built) == 3
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")       # another size: another key
    tok_c = Tokenizer(tmp_path)
    assert GrammarCompiler(tok_c, VOCAB, tok_c.eos_token_ids)._get() is not a and len(built) == 4
