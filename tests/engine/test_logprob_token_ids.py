"""vLLM's logprob_token_ids: at each generated position the logprobs of exactly the named ids
(besides the sampled token's, which comes first), checked against torch's log_softmax of the
logits, in the sampler on random logits and end to end on the demo model (greedy), in-process and
across the engine-core process; vLLM's validation."""
from __future__ import annotations

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.config import DEMO_MODEL
from deepserve.engine.sampler import Sampler
from deepserve.engine.sequence import Sequence

VOCAB = 512
IDS = [13, 7, 13, 400]   # a repeat: one entry, in its first place (as vLLM's dict)


def test_sampler_gathers_only_the_rows_that_name_ids():
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=2),
              SamplingParams(temperature=0, logprob_token_ids=IDS)]
    out = Sampler(set(), VOCAB)(logits.clone(), [Sequence(f"r{i}", 0, [1, 2], p) for i, p in enumerate(params)])
    ref = logits.log_softmax(dim=-1)
    assert out.logprobs[0] is None
    assert [t for t, _ in out.logprobs[1][2]] == ref[1].topk(2).indices.tolist()   # its top-k as before
    chosen, rank, listed = out.logprobs[2]
    token = out.token_ids[2]
    assert chosen == pytest.approx(ref[2, token].item(), abs=1e-6) and rank == 1   # greedy: the most likely
    assert [t for t, _, _ in listed] == IDS
    for tid, value, r in listed:
        assert value == pytest.approx(ref[2, tid].item(), abs=1e-6)
        assert r == int((ref[2] > ref[2, tid]).sum()) + 1


def test_validation_is_vllms():
    assert SamplingParams(logprob_token_ids=[3, 4]).logprobs == 2   # their number, as vLLM's num_logprobs
    assert SamplingParams(logprob_token_ids=[]).logprob_token_ids is None
    with pytest.raises(ValueError, match="logprobs must equal len"):
        SamplingParams(logprobs=1, logprob_token_ids=[3, 4])
    with pytest.raises(ValueError, match="at most 128"):
        SamplingParams(logprob_token_ids=list(range(129)))
    with pytest.raises(ValueError, match=">= 0"):
        SamplingParams(logprob_token_ids=[-1])


@pytest.fixture(scope="module")
def llm():
    with LLM(str(DEMO_MODEL), block_size=4) as engine:
        yield engine


def _check_against_logits(llm, out, prompt_ids):
    """Each position's entry: the sampled token first, then IDS (once each), their values the
    log_softmax of the model's logits there."""
    ids = prompt_ids + out.token_ids
    ref = llm.prompt_logits([{"prompt_token_ids": ids}])[0].float().log_softmax(dim=-1)   # row j predicts j + 1
    assert len(out.logprobs) == len(out.token_ids) == 6
    for pos, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt_ids) - 1 + pos]
        assert token == int(row.argmax())   # greedy
        assert list(entry) == list(dict.fromkeys([token] + IDS))
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(row[tid].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_generated_positions_match_log_softmax_of_the_logits(llm):
    prompt = llm.get_tokenizer().encode("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=6, logprob_token_ids=IDS)
    _check_against_logits(llm, llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0], prompt)


def test_ids_cross_to_the_engine_core_process(llm, monkeypatch):
    prompt = llm.get_tokenizer().encode("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=6, logprob_token_ids=IDS)
    here = llm.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), block_size=4) as apart:
        out = apart.generate({"prompt_token_ids": prompt}, params)[0].outputs[0]
        assert out.token_ids == here.token_ids
        assert [list(e) for e in out.logprobs] == [list(e) for e in here.logprobs]
        _check_against_logits(llm, out, prompt)
        with pytest.raises(ValueError, match="logprob_token_ids token id 512 is outside the vocabulary"):
            apart.generate("x", SamplingParams(logprob_token_ids=[512]))
