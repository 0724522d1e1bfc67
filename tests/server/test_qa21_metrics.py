"""What an operator moving a vLLM 0.26 deployment meets on deepserve's operational routes:
POST /invocations (vLLM's SageMaker route, always served), which hands a chat body to chat
completions and a completion body to completions, and vLLM's elastic EP routes
(/scale_elastic_ep, /is_scaling_elastic_ep), served for every generating model."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from deepserve.config import EngineArgs
from deepserve.engine.llm_engine import LLMEngine
from deepserve.server.api_server import build_state
from deepserve.server.app import build_app
from deepserve.server.args import ServerArgs

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
COMPLETION = {"prompt": "Once upon", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client():
    args = EngineArgs(num_gpu_blocks_override=64)
    with TestClient(build_app(build_state(args, ServerArgs(api_key=["k"]), engine=LLMEngine(args)))) as c:
        yield c


def answer(response) -> dict:
    body = response.json()
    return {"object": body["object"], "choices": body["choices"], "usage": body["usage"]}


@pytest.mark.parametrize("body, route", [(CHAT, "/v1/chat/completions"), (COMPLETION, "/v1/completions")],
                         ids=["chat", "completion"])
def test_invocations_answers_as_the_route_of_its_body(client, body, route):
    # outside --api-key's prefixes (/v1, /v2, /inference), as vLLM's
    got = client.post("/invocations", json=body)
    assert got.status_code == 200, got.text
    want = client.post(route, json=body, headers={"Authorization": "Bearer k"})
    assert answer(got) == answer(want)
    streamed = client.post("/invocations", json={**body, "stream": True})
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1] if json.loads(e)["choices"]]
    text = "".join(c["delta"].get("content") or "" for c in chunks) if route.endswith("chat/completions") \
        else "".join(c["text"] for c in chunks)
    whole = want.json()["choices"][0]
    assert text == (whole["message"]["content"] if "message" in whole else whole["text"])


@pytest.mark.parametrize("body, message", [
    (json.dumps({"input": "Hi"}), "Cannot find suitable handler for request. Expected one of: "
                                  "['ChatCompletionRequest', 'CompletionRequest']"),
    ("[1, 2]", "Cannot find suitable handler for request."),
    ("{bad", "JSON decode error: Expecting property name enclosed in double quotes"),
    (json.dumps({"prompt": "Hi", "max_tokens": -1}), "max_tokens must be at least 1")],
    ids=["neither", "not-an-object", "bad-json", "bad-field"])
def test_invocations_refuses_what_no_route_takes(client, body, message):
    got = client.post("/invocations", content=body, headers={"Content-Type": "application/json"})
    assert got.status_code == 400
    assert got.json()["error"]["message"].startswith(message), got.text


def test_elastic_ep_routes_answer_as_vllm_without_elastic_ep(client):
    """vLLM routes both for every generating model: a scale to the size the server runs is done
    (vLLM returns at once); another size, which needs elastic EP, is refused with a 400 naming
    the flag to restart with."""
    assert client.post("/is_scaling_elastic_ep").json() == {"is_scaling_elastic_ep": False}
    same = client.post("/scale_elastic_ep", json={"new_data_parallel_size": 1})
    assert same.status_code == 200 and same.json() == {"message": "Scaled to 1 data parallel engines"}
    other = client.post("/scale_elastic_ep", json={"new_data_parallel_size": 2})
    assert other.status_code == 400 and other.json()["error"]["param"] == "new_data_parallel_size"
    assert "--data-parallel-size 2" in other.json()["error"]["message"]
    for body, message in (("{bad", "Invalid JSON format"), ("{}", "new_data_parallel_size is required"),
                          ('{"new_data_parallel_size": 0}', "new_data_parallel_size must be a positive integer"),
                          ('{"new_data_parallel_size": "2"}', "new_data_parallel_size must be a positive integer"),
                          ('{"new_data_parallel_size": 1, "drain_timeout": 0}',
                           "drain_timeout must be a positive integer")):
        got = client.post("/scale_elastic_ep", content=body, headers={"Content-Type": "application/json"})
        assert got.status_code == 400 and got.json()["error"]["message"] == message, (body, got.text)


def test_shutdown_timeout_lets_the_requests_in_flight_finish():
    """vLLM's --shutdown-timeout N (drain): on SIGTERM the streams in flight run to their end,
    a new request gets a 503, and the server exits 0 once they are done (0, vLLM's default,
    ends them at once with an error)."""
    import signal
    import threading

    import httpx
    from conftest import launch

    server = launch("--shutdown-timeout", "600")
    results, started = {}, threading.Barrier(5)

    def stream(i: int) -> None:
        body = {"prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=600) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            started.wait()
            results[i] = [first] + [line for line in lines if line.startswith("data: ")]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        started.wait(timeout=120)
        server.proc.send_signal(signal.SIGTERM)
        late = httpx.post(server.v1 + "/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        for t in threads:
            t.join(timeout=600)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    assert late.status_code == 503 and late.json()["error"]["message"] == "the server is shutting down"
    for i in range(4):
        events = results[i]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks[-1]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 200


def test_shutdown_timeout_below_zero_is_refused():
    with pytest.raises(ValueError, match="shutdown_timeout must be >= 0, got -1"):
        ServerArgs(shutdown_timeout=-1)
