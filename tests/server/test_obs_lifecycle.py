"""What an operator sees while a long prompt is prefilled in chunks: /metrics follows the
engine core during steps that output no token (running request, its blocks filling up), and a
client that leaves mid-prefill gives every block back."""
from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from deepserve.server.metrics import parse_metrics
from tests.server.conftest import launch, wait_for


@pytest.fixture(scope="module")
def chunked_server():
    """Two-token prefill chunks: a 480-token prompt takes 240 steps that output nothing."""
    server = launch("--max-num-batched-tokens", "2", "--max-num-seqs", "2", "--num-gpu-blocks-override", "64")
    yield server
    server.stop()


def gauges(url: str) -> dict:
    values = parse_metrics(urllib.request.urlopen(url + "/metrics", timeout=10).read().decode())
    return {k.split("{")[0][len("vllm:"):]: v for k, v in values.items()
            if k.startswith(("vllm:num_", "vllm:kv_cache_usage_perc"))}


def test_gauges_during_a_chunked_prefill_and_a_client_gone_mid_prefill(chunked_server):
    url = chunked_server.url
    host, port = url.split("//")[1].split(":")
    prompt = {"prompt_token_ids": [1] + [403, 407, 261, 378, 290, 263] * 80}   # 481 tokens: 31 blocks
    body = json.dumps({"model": "stories260k", "prompt": prompt["prompt_token_ids"], "max_tokens": 8,
                       "stream": True}).encode()
    idle = gauges(url)
    assert idle["num_free_kv_blocks"] == idle["num_kv_blocks"] == 64 and idle["num_requests_running"] == 0
    conn = socket.create_connection((host, int(port)))
    try:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)

        # part of the prompt's blocks held: only a scrape between two of its chunks sees that
        def mid_prefill():
            g = gauges(url)
            held = g["num_kv_blocks"] - g["num_free_kv_blocks"]
            return g if g["num_requests_running"] == 1 and 0 < held < 31 else None

        seen = wait_for(mid_prefill, timeout=60, interval=0.05)
        assert seen, gauges(url)
        assert 0 < seen["kv_cache_usage_perc"] < 31 / 64
    finally:
        conn.close()   # mid-prefill: the request is aborted, its blocks freed
    back = wait_for(lambda: (lambda g: g if g["num_free_kv_blocks"] == 64 and g["num_requests_running"] == 0
                             and g["num_requests_waiting"] == 0 else None)(gauges(url)), timeout=30)
    assert back, gauges(url)
