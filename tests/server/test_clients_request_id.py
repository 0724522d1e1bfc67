"""X-Request-Id as vLLM 0.26 reads it: the header names the response (over the body's request_id),
and with --enable-request-id-headers every answer carries it back (a new one where none came)."""
from __future__ import annotations

import re

import httpx
import pytest
from conftest import API_KEY, launch

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"model": "stories260k", "max_tokens": 2}


def test_header_names_the_response(demo_server):
    """Gateways (nginx, Envoy) add X-Request-Id: the response's id is cmpl- / chatcmpl- and it,
    streamed or not; without the header a body request_id still does."""
    tagged = {**HEADERS, "X-Request-Id": "trace-42"}
    r = httpx.post(demo_server.v1 + "/completions", json={**BODY, "prompt": "Once", "request_id": "body-1"},
                   headers=tagged, timeout=60)
    assert r.json()["id"] == "cmpl-trace-42"
    chat = {**BODY, "messages": [{"role": "user", "content": "Once"}], "stream": True}
    with httpx.stream("POST", demo_server.v1 + "/chat/completions", json=chat, headers=tagged, timeout=60) as s:
        first = next(line for line in s.iter_lines() if line.startswith("data: "))
    assert '"id": "chatcmpl-trace-42"' in first
    r = httpx.post(demo_server.v1 + "/completions", json={**BODY, "prompt": "Once", "request_id": "body-1"},
                   headers=HEADERS, timeout=60)
    assert r.json()["id"] == "cmpl-body-1"
    assert "x-request-id" not in r.headers   # only with --enable-request-id-headers


@pytest.fixture(scope="module")
def id_server():
    server = launch("--enable-request-id-headers", "--num-gpu-blocks-override", "64")
    yield server
    server.stop()


def test_request_id_headers_flag(id_server):
    r = httpx.post(id_server.v1 + "/completions", json={**BODY, "prompt": "Once"},
                   headers={"X-Request-Id": "trace-7"}, timeout=60)
    assert r.headers["x-request-id"] == "trace-7" and r.json()["id"] == "cmpl-trace-7"
    fresh = httpx.get(id_server.url + "/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh)   # uuid4().hex, as vLLM's
    refused = httpx.post(id_server.v1 + "/completions", json={**BODY, "prompt": "Once", "n": 0},
                         headers={"X-Request-Id": "trace-8"}, timeout=60)
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "trace-8"
