"""Concurrency and clients that leave: 64 streams at once, 10 dropped mid-stream; the rest get
exactly their solo greedy text and afterwards no KV block and no request is left."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from conftest import API_KEY, wait_for

from deepserve.server.metrics import parse_metrics

PROMPTS = ["Once upon a time", "One day", "The cat", "Tom and Sue", "In the park", "A little bird",
           "The sun was", "Lily wanted"]
LABEL = '{model_name="stories260k",engine="0"}'


def metrics(url: str) -> dict:
    values = parse_metrics(httpx.get(url + "/metrics").text)
    return {k[len("deepserve:"):-len(LABEL)]: v for k, v in values.items() if k.endswith(LABEL)}


def idle(url: str) -> bool:
    m = metrics(url)
    return (m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0
            and m["kv_cache_usage_perc"] == 0 and m["num_free_kv_blocks"] == m["num_kv_blocks"])


@pytest.fixture(scope="module")
def solo(demo_server):
    client = openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0)
    return {p: client.completions.create(model="stories260k", prompt=p, max_tokens=24, temperature=0)
            .choices[0].text for p in PROMPTS}


def test_64_streams_10_disconnect(demo_server, solo):
    async def run_one(client, prompt: str, drop: bool):
        stream = await client.completions.create(
            model="stories260k", prompt=prompt, temperature=0, stream=True,
            max_tokens=300 if drop else 24, extra_body={"ignore_eos": drop})
        text, chunks = "", 0
        async for chunk in stream:
            text += chunk.choices[0].text
            chunks += 1
            if drop and chunks == 3:
                await stream.close()      # the client goes away mid-stream
                return None
        return text

    async def main():
        client = openai.AsyncOpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=300)
        jobs = [(PROMPTS[i % len(PROMPTS)], i % 6 == 0 and i < 60) for i in range(64)]
        assert sum(d for _, d in jobs) == 10
        results = await asyncio.gather(*(run_one(client, p, d) for p, d in jobs))
        await client.close()
        return jobs, results

    wait_for(lambda: idle(demo_server.url), timeout=20)
    before = metrics(demo_server.url)["generation_tokens_total"]   # the shared server's earlier tests
    jobs, results = asyncio.run(main())
    for (prompt, dropped), text in zip(jobs, results):
        if not dropped:
            assert text == solo[prompt], prompt
    wait_for(lambda: idle(demo_server.url), timeout=20)
    generated = metrics(demo_server.url)["generation_tokens_total"] - before
    assert generated < 64 * 24 + 10 * 300   # the dropped ones stopped early


def test_dropped_stream_frees_blocks_at_once(demo_server):
    wait_for(lambda: idle(demo_server.url), timeout=20)
    with httpx.Client(base_url=demo_server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        body = {"model": "stories260k", "prompt": "Once upon a time", "max_tokens": 480,
                "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            events = [next(lines) for _ in range(6)]
            assert sum(e.startswith("data: {") for e in events) == 3
            busy = metrics(demo_server.url)
            assert busy["num_requests_running"] == 1 and busy["kv_cache_usage_perc"] > 0
        left = time.monotonic()
    wait_for(lambda: idle(demo_server.url), timeout=10)
    assert time.monotonic() - left < 5
    generated = metrics(demo_server.url)["generation_tokens_total"]
    time.sleep(0.5)
    assert metrics(demo_server.url)["generation_tokens_total"] == generated   # nothing still running


def test_non_streamed_client_timeout_aborts(demo_server):
    wait_for(lambda: idle(demo_server.url), timeout=20)
    key = 'deepserve:request_success_total{model_name="stories260k",engine="0",finished_reason="abort"}'

    def aborted() -> float:
        return parse_metrics(httpx.get(demo_server.url + "/metrics").text).get(key, 0.0)

    before, logged = aborted(), len(demo_server.lines)
    body = {"model": "stories260k", "prompt": "One day", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo_server.url + "/v1/completions", json=body, timeout=0.2,   # 480 tokens take longer
                   headers={"Authorization": f"Bearer {API_KEY}"})
    wait_for(lambda: idle(demo_server.url), timeout=10)
    assert aborted() == before + 1
    chat = {"model": "stories260k", "messages": [{"role": "user", "content": "One day"}], "max_tokens": 480,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo_server.url + "/v1/chat/completions", json=chat, timeout=0.2,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    wait_for(lambda: idle(demo_server.url), timeout=10)
    assert aborted() == before + 2
    time.sleep(0.2)
    # a client leaving is no server error: no traceback in the log
    assert not any("Traceback" in line or "Exception" in line for line in demo_server.lines[logged:]), \
        "".join(demo_server.lines[logged:])[-2000:]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_reused_request_id(demo_server, endpoint):
    """Clients may send the same request_id at once, or retry a request they left with its id:
    each answer is the solo greedy text (not a hang, nor the left request's late tokens)."""
    wait_for(lambda: idle(demo_server.url), timeout=20)
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "One day"}]}
        text_of = lambda r: r["choices"][0]["message"]["content"]   # noqa: E731
    else:
        path, body = "/v1/completions", {"prompt": "One day"}
        text_of = lambda r: r["choices"][0]["text"]   # noqa: E731
    body = {**body, "model": "stories260k", "max_tokens": 30, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=demo_server.url, headers=headers, timeout=30) as c:
        solo = text_of(c.post(path, json=body).json())
        rid = f"retry-{endpoint}"
        with pytest.raises(httpx.ReadTimeout):   # left while generating
            c.post(path, json={**body, "request_id": rid, "max_tokens": 480, "ignore_eos": True}, timeout=0.3)
        time.sleep(0.3)
        again = c.post(path, json={**body, "request_id": rid}).json()
        assert text_of(again) == solo and again["usage"]["completion_tokens"] == 30
        assert again["id"].endswith(rid)

    async def together():
        async with httpx.AsyncClient(base_url=demo_server.url, headers=headers, timeout=30) as c:
            return await asyncio.gather(*(c.post(path, json={**body, "request_id": "same"}) for _ in range(4)))
    for r in asyncio.run(together()):
        assert r.status_code == 200 and text_of(r.json()) == solo
    wait_for(lambda: idle(demo_server.url), timeout=10)
