"""The demo server through the official `openai` client (sync and async) and httpx: known
greedy text, streaming, n, stop, logprobs, echo, usage, token prompts, chat through the chat
template, and the small endpoints."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from tokenizers import Tokenizer
from conftest import API_KEY, REPO

PROMPT = "Once upon a time"
# stories260k's greedy continuation (as llama2.c documents it for this model)
GREEDY_32 = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw"


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(demo_server):
    with httpx.Client(base_url=demo_server.url, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        yield c


def test_completion_greedy_text_and_usage(client):
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=32, temperature=0)
    assert r.choices[0].text == GREEDY_32
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 32, 37)
    assert r.object == "text_completion" and r.model == "stories260k"


def test_completion_stream_matches_and_reports_usage(client):
    chunks = list(client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=32,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == GREEDY_32
    assert len([c for c in chunks if c.choices]) > 5          # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32
    assert chunks[-1].usage.prompt_tokens == 5


def test_stop_string_n2_and_seeded_sampling(client):
    r = client.completions.create(model="stories260k", prompt=[PROMPT, PROMPT], max_tokens=32, temperature=0,
                                  stop=["Lily"])   # (n = 2 greedy is refused, as by vLLM)
    assert [c.text for c in r.choices] == [", there was a little girl named "] * 2
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    assert [c.index for c in r.choices] == [0, 1]
    a = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                  seed=7, top_p=0.9, extra_body={"min_p": 0.01, "top_k": 40})
    b = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                  seed=7, top_p=0.9, extra_body={"min_p": 0.01, "top_k": 40})
    assert a.choices[0].text == b.choices[0].text


def test_prompt_list_token_ids_and_echo(client, http):
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert ids == [1, 403, 407, 261, 378]
    r = client.completions.create(model="stories260k", prompt=[PROMPT, "One day"], max_tokens=8,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == GREEDY_32[:len(r.choices[0].text)]
    assert r.choices[1].text != r.choices[0].text
    assert r.usage.prompt_tokens == 5 + 3 and r.usage.completion_tokens == 16
    t = client.completions.create(model="stories260k", prompt=[ids, ids[:3]], max_tokens=8, temperature=0)
    assert t.choices[0].text == r.choices[0].text and t.usage.prompt_tokens == 8
    e = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text.startswith(PROMPT + ", there")
    # a token-id prompt echoes as vLLM decodes it (tokenizer.decode: its BOS written out)
    e = client.completions.create(model="stories260k", prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert e.choices[0].text.startswith("<s> " + PROMPT + ", there")


def test_logprobs_are_consistent(client):
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0.0 and len(top) == 3
        assert top[token] == pytest.approx(value)          # greedy: the chosen token is the top one
        assert value == pytest.approx(max(top.values()))
    s = list(client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=6, temperature=0,
                                       logprobs=3, stream=True))
    streamed = [v for c in s for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs)


def test_chat_matches_completion_of_the_rendered_prompt(client, http):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": PROMPT}]
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    ref = client.completions.create(model="stories260k", prompt=ids, max_tokens=20, temperature=0)
    r = client.chat.completions.create(model="stories260k", messages=messages, max_completion_tokens=20,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == ref.choices[0].text != ""
    assert r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 20)
    content_lp = r.choices[0].logprobs.content
    assert len(content_lp) == 20 and all(len(t.top_logprobs) == 2 for t in content_lp)
    assert content_lp[0].top_logprobs[0].logprob == pytest.approx(content_lp[0].logprob)
    chunks = list(client.chat.completions.create(model="stories260k", messages=messages, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    texts = [""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [ref.choices[0].text]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_top_logprobs_put_the_sampled_token_first(client, http):
    """vLLM's chat top_logprobs: the first top_logprobs of (the sampled token, then the others in
    rank order), the order its completions' top_logprobs dict has (sampled first, then the top k).
    A sampled token outside the top k is listed first and pushes the k-th out; the chat listed the
    top k by rank without it. Seeded sampling at temperature 1.5 takes such tokens here."""
    messages = [{"role": "user", "content": PROMPT}]
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    kw = dict(model="stories260k", max_tokens=16, temperature=1.5, seed=3)
    ref = client.completions.create(prompt=ids, logprobs=2, **kw).choices[0].logprobs
    want = [list(top)[:2] for top in ref.top_logprobs]
    assert any(top[0] != max(ref.top_logprobs[i], key=ref.top_logprobs[i].get) for i, top in enumerate(want))
    r = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **kw)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == ref.tokens
    assert [[e.token for e in t.top_logprobs] for t in content] == want
    assert [e.logprob for t in content for e in t.top_logprobs] == pytest.approx(
        [ref.top_logprobs[i][tok] for i, top in enumerate(want) for tok in top])
    chunks = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, stream=True, **kw)
    streamed = [[e.token for e in t.top_logprobs] for c in chunks for ch in c.choices
                for t in (ch.logprobs.content if ch.logprobs else [])]
    assert streamed == want


# the fields of vLLM 0.26's response models (entrypoints/openai/*/protocol.py), which its whole
# responses send, null where unset (model_dump); ChatMessage drops tool_calls when empty
VLLM_CHAT_RESPONSE = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint", "usage",
                      "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                      "ec_transfer_params", "metrics"}
VLLM_CHAT_CHOICE = {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids", "routed_experts"}
VLLM_CHAT_MESSAGE = {"role", "content", "refusal", "annotations", "audio", "function_call", "reasoning"}
VLLM_COMPLETION_RESPONSE = {"id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                            "usage", "kv_transfer_params", "ec_transfer_params", "metrics"}
VLLM_COMPLETION_CHOICE = {"index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                          "prompt_logprobs", "prompt_token_ids", "routed_experts"}
VLLM_USAGE = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
VLLM_MODEL_CARD = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"}


@pytest.mark.parametrize("extra", [{}, {"n": 2, "logprobs": True, "top_logprobs": 1}])
def test_chat_response_has_vllm_keys(http, extra):
    body = http.post("/v1/chat/completions", json={"model": "stories260k", "max_tokens": 2, **extra,
                                                    "messages": [{"role": "user", "content": PROMPT}]}).json()
    assert set(body) == VLLM_CHAT_RESPONSE and set(body["usage"]) == VLLM_USAGE
    assert all(body[k] is None for k in VLLM_CHAT_RESPONSE - {"id", "object", "created", "model", "choices",
                                                             "system_fingerprint", "usage"})
    for choice in body["choices"]:
        assert set(choice) == VLLM_CHAT_CHOICE and choice["token_ids"] is None and choice["routed_experts"] is None
        assert set(choice["message"]) == VLLM_CHAT_MESSAGE
        assert [choice["message"][k] for k in ("refusal", "annotations", "audio", "function_call")] == [None] * 4


@pytest.mark.parametrize("extra", [{}, {"n": 2, "logprobs": 1}, {"echo": True, "max_tokens": 0}])
def test_completion_response_has_vllm_keys(http, extra):
    body = http.post("/v1/completions", json={"model": "stories260k", "prompt": PROMPT, "max_tokens": 2,
                                              **extra}).json()
    assert set(body) == VLLM_COMPLETION_RESPONSE and set(body["usage"]) == VLLM_USAGE
    assert [body[k] for k in ("service_tier", "kv_transfer_params", "ec_transfer_params", "metrics")] == [None] * 4
    for choice in body["choices"]:
        assert set(choice) == VLLM_COMPLETION_CHOICE
        assert [choice[k] for k in ("token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts")] == [None] * 4
    if extra.get("echo"):   # a stream's choices are vLLM's stream choice model, which has no routed_experts
        with http.stream("POST", "/v1/completions", json={"model": "stories260k", "prompt": PROMPT, "stream": True,
                                                          **extra}) as r:
            frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert frames and all("routed_experts" not in ch for f in frames for ch in f["choices"])
    cards = http.get("/v1/models").json()["data"]
    assert cards and all(set(c) == VLLM_MODEL_CARD for c in cards)


# vLLM 0.26's stream chunks (model_dump_json(exclude_unset=True)): the keys its constructors set,
# null included. Chat: the role chunk sets prompt_token_ids and prompt_text, the token chunks
# token_ids, the finishing one stop_reason too; completions set all their choice's fields. The
# usage is a key only where it has a value (continuous usage; the last chunk, exclude_none).
VLLM_CHUNK = {"id", "object", "created", "model", "choices"}
VLLM_CHAT_ROLE_CHOICE = {"index", "delta", "logprobs", "finish_reason"}
VLLM_CHAT_TOKEN_CHOICE = VLLM_CHAT_ROLE_CHOICE | {"token_ids"}
VLLM_COMPLETION_STREAM_CHOICE = {"index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids",
                                 "token_ids"}
VLLM_STREAM_USAGE = {"prompt_tokens", "total_tokens", "completion_tokens"}
STREAM_CASES = [{}, {"logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}},
                {"n": 2, "temperature": 1.0, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
                {"return_token_ids": True}]


def stream_frames(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={"model": "stories260k", "max_tokens": 3, "stream": True, **body}) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def check_usage_keys(frames: list[dict], body: dict) -> None:
    """A usage key on every chunk with continuous usage, else on the last (usage) chunk alone."""
    opts = body.get("stream_options", {})
    last = frames[-1] if opts.get("include_usage") else None
    if last is not None:
        assert set(last) == VLLM_CHUNK | {"usage", "system_fingerprint"} and last["choices"] == []
        assert set(last["usage"]) == VLLM_STREAM_USAGE
    for f in frames[:-1] if last is not None else frames:
        assert ("usage" in f) == bool(opts.get("continuous_usage_stats"))
        assert "usage" not in f or set(f["usage"]) == VLLM_STREAM_USAGE


@pytest.mark.parametrize("body", STREAM_CASES)
def test_chat_stream_chunks_have_vllm_keys(http, body):
    body = {"messages": [{"role": "user", "content": PROMPT}], **body}
    frames = stream_frames(http, "/v1/chat/completions", body)
    check_usage_keys(frames, body)
    chunks = [f for f in frames if f["choices"]]
    n = body.get("n", 1)
    for f in chunks[:n]:
        assert set(f) - {"usage"} == VLLM_CHUNK | {"prompt_token_ids", "prompt_text"}
        assert f["prompt_text"] is None and (f["prompt_token_ids"] is not None) == ("return_token_ids" in body)
        assert set(f["choices"][0]) == VLLM_CHAT_ROLE_CHOICE and set(f["choices"][0]["delta"]) == {"role", "content"}
    assert len(chunks) > n
    for f in chunks[n:]:
        (choice,) = f["choices"]
        finished = choice["finish_reason"] is not None
        fingerprint = finished and not body.get("stream_options")
        assert set(f) - {"usage"} == VLLM_CHUNK | ({"system_fingerprint"} if fingerprint else set())
        assert set(choice) == VLLM_CHAT_TOKEN_CHOICE | ({"stop_reason"} if finished else set())
        assert (choice["token_ids"] is not None) == ("return_token_ids" in body)
        assert (choice["logprobs"] is not None) == ("logprobs" in body)


def test_chat_stream_without_parsers_sends_each_outputs_text(http):
    """vLLM's chat stream without a reasoning or tool parser: each engine output's chunk has its
    text as the delta's content, "" included (the tokens a pending stop string holds back); the
    held-back text never shows."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0, "stop": ["Lily"],
            "logprobs": True, "stream_options": {"include_usage": True}}
    frames = stream_frames(http, "/v1/chat/completions", body)
    choices = [f["choices"][0] for f in frames[1:] if f["choices"]]
    assert all(set(c["delta"]) == {"content"} for c in choices)
    assert "".join(c["delta"]["content"] for c in choices) == ", there was a little girl named "
    assert sum(len(c["logprobs"]["content"]) for c in choices) == frames[-1]["usage"]["completion_tokens"]


