"""Request bodies as clients other than the `openai` SDK write them, matched with what vLLM 0.26
takes."""
from __future__ import annotations

import httpx
import pytest
from conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.v1}/{path}", json=body, headers=HEADERS, timeout=60)


@pytest.mark.parametrize("path,body", [
    ("completions", {"prompt": "Once upon a time", "echo": None, "logprobs": None}),
    ("chat/completions", {"messages": [{"role": "user", "content": "Once upon a time"}], "logprobs": None}),
])
def test_null_asks_for_the_default(demo_server, path, body):
    """Clients that fill every field they know send null for the ones the user left (OpenAI's
    API declares n, the penalties, stream, logprobs and echo nullable; vLLM takes them): null is
    the default, here one unstreamed greedy choice."""
    body = {"model": "stories260k", "max_tokens": 4, "temperature": 0, **body}
    want = post(demo_server, path, body).json()
    nulls = {"n": None, "presence_penalty": None, "frequency_penalty": None, "stream": None, "seed": None,
             "stop": None, "top_p": None, "user": None}
    got = post(demo_server, path, {**body, **nulls})
    assert got.status_code == 200, got.text
    got = got.json()
    assert len(got["choices"]) == 1 and got["usage"] == want["usage"]
    text = lambda r: r["choices"][0].get("text") or r["choices"][0]["message"]["content"]   # noqa: E731
    assert text(got) == text(want)


def test_null_for_a_required_field_is_still_refused(demo_server):
    r = post(demo_server, "chat/completions", {"model": "stories260k", "messages": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


VLLM_TOO_LONG = ("This model's maximum context length is 512 tokens. However, you requested {out} output tokens and "
                 "your prompt contains {n} input tokens, for a total of {total} tokens. Please reduce the "
                 "length of the input prompt or the number of requested output tokens.")


def test_prompt_over_the_context_has_vllms_message(demo_server):
    """vLLM 0.26's words and parameter (its renderer's: clients match them to shorten the prompt
    and retry), with OpenAI's code: prompt + max_tokens past the context names input_tokens, with
    no field in the message; max_tokens alone past it names the field sent."""
    r = post(demo_server, "completions", {"model": "stories260k", "prompt": [1] + [400] * 599, "max_tokens": 5})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": VLLM_TOO_LONG.format(out=5, n=600, total=605),
                                 "type": "BadRequestError", "param": "input_tokens", "code": 400}
    r = post(demo_server, "completions", {"model": "stories260k", "prompt": [1] * 500, "max_tokens": 13})
    err = r.json()["error"]
    assert (err["message"], err["param"]) == (VLLM_TOO_LONG.format(out=13, n=500, total=513), "input_tokens")
    messages = [{"role": "user", "content": "Once upon a time " * 200}]
    n = len(httpx.post(f"{demo_server.url}/tokenize", json={"messages": messages}, headers=HEADERS).json()["tokens"])
    for tokens in ({}, {"max_completion_tokens": 3}):
        r = post(demo_server, "chat/completions", {"model": "stories260k", "messages": messages, **tokens})
        out = tokens.get("max_completion_tokens", 0)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens"
        assert r.json()["error"]["message"] == VLLM_TOO_LONG.format(out=out, n=n, total=n + out)
    r = post(demo_server, "chat/completions", {"model": "stories260k", "messages": messages[:1], "max_tokens": 513})
    assert r.json()["error"] == {"message": "max_tokens=513 cannot be greater than max_model_len=512. Please request "
                                            "fewer output tokens.",
                                 "type": "BadRequestError", "param": "max_tokens", "code": 400}


def test_min_tokens_past_the_room_without_max_tokens(demo_server):
    """A chat request without max_tokens asks for the room its prompt leaves (vLLM's server): a
    min_tokens past it is refused in SamplingParams' words, one that fits runs to the context's
    end, as vLLM's. (A completion's max_tokens null is 16.)"""
    messages = [{"role": "user", "content": "Once upon a time " * 115}]
    n = len(httpx.post(f"{demo_server.url}/tokenize", json={"messages": messages}, headers=HEADERS).json()["tokens"])
    room = 512 - n
    assert 0 < room < 64
    body = {"model": "stories260k", "messages": messages}
    r = post(demo_server, "chat/completions", {**body, "min_tokens": room + 1})
    assert r.json()["error"] == {"message": f"min_tokens must be less than or equal to max_tokens={room}, "
                                            f"got {room + 1}.",
                                 "type": "BadRequestError", "param": "min_tokens", "code": 400}
    r = post(demo_server, "chat/completions", {**body, "min_tokens": room})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == room and r.json()["choices"][0]["finish_reason"] == "length"


def test_responses_take_vllms_penalties_and_a_null_stream(demo_server):
    """vLLM's Responses API takes presence_penalty and frequency_penalty (they were ignored with a
    warning): a Responses request's text is the chat request's with the same penalties (greedy),
    which is not the unpenalized one; stream null is unstreamed."""
    def responses(**fields):
        body = {"model": "stories260k", "input": "Once upon a time", "max_output_tokens": 60, "temperature": 0,
                **fields}
        r = post(demo_server, "responses", body)
        assert r.status_code == 200, r.text
        return r.json()["output"][-1]["content"][0]["text"]

    def chat(**fields):
        body = {"model": "stories260k", "messages": [{"role": "user", "content": "Once upon a time"}],
                "max_tokens": 60, "temperature": 0, **fields}
        return post(demo_server, "chat/completions", body).json()["choices"][0]["message"]["content"]

    penalties = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
    assert responses(**penalties) == chat(**penalties) != chat()
    assert responses(stream=None) == chat()
    bad = post(demo_server, "responses", {"model": "stories260k", "input": "Once", "presence_penalty": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "presence_penalty"


def test_text_content_parts_as_vllm_reads_them(demo_server):
    """vLLM renders input_text / output_text (the Responses API's names, which clients reuse in
    chat), refusal and thinking parts as text, and plain strings in the list; any other part is a
    400 naming its type (it was a 500 "ValueError")."""
    def tokens(*parts):
        body = {"model": "stories260k", "messages": [{"role": "user", "content": list(parts)}]}
        r = httpx.post(f"{demo_server.url}/tokenize", json=body, headers=HEADERS)
        return r.status_code, r.json()
    status, want = tokens({"type": "text", "text": "Once upon"}, {"type": "text", "text": "a time"})
    assert status == 200
    assert tokens({"type": "input_text", "text": "Once upon"}, {"type": "output_text", "text": "a time"}) == (200, want)
    assert tokens({"type": "refusal", "refusal": "Once upon"}, {"type": "thinking", "thinking": "a time"}) == (200, want)
    # vLLM's content list takes plain strings as text parts, and drops a text or refusal part
    # without its text (the strings were a 400; the empty part added a newline)
    assert tokens("Once upon", {"type": "text", "text": "a time"}) == (200, want)
    assert tokens({"type": "text"}, "Once upon", {"type": "refusal", "refusal": None}, "a time") == (200, want)
    for path in ("chat/completions", "tokenize"):
        url = f"{demo_server.v1}/{path}" if path != "tokenize" else f"{demo_server.url}/tokenize"
        r = httpx.post(url, headers=HEADERS, json={"model": "stories260k", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "'input_image'" in err["message"]
