"""Logprob entries' token texts on a SentencePiece tokenizer (the demo model's): the sampled
tokens' texts join to the generated text (a word start keeps its space), and a prompt's
logprobs give the prompt's first word as the text starts with it."""
from __future__ import annotations

from deepserve import LLM, SamplingParams
from deepserve.engine.tokenizer import Tokenizer
from tests.conftest import DEMO_MODEL


def test_sampled_tokens_texts_join_to_the_text():
    with LLM(str(DEMO_MODEL), max_model_len=128) as llm:
        out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=24, logprobs=2,
                                                                prompt_logprobs=1))[0]
    sample = out.outputs[0]
    chosen = [entry[t].decoded_token for t, entry in zip(sample.token_ids, sample.logprobs)]
    assert "".join(chosen) == sample.text and sample.text.startswith(", there")
    assert sum(t.startswith(" ") for t in chosen) >= 4                        # word starts keep their spaces
    assert all(lp.decoded_token for entry in sample.logprobs for lp in entry.values())
    prompt = [entry[t].decoded_token for t, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])]
    assert "".join(prompt) == "Once upon a time" and prompt[0] == "Once"     # after BOS: the text's start


def test_token_text_in_and_at_the_start_of_a_text():
    tok = Tokenizer(DEMO_MODEL)
    ids = tok.encode("Once upon a time", add_special_tokens=False)
    assert [tok.token_text(i) for i in ids] == [" Once", " upon", " a", " time"]
    assert tok.token_text(ids[0], at_start=True) == "Once"
    assert tok.bos_token_id in tok.special_ids and ids[0] not in tok.special_ids