@pytest.mark.parametrize("body", STREAM_CASES)
def test_completion_stream_chunks_have_vllm_keys(http, body):
    body = {"prompt": PROMPT, **{k: v for k, v in body.items() if k != "top_logprobs"}}
    body["logprobs"] = 1 if body.get("logprobs") else None
    frames = stream_frames(http, "/v1/completions", body)
    check_usage_keys(frames, body)
    chunks = [f for f in frames if f["choices"]]
    assert len(chunks) >= 3 * body.get("n", 1)
    seen = set()
    for f in chunks:
        (choice,) = f["choices"]
        fingerprint = choice["finish_reason"] is not None and not body.get("stream_options")
        assert set(f) - {"usage"} == VLLM_CHUNK | ({"system_fingerprint"} if fingerprint else set())
        assert set(choice) == VLLM_COMPLETION_STREAM_CHOICE
        # the prompt's ids go with each choice's first chunk (vLLM's echo rule)
        first = choice["index"] not in seen
        seen.add(choice["index"])
        assert (choice["prompt_token_ids"] is not None) == ("return_token_ids" in body and first)
        assert (choice["token_ids"] is not None) == ("return_token_ids" in body)
        assert (choice["logprobs"] is not None) == (body["logprobs"] is not None)


def test_async_client_concurrent(demo_server):
    async def main():
        client = openai.AsyncOpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0)
        plain = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=32, temperature=0)

        async def streamed():
            stream = await client.chat.completions.create(
                model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                max_tokens=8, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        results = await asyncio.gather(plain, streamed(), streamed())
        await client.close()
        return results

    plain, s1, s2 = asyncio.run(main())
    assert plain.choices[0].text == GREEDY_32
    assert s1 == s2 != ""


def test_models_health_version_detokenize(client, http):
    assert [m.id for m in client.models.list().data] == ["stories260k"]
    assert client.models.retrieve("stories260k").model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    assert info.value.body["code"] == 404 and info.value.body["param"] == "model"
    assert http.get("/health").status_code == 200
    assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200   # vLLM's
    from deepserve import __version__
    assert http.get("/version").json() == {"version": __version__}
    assert http.post("/detokenize", json={"tokens": [403, 407, 261, 378]}).json() == {"prompt": PROMPT}
    # special tokens stay (vLLM's): /tokenize's BOS comes back from /detokenize
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    reference = Tokenizer.from_file(str(REPO / "deepserve" / "assets" / "stories260k" / "tokenizer.json")).decode(ids, skip_special_tokens=False)
    assert ids[0] == 1 and reference.startswith("<s>")
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == reference
    tok = http.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False,
                                       "return_token_strs": True}).json()
    assert tok["tokens"] == [403, 407, 261, 378] and tok["count"] == 4 and tok["max_model_len"] == 512
    assert tok["token_strs"][0] == "▁Once"
    for field, value in (("continue_final_message", True), ("add_generation_prompt", False), ("tools", [])):
        r = http.post("/tokenize", json={"prompt": PROMPT, field: value})   # chat-only: was ignored
        assert r.status_code == 400 and r.json()["error"]["param"] == field
