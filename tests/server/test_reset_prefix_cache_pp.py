"""POST /reset_prefix_cache?reset_running_requests=true on a PP=2 server while requests stream
(a micro-batch is then always in flight): success, as vLLM's, and every stream still ends
with the tokens it gets alone, every KV block free afterwards."""
from __future__ import annotations

import json
import threading

import httpx
from conftest import launch, wait_for
from test_server_load import idle

PROMPTS = ["Once upon a time", "One day", "The cat", "Tom and Sue"]


def completion(url: str, prompt: str, started: threading.Event | None = None) -> list[int]:
    body = {"model": "stories260k", "prompt": prompt, "max_tokens": 150, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    ids: list[int] = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
                if started is not None and len(ids) >= 5:
                    started.set()
    return ids


def test_reset_running_requests_with_micro_batches_in_flight(monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    server = launch("--pipeline-parallel-size", "2", "--block-size", "4", timeout=180)
    try:
        url = server.url
        alone = [completion(url, p) for p in PROMPTS]
        got: dict[int, list[int]] = {}
        started = threading.Event()
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, completion(url, PROMPTS[i], started)))
                   for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        assert started.wait(60)
        answers = [httpx.post(url + "/reset_prefix_cache?reset_running_requests=true", timeout=60).json()
                   for _ in range(3)]
        for t in threads:
            t.join(120)
        assert answers == [{"success": True}] * 3
        assert [got[i] for i in range(len(PROMPTS))] == alone
        wait_for(lambda: idle(url), timeout=30)
    finally:
        server.stop()
