"""vLLM's logprob_token_ids through the official `openai` client (extra_body) on the demo model:
each generated position's top_logprobs are the sampled token's and then exactly the named ids'
(chat's list, completions' dict), streamed or not, with the values the model's top-k logprobs
give those ids; vLLM's validation (logprobs needed, no echo-only, vocabulary, 128 at most);
refused on /v1/responses, whose vLLM API has no such field."""
from __future__ import annotations

import openai
import pytest
from conftest import API_KEY


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference(client):
    """The first position's sampled token and its three most likely tokens' logprobs, by id."""
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=3,
                                  extra_body={"return_tokens_as_token_ids": True})
    top = r.choices[0].logprobs.top_logprobs[0]
    return r.choices[0].logprobs.tokens[0], {int(k.split(":")[1]): v for k, v in top.items()}


@pytest.fixture(scope="module")
def chat_reference(client):
    """The same for the chat prompt (its template's text tokenizes apart from the plain prompt's)."""
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=1, temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"return_tokens_as_token_ids": True})
    item = r.choices[0].logprobs.content[0]
    return item.token, {int(t.token.split(":")[1]): t.logprob for t in item.top_logprobs}


def _listed(reference) -> list[int]:
    """The ids asked for: the top three in reverse, and the sampled one again (one entry)."""
    sampled, top = reference
    return sorted(top, key=top.get) + [int(sampled.split(":")[1])]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_top_logprobs_are_the_sampled_then_the_named_ids(client, chat_reference, stream):
    reference = chat_reference
    ids = _listed(reference)
    kw = dict(model="stories260k", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0,
              logprobs=True, extra_body={"logprob_token_ids": ids, "return_tokens_as_token_ids": True})
    if stream:
        content = [c for chunk in client.chat.completions.create(stream=True, **kw) if chunk.choices
                   and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        names = [t.token for t in item.top_logprobs]
        assert names[0] == item.token and item.top_logprobs[0].logprob == item.logprob
        assert names == list(dict.fromkeys([item.token] + [f"token_id:{t}" for t in ids]))
    # the first position is the reference's: same sampled token, and its values for the named ids
    first = {int(t.token.split(":")[1]): t.logprob for t in content[0].top_logprobs}
    assert content[0].token == reference[0]
    for tid, value in reference[1].items():
        assert first[tid] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_top_logprobs_are_the_sampled_then_the_named_ids(client, reference, stream):
    ids = _listed(reference)
    kw = dict(model="stories260k", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
              extra_body={"logprob_token_ids": ids, "return_tokens_as_token_ids": True})
    if stream:
        chunks = [c.choices[0].logprobs for c in client.completions.create(stream=True, **kw) if c.choices]
        tokens = [t for lp in chunks if lp for t in lp.tokens]
        tops = [t for lp in chunks if lp for t in lp.top_logprobs]
    else:
        lp = client.completions.create(**kw).choices[0].logprobs
        tokens, tops = lp.tokens, lp.top_logprobs
    assert len(tokens) == len(tops) == 4
    for token, top in zip(tokens, tops):
        assert list(top) == list(dict.fromkeys([token] + [f"token_id:{t}" for t in ids]))
    assert tokens[0] == reference[0]
    for tid, value in reference[1].items():
        assert tops[0][f"token_id:{tid}"] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_refused_as_vllm_refuses_it(client, endpoint):
    def ask(ids, **kw):
        body = {"logprob_token_ids": ids}
        if endpoint == "chat":
            return client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                                                  max_tokens=2, extra_body=body, **kw)
        return client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=2, extra_body=body, **kw)

    logprobs = {"logprobs": True} if endpoint == "chat" else {"logprobs": 1}
    for ids, kw, message in (([5], {}, "needs logprobs"), ([512], logprobs, "outside the vocabulary"),
                             (list(range(129)), logprobs, "at most 128"), ([-1], logprobs, ">= 0")):
        with pytest.raises(openai.BadRequestError) as info:
            ask(ids, **kw)
        assert info.value.body["param"] == "logprob_token_ids" and message in info.value.body["message"]
    # more ids than --max-logprobs (20) is fine: their limit is vLLM's 128
    out = ask(list(range(30)), **logprobs)
    assert out.choices[0].finish_reason == "length"
    if endpoint == "completions":
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                      extra_body={"logprob_token_ids": [5]})
        assert info.value.body["param"] == "logprob_token_ids"


def test_refused_on_responses(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="stories260k", input=PROMPT, max_output_tokens=2,
                                extra_body={"logprob_token_ids": [5]})
    assert info.value.body["param"] == "logprob_token_ids"
