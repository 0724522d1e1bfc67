"""Streams as the official `openai` client reads them, matched with what vLLM 0.26 sends."""
from __future__ import annotations

import pytest
from conftest import API_KEY

openai = pytest.importorskip("openai")

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0)


def _by_choice(chunks) -> dict[int, list]:
    """Each chunk's one choice by its index (a client reading `chunk.choices[0]`, as OpenAI's
    and vLLM's streams allow: one choice per chunk)."""
    seen: dict[int, list] = {}
    for c in chunks:
        if not c.choices:
            continue
        assert len(c.choices) == 1, f"a chunk carries {len(c.choices)} choices: {c}"
        seen.setdefault(c.choices[0].index, []).append(c)
    return seen


def test_completions_stream_sends_one_choice_per_chunk(client):
    """Two prompts x n=2: four choices, each in chunks of its own; with continuous usage each
    chunk counts its prompt and its choice's tokens so far (vLLM's numbers), and the final usage
    chunk the request's total."""
    chunks = list(client.completions.create(
        model="stories260k", prompt=[PROMPT, "The cat"], n=2, max_tokens=4, temperature=1.0, seed=3, logprobs=0,
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    prompt_lens = [client.completions.create(model="stories260k", prompt=p, max_tokens=1).usage.prompt_tokens
                   for p in (PROMPT, "The cat")]
    per_choice = _by_choice(chunks)
    assert sorted(per_choice) == [0, 1, 2, 3]
    for index, mine in per_choice.items():
        assert mine[-1].choices[0].finish_reason == "length"
        streamed = 0
        for c in mine:
            streamed += len(c.choices[0].logprobs.tokens)
            assert c.usage.completion_tokens == streamed
            assert c.usage.prompt_tokens == prompt_lens[index // 2]
        assert streamed == 4
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == sum(prompt_lens)   # each prompt once, as vLLM


def test_chat_stream_sends_one_choice_per_chunk(client):
    """n=2 in chat: a role chunk per choice, then each choice's deltas in chunks of their own;
    the text each choice streams is the text the same seeded request gives unstreamed."""
    kwargs = dict(model="stories260k", messages=[{"role": "user", "content": PROMPT}], n=2, max_tokens=6,
                  temperature=1.0, seed=11)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    per_choice = _by_choice(chunks)
    assert sorted(per_choice) == [0, 1]
    for index, mine in per_choice.items():
        assert mine[0].choices[0].delta.role == "assistant"
        assert mine[-1].choices[0].finish_reason == "length"
        text = "".join(c.choices[0].delta.content or "" for c in mine)
        assert text == whole.choices[index].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12
