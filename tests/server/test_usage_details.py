"""vLLM's usage flags through the official `openai` client and httpx, on the demo model:
--enable-prompt-tokens-details (usage.prompt_tokens_details.cached_tokens of chat and
completions, streamed and not: a repeated long prompt's prefix-cache hits, whole blocks; null in
a whole response and absent from a stream without the flag, as vLLM sends them),
--enable-force-include-usage (usage on every chunk of every stream, and a last usage chunk) and
--enable-server-load-tracking (GET /load counts the generation requests in flight)."""
from __future__ import annotations

import socket

import httpx
import openai
import pytest
from conftest import API_KEY, DEMO_TEMPLATE, launch, wait_for

LONG = ("Once upon a time, there was a little girl named Lily. She liked to play in the park with her friends "
        "every day. One day she found a big red ball under a tree.")
BLOCK = 16   # the demo model's KV block size (no MLA)


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    template = tmp_path_factory.mktemp("tmpl") / "demo.jinja"
    template.write_text(DEMO_TEMPLATE)
    server = launch("--api-key", API_KEY, "--chat-template", str(template), "--num-gpu-blocks-override", "512",
                    "--enable-prompt-tokens-details", "--enable-force-include-usage",
                    "--enable-server-load-tracking")
    yield server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def _ask(client, endpoint: str, prompt: str, **kw):
    if endpoint == "chat":
        return client.chat.completions.create(model="stories260k", max_tokens=3, temperature=0,
                                              messages=[{"role": "user", "content": prompt}], **kw)
    return client.completions.create(model="stories260k", prompt=prompt, max_tokens=3, temperature=0, **kw)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_repeated_prompt_reports_cached_tokens(flagged, endpoint, stream):
    client = _client(flagged)
    prompt = f"{'Streamed' if stream else 'Whole'} {endpoint}: {LONG}"   # its own first block: no other test's

    def usage():
        if not stream:
            return _ask(client, endpoint, prompt).usage
        chunks = list(_ask(client, endpoint, prompt, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == []
        return chunks[-1].usage

    first, second = usage(), usage()
    assert first.prompt_tokens == second.prompt_tokens > 2 * BLOCK
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % BLOCK == 0
    assert cached == (second.prompt_tokens - 1) // BLOCK * BLOCK   # every full block but the last token's
    if endpoint == "chat":   # vLLM's chat also says what the request wrote to the prefix cache
        full = first.prompt_tokens // BLOCK * BLOCK
        assert first.prompt_tokens_details.created_cache_tokens == full
        assert second.prompt_tokens_details.created_cache_tokens == full - cached


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_without_the_flag_details_are_null_whole_and_absent_streamed(demo_server, endpoint):
    url = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    body = {"model": "stories260k", "max_tokens": 2, "temperature": 0}
    body.update({"messages": [{"role": "user", "content": LONG}]} if endpoint == "chat" else {"prompt": LONG})
    with httpx.Client(base_url=demo_server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        whole = http.post(url, json=body).json()
        assert "prompt_tokens_details" in whole["usage"] and whole["usage"]["prompt_tokens_details"] is None
        lines = http.post(url, json={**body, "stream": True, "stream_options": {"include_usage": True}}).text
    last = [line for line in lines.splitlines() if line.startswith("data: {")][-1]
    assert '"choices": []' in last and '"usage"' in last and "prompt_tokens_details" not in last


def test_stream_with_details_leaves_out_null_fields(flagged):
    with httpx.Client(base_url=flagged.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        text = http.post("/v1/completions", json={"model": "stories260k", "prompt": "(raw) " + LONG, "max_tokens": 2,
                                                  "stream": True}).text
        whole = http.post("/v1/completions", json={"model": "stories260k", "prompt": "(raw) " + LONG,
                                                   "max_tokens": 2}).json()
    last = [line for line in text.splitlines() if line.startswith("data: {")][-1]
    assert '"prompt_tokens_details": {"cached_tokens": 0}' in last   # vLLM's: no null fields in a stream
    hits = (whole["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK   # every full block but the last token's
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": hits, "created_cache_tokens": None,
                                                       "multimodal_tokens": None}


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_force_include_usage_puts_usage_on_every_chunk(flagged, endpoint):
    chunks = list(_ask(_client(flagged), endpoint, "(force) " + LONG, stream=True))   # no stream_options
    assert len(chunks) > 2 and all(c.usage is not None for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert [c.usage.completion_tokens for c in chunks[:-1]] == sorted(c.usage.completion_tokens for c in chunks[:-1])


def _held_request(server) -> socket.socket:
    """A completions request whose body never finishes arriving: in flight until the socket closes."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{".encode())
    return sock


def test_load_counts_requests_in_flight(flagged, demo_server):
    def load(server) -> int:
        return httpx.get(server.url + "/load", timeout=10).json()["server_load"]

    assert load(flagged) == 0
    held = [_held_request(flagged), _held_request(flagged)]
    wait_for(lambda: load(flagged) == 2)
    held.pop().close()
    wait_for(lambda: load(flagged) == 1)
    held.pop().close()
    wait_for(lambda: load(flagged) == 0)
    # without the flag /load is there and counts nothing (vLLM's)
    sock = _held_request(demo_server)
    assert load(demo_server) == 0
    sock.close()


def test_load_counts_vllms_generation_routes():
    """GET /load counts what vLLM's load_aware_call wraps: the three generation routes and a stored
    response's retrieval (which may stream a background generation) and cancel, under --root-path too."""
    import asyncio
    from types import SimpleNamespace

    from deepserve.server.app import LoadTrackingMiddleware

    state, seen = SimpleNamespace(server_load=0), {}

    async def app(scope, receive, send):
        seen[scope["path"]] = state.server_load

    tracked = LoadTrackingMiddleware(app, state)
    paths = ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/responses/resp_1",
             "/v1/responses/resp_1/cancel", "/llm/v1/completions", "/v1/models", "/health", "/tokenize"]
    for path in paths:
        asyncio.run(tracked({"type": "http", "path": path, "root_path": "/llm" if path.startswith("/llm") else ""},
                            None, None))
    assert seen == {path: int(path.startswith(("/v1/c", "/v1/r", "/llm"))) for path in paths}
    assert state.server_load == 0
