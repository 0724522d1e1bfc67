"""Hostile and unlucky clients against a running server: each leaves the server answering, the
greedy text of a request sent afterwards unchanged, every KV block free, and no traceback in
the server's log (a client going away is no server error)."""
from __future__ import annotations

import json
import os
import socket

import httpx
import pytest
from conftest import API_KEY, launch, wait_for
from test_server_load import idle

from deepserve.server.metrics import parse_metrics

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def answered(url: str, handler: str) -> float:
    """HTTP requests on `handler` the server has finished with, whatever their status."""
    values = parse_metrics(httpx.get(url + "/metrics").text)
    return sum(v for k, v in values.items() if k.startswith("http_requests_total{") and f'handler="{handler}"' in k)


def greedy(url: str) -> str:
    body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"])
def test_half_sent_body_is_no_server_error(demo_server, path):
    """A client that sends half its body and leaves: no 'unhandled error' traceback, no 500 counted
    (vLLM's FastAPI body reading ends it without a traceback)."""
    url = demo_server.url
    solo = greedy(url)
    wait_for(lambda: idle(url), timeout=20)
    before, logged = answered(url, path), len(demo_server.lines)
    body = json.dumps({"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 8}).encode()
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), API_KEY.encode(), len(body)) + body[:len(body) // 2])
    wait_for(lambda: answered(url, path) == before + 1, timeout=10)
    assert greedy(url) == solo
    wait_for(lambda: idle(url), timeout=10)
    log = "".join(demo_server.lines[logged:])
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    values = parse_metrics(httpx.get(url + "/metrics").text)
    failed = {k: v for k, v in values.items() if k.startswith("http_requests_total{") and 'status="5xx"' in k
              and f'handler="{path}"' in k}
    assert not failed, failed


@pytest.fixture(scope="module")
def engine_thread_server():
    """The demo model with its engine in a thread of the API server (no engine-core process)."""
    os.environ["DEEPSERVE_ENGINE_CORE_PROCESS"] = "0"
    try:
        server = launch("--num-gpu-blocks-override", "256")
    finally:
        del os.environ["DEEPSERVE_ENGINE_CORE_PROCESS"]
    yield server
    server.stop()


@pytest.mark.parametrize("layout", ["demo_server", "engine_thread_server"])
def test_left_batch_of_prompt_logprobs_requests_is_dropped(request, layout):
    """Many long prompts with prompt_logprobs (each scored by a forward when added) and a client
    that leaves at once: the adds not yet made are dropped with the abort, not all made first
    (which held every other request for as long), with the engine in a core process or in a
    thread of the server."""
    url = request.getfixturevalue(layout).url
    wait_for(lambda: idle(url), timeout=20)
    key = 'deepserve:prompt_tokens_total{model_name="stories260k",engine="0"}'

    def prompt_tokens() -> float:
        return parse_metrics(httpx.get(url + "/metrics").text)[key]

    solo, before = greedy(url), prompt_tokens()
    prompt = [1] + [403, 407, 261, 378, 290, 263] * 70   # 421 tokens
    body = {"model": "stories260k", "prompt": [prompt] * 300, "max_tokens": 8, "prompt_logprobs": 5}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=1.0)
    assert greedy(url) == solo
    wait_for(lambda: idle(url), timeout=20)
    added = (prompt_tokens() - before - 4) / len(prompt)   # less greedy()'s 4-token prompt
    assert added < 150, added


def test_metrics_idle_after_clients_leave_with_queued_prompt_logprobs(demo_server):
    """A stream and a batch of prompt_logprobs requests (adds queued as work in the engine core)
    whose clients leave: /metrics turns idle with no request after them (the core went idle
    running the dropped adds, after the last step's gauges that still counted the stream)."""
    url = demo_server.url
    wait_for(lambda: idle(url), timeout=20)
    prompt = [1] + [403, 407, 261, 378, 290, 263] * 70
    stream_body = {"model": "stories260k", "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}
    batch = {"model": "stories260k", "prompt": [prompt] * 100, "max_tokens": 8, "prompt_logprobs": 5}
    with httpx.stream("POST", url + "/v1/completions", json=stream_body, headers=AUTH, timeout=60) as r:
        next(r.iter_lines())
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=batch, headers=AUTH, timeout=1.0)
    wait_for(lambda: idle(url), timeout=20)
