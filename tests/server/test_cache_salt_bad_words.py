"""vLLM's cache_salt and bad_words with the official `openai` client (extra_body) against
`deepserve serve` on the demo model: requests share prefix-cache blocks only under the same
salt (Responses' cached_tokens, and the server's prefix-cache counters for chat and completions),
an empty salt is refused as vLLM refuses it; bad_words keeps words out of the greedy reply, on
chat and completions, streamed or not (vLLM's Responses API has no bad_words: refused there)."""
from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import API_KEY

from deepserve.server.metrics import parse_metrics

LONG = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her friends every day."
HITS = 'vllm:prefix_cache_hits_total{model_name="stories260k",engine="0"}'


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def _salt(salt):
    return {"cache_salt": salt} if salt is not None else None


def test_responses_share_cached_tokens_only_under_one_salt(client):
    def cached(salt, prompt="(responses) " + LONG):
        r = client.responses.create(model="stories260k", input=prompt, max_output_tokens=2, temperature=0,
                                    extra_body=_salt(salt))
        return r.usage.input_tokens_details.cached_tokens

    assert cached("r-1") == 0
    hits = cached("r-1")
    assert hits > 0
    assert [cached("r-2"), cached(None), cached("r-1"), cached(None)] == [0, 0, hits, hits]


def _hits(server) -> float:
    return parse_metrics(httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text)[HITS]


def _hits_of(server, calls) -> float:
    """The prefix-cache hits of these requests, from the server's counter (the engine core's
    counters come with its outputs: waited for a moment when none are seen yet)."""
    before = _hits(server)
    for call in calls:
        call()
    deadline = time.monotonic() + 5
    while _hits(server) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    return _hits(server) - before


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_chat_and_completions_share_blocks_only_under_one_salt(client, demo_server, endpoint):
    prompt = f"({endpoint}) {LONG}"   # a prefix of its own: no other test's blocks

    def ask(salt):
        if endpoint == "chat":
            return lambda: client.chat.completions.create(model="stories260k", max_tokens=2, temperature=0,
                                                          messages=[{"role": "user", "content": prompt}],
                                                          extra_body=_salt(salt))
        return lambda: client.completions.create(model="stories260k", prompt=prompt, max_tokens=2, temperature=0,
                                                 extra_body=_salt(salt))

    ask(None)()
    repeat = _hits_of(demo_server, [ask(None)])       # the hits of a repeat without salts: every full block
    assert repeat > 0
    # the same prompt under three other salts and none: only the repeated salt hits, once
    assert _hits_of(demo_server, [ask("s-1"), ask("s-2"), ask("s-1")]) == repeat
    with pytest.raises(openai.BadRequestError) as info:
        ask("")()
    assert info.value.body["param"] == "cache_salt"


def test_bad_words_keep_words_out_of_greedy_replies(client):
    def completion(**extra):
        return client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=30,
                                         temperature=0, extra_body=extra or None).choices[0].text

    def chat(**extra):
        return client.chat.completions.create(model="stories260k", max_tokens=30, temperature=0,
                                              messages=[{"role": "user", "content": "Once upon a time"}],
                                              extra_body=extra or None).choices[0].message.content

    for ask in (completion, chat):
        plain = ask()
        assert " Lily" in plain and " park" in plain
        for word in ("Lily", "park"):
            banned = ask(bad_words=[word])
            assert f" {word}" not in banned and banned != plain
    stream = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=30, temperature=0,
                                       stream=True, extra_body={"bad_words": ["Lily"], "cache_salt": "st"})
    assert "".join(c.choices[0].text for c in stream) == completion(bad_words=["Lily"])
    for bad in ([""], "Lily", [3]):
        with pytest.raises(openai.BadRequestError) as info:
            completion(bad_words=bad)
        assert info.value.body["param"] == "bad_words"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="stories260k", input="Hi", max_output_tokens=2, extra_body={"bad_words": ["x"]})
    assert info.value.body["param"] == "bad_words" and "Responses" in info.value.body["message"]
