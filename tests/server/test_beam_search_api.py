"""use_beam_search on /v1/completions and /v1/chat/completions with the openai client: n
choices, best first, the same hypotheses as LLM.beam_search; logprobs from the steps; the
fields beam search cannot honour refused by name; no KV block left after, a client leaving
mid-search included."""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import API_KEY, wait_for
from test_server_load import idle, metrics

from deepserve import LLM, BeamSearchParams

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def test_completions_beams(client, demo_server):
    with LLM(num_gpu_blocks_override=256) as llm:
        offline = llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=10))[0].sequences
    r = client.completions.create(model="stories260k", prompt=PROMPT, n=3, max_tokens=10, logprobs=2,
                                  extra_body={"use_beam_search": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert ["<s> " + PROMPT + c.text for c in r.choices] == [s.text for s in offline]   # offline: BOS written out
    for c, s in zip(r.choices, offline):
        assert c.token_ids == s.tokens[-len(c.token_ids):] and c.finish_reason == "length"
        assert sum(c.logprobs.token_logprobs) == pytest.approx(s.cum_logprob, abs=1e-4)
        assert all(len(top) <= 3 for top in c.logprobs.top_logprobs)   # 2, plus the chosen token
    assert r.usage.completion_tokens == 30
    wait_for(lambda: idle(demo_server.url))


def test_chat_beams_and_stream(client, demo_server):
    chat = dict(model="stories260k", messages=[{"role": "user", "content": PROMPT}], n=2, max_tokens=8,
                extra_body={"use_beam_search": True})
    r = client.chat.completions.create(**chat, logprobs=True, top_logprobs=1)
    assert len(r.choices) == 2 and r.choices[0].message.content != r.choices[1].message.content
    score = [sum(t.logprob for t in c.logprobs.content) for c in r.choices]
    assert score[0] >= score[1]
    # vLLM's chat streams the search's result once it is done
    chunks = list(client.chat.completions.create(**chat, stream=True))
    texts = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert [texts[0], texts[1]] == [c.message.content for c in r.choices]
    wait_for(lambda: idle(demo_server.url))


def test_hypothesis_text_after_prompt(client, demo_server):
    # the first beam token here is " a": its leading space is kept, as in a sampled request's text
    base = dict(model="stories260k", prompt="Once upon", max_tokens=4)
    greedy = client.completions.create(**base, temperature=0).choices[0].text
    assert greedy.startswith(" ")
    beam = client.completions.create(**base, n=1, extra_body={"use_beam_search": True})
    assert beam.choices[0].text == greedy
    echoed = client.completions.create(**base, n=1, echo=True, extra_body={"use_beam_search": True})
    assert echoed.choices[0].text == "Once upon" + greedy
    chat = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "Once upon"}],
                                          max_tokens=4, n=1, extra_body={"use_beam_search": True})
    assert chat.choices[0].message.content == greedy
    wait_for(lambda: idle(demo_server.url))


def test_echo_logprobs_hold_the_prompt(client, demo_server):
    base = dict(model="stories260k", prompt="Once upon", max_tokens=3, echo=True, logprobs=1)
    sampled = client.completions.create(**base, temperature=0).choices[0]
    beam = client.completions.create(**base, n=1, extra_body={"use_beam_search": True}).choices[0]
    assert beam.text == sampled.text
    assert beam.logprobs.tokens == sampled.logprobs.tokens and beam.logprobs.text_offset == sampled.logprobs.text_offset
    assert beam.logprobs.token_logprobs[0] is None
    assert beam.logprobs.token_logprobs[1:] == pytest.approx(sampled.logprobs.token_logprobs[1:], abs=1e-4)
    wait_for(lambda: idle(demo_server.url))


def test_refused_combinations(client):
    base = dict(model="stories260k", prompt=PROMPT, max_tokens=4, n=2, logprobs=1)
    for field, value in (("stop", ["."]), ("top_p", 0.5), ("presence_penalty", 0.5), ("stop_token_ids", [13]),
                         ("logprob_token_ids", [5]), ("min_tokens", 2)):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**base, extra_body={"use_beam_search": True, field: value})
        assert info.value.body["param"] == field and "use_beam_search" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**base, stream=True, extra_body={"use_beam_search": True})
    assert info.value.body["param"] == "stream"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"use_beam_search": True, "guided_choice": ["a", "b"]})
    assert info.value.body["param"] == "guided_choice"
    with pytest.raises(openai.BadRequestError) as info:   # length_penalty asks for beam search's scoring
        client.completions.create(**base, extra_body={"length_penalty": 0.5})
    assert info.value.body["param"] == "length_penalty"
    r = client.completions.create(**base, temperature=0.7, extra_body={"use_beam_search": True, "length_penalty": 0.5,
                                                                       "top_p": 1.0})
    assert len(r.choices) == 2


def test_client_leaving_frees_blocks(demo_server):
    body = {"model": "stories260k", "prompt": PROMPT, "n": 8, "max_tokens": 400, "use_beam_search": True,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo_server.v1 + "/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=1.0)
    # between steps the server is idle: the search is gone once no step request comes for a while
    def generated() -> float:
        return metrics(demo_server.url)["generation_tokens_total"]
    before = generated()
    while True:
        time.sleep(0.5)
        now = generated()
        if now == before:
            break
        before = now
    assert idle(demo_server.url)
