"""The Responses API's store (--enable-responses-api-store, vLLM's VLLM_ENABLE_RESPONSES_API_STORE)
with the official `openai` client on the demo model: responses kept and retrieved,
previous_response_id continuing a conversation exactly as the chat endpoint answers the whole
conversation (instructions not carried over), background responses polled to the end and
cancelled (the engine request aborted, its KV blocks freed), the store's bound, and 404s. Without
the store, the fields stay refused by name.
"""
from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import API_KEY, DEMO_TEMPLATE, launch, wait_for
from test_server_load import idle, metrics

from deepserve.config import EngineArgs
from deepserve.engine.async_llm import EngineDeadError, EngineStepError
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.server.api_server import run_server
from deepserve.server.args import STORE_ENV, ServerArgs
from deepserve.server.metrics import parse_metrics
from deepserve.server.errors import APIError
from deepserve.server.protocol_responses import ResponsesRequest, chat_messages
from deepserve.server.responses_store import ResponseStore, StoredResponse
from deepserve.server.serving_responses import _run_background

MODEL = "stories260k"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_STORED = 4


@pytest.fixture(scope="module")
def store_server(tmp_path_factory):
    template = tmp_path_factory.mktemp("tmpl") / "demo.jinja"
    template.write_text(DEMO_TEMPLATE)
    server = launch("--api-key", API_KEY, "--chat-template", str(template), "--enable-responses-api-store",
                    "--responses-store-max-size", str(MAX_STORED))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(store_server):
    return openai.OpenAI(base_url=store_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def chat(client, messages: list[dict], max_tokens: int):
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens)
    return r.choices[0].message.content, r.usage.prompt_tokens


def test_stored_and_continued(client):
    r1 = client.responses.create(model=MODEL, instructions="Lily", input="Once upon a time", max_output_tokens=8,
                                 temperature=0)
    assert r1.store is True and r1.previous_response_id is None   # store defaults to true, as OpenAI's
    got = client.responses.retrieve(r1.id)
    assert (got.id, got.output_text, got.usage.input_tokens, got.instructions) == (r1.id, r1.output_text,
                                                                                   r1.usage.input_tokens, "Lily")
    r2 = client.responses.create(model=MODEL, input=[{"role": "user", "content": " One day"}], max_output_tokens=8,
                                 temperature=0, previous_response_id=r1.id)
    # the chat endpoint's answer to the whole conversation, without r1's instructions
    turns = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": r1.output_text},
             {"role": "user", "content": " One day"}]
    text, prompt_tokens = chat(client, turns, 8)
    assert r2.previous_response_id == r1.id
    assert (r2.output_text, r2.usage.input_tokens) == (text, prompt_tokens)
    # a chain: the third turn sees both earlier exchanges, and its own instructions
    r3 = client.responses.create(model=MODEL, instructions="Tom", input=" The end", max_output_tokens=6,
                                 temperature=0, previous_response_id=r2.id)
    turns += [{"role": "assistant", "content": r2.output_text}, {"role": "user", "content": " The end"}]
    assert (r3.output_text, r3.usage.input_tokens) == chat(client, [{"role": "system", "content": "Tom"}, *turns], 6)


def test_store_false_and_streamed(client):
    kept_not = client.responses.create(model=MODEL, input="One day", max_output_tokens=3, store=False)
    assert kept_not.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept_not.id)
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.create(model=MODEL, input="x", previous_response_id=kept_not.id)
    assert info.value.body["param"] == "previous_response_id"
    events = list(client.responses.create(model=MODEL, input="The cat", max_output_tokens=5, temperature=0,
                                          stream=True))
    last = events[-1].response
    assert last.store is True and client.responses.retrieve(last.id).output_text == last.output_text != ""


def test_unknown_ids_and_routes(client, store_server):
    for call in (lambda: client.responses.retrieve("resp_missing"), lambda: client.responses.cancel("resp_missing")):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.body["param"] == "response_id" and "resp_missing" in info.value.body["message"]
    kept = client.responses.create(model=MODEL, input="Once", max_output_tokens=2)
    url = f"{store_server.v1}/responses/{kept.id}"
    assert httpx.delete(url, headers=AUTH).status_code == 405            # vLLM serves no DELETE
    assert httpx.get(url + "/input_items", headers=AUTH).status_code == 404   # nor input_items
    for query, param in (("stream=true", "stream"), ("starting_after=3", "starting_after"),
                         ("stream=true&starting_after=x", "starting_after"), ("include_obfuscation=true",
                                                                               "include_obfuscation")):
        r = httpx.get(f"{url}?{query}", headers=AUTH)   # no events kept for a response made without background
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert httpx.get(f"{url}?stream=false", headers=AUTH).json()["id"] == kept.id
    with pytest.raises(openai.BadRequestError) as info:   # only background responses are cancelled
        client.responses.cancel(kept.id)
    assert info.value.body["param"] == "response_id"
    for fields, param in (({"background": True, "store": False}, "background"),
                          ({"conversation": "conv_1"}, "conversation")):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=MODEL, input="Once", **fields)
        assert info.value.body["param"] == param


def test_background_polled_to_the_end(client):
    solo = client.responses.create(model=MODEL, input="Tom and Sue", max_output_tokens=16, temperature=0,
                                   store=False)
    r = client.responses.create(model=MODEL, input="Tom and Sue", max_output_tokens=16, temperature=0,
                                background=True)
    assert (r.status, r.background, r.output, r.usage) == ("queued", True, [], None)
    done = wait_for(lambda: (got := client.responses.retrieve(r.id)).status not in ("queued", "in_progress")
                    and got, timeout=30)
    assert (done.status, done.output_text, done.usage.output_tokens) == ("incomplete", solo.output_text, 16)
    assert client.responses.cancel(r.id).status == "incomplete"   # a finished one comes back as it is
    follow = client.responses.create(model=MODEL, input=" Then", max_output_tokens=4, temperature=0,
                                     previous_response_id=r.id)
    turns = [{"role": "user", "content": "Tom and Sue"}, {"role": "assistant", "content": done.output_text},
             {"role": "user", "content": " Then"}]
    assert (follow.output_text, follow.usage.input_tokens) == chat(client, turns, 4)


def test_background_stream_resumed(client):
    """A background stream left after three events goes on; GET ?stream=true&starting_after=2
    gives the rest, numbered on, and the deltas of both join to the stored response's text."""
    solo = client.responses.create(model=MODEL, input="In the park", max_output_tokens=12, temperature=0,
                                   store=False)
    stream = client.responses.create(model=MODEL, input="In the park", max_output_tokens=12, temperature=0,
                                     background=True, stream=True)
    first = [next(iter(stream)) for _ in range(3)]
    stream.close()
    response_id = first[0].response.id
    assert [e.sequence_number for e in first] == [0, 1, 2] and first[0].response.background
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=2))
    assert [e.sequence_number for e in rest] == list(range(3, 3 + len(rest)))
    assert rest[-1].type == "response.completed" and rest[-1].response.status == "incomplete"
    deltas = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    kept = client.responses.retrieve(response_id)
    assert deltas == kept.output_text == solo.output_text and kept.status == "incomplete"
    again = list(client.responses.retrieve(response_id, stream=True))   # from the start, whole
    assert [e.type for e in again[:3]] == [e.type for e in first] and len(again) == 3 + len(rest)


def aborted(url: str) -> float:
    key = f'deepserve:request_success_total{{model_name="{MODEL}",engine="0",finished_reason="abort"}}'
    return parse_metrics(httpx.get(url + "/metrics").text).get(key, 0.0)


def test_background_cancel_aborts_the_engine_request(client, store_server):
    url = store_server.url
    wait_for(lambda: idle(url), timeout=20)
    before, generated = aborted(url), metrics(url)["generation_tokens_total"]
    r = client.responses.create(model=MODEL, input="Once upon a time", max_output_tokens=480, background=True,
                                extra_body={"ignore_eos": True, "request_id": "long-one"})
    wait_for(lambda: metrics(url)["num_requests_running"] == 1, timeout=60)   # slow on a loaded machine
    with pytest.raises(openai.BadRequestError) as info:   # its output is not there yet
        client.responses.create(model=MODEL, input="x", previous_response_id=r.id)
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:   # its id is taken while it runs
        client.responses.create(model=MODEL, input="x", extra_body={"request_id": r.id[len("resp_"):]})
    assert info.value.body["param"] == "request_id"
    assert client.responses.cancel(r.id).status == "cancelled"
    wait_for(lambda: idle(url), timeout=10)   # no request left, every KV block free
    assert aborted(url) == before + 1
    assert metrics(url)["generation_tokens_total"] - generated < 480
    assert client.responses.retrieve(r.id).status == "cancelled"


def test_background_stream_cancelled(client, store_server):
    url = store_server.url
    wait_for(lambda: idle(url), timeout=20)
    before = aborted(url)
    stream = client.responses.create(model=MODEL, input="Lily wanted", max_output_tokens=480, background=True,
                                     stream=True, extra_body={"ignore_eos": True})
    events = iter(stream)
    response_id = next(events).response.id
    assert [next(events).type for _ in range(4)][-1] == "response.output_text.delta"   # generating
    assert client.responses.cancel(response_id).status == "cancelled"
    rest = list(events)   # the stream ends, without a last response event
    assert not any(e.type.startswith("response.") and hasattr(e, "response") for e in rest)
    wait_for(lambda: idle(url), timeout=10)
    assert aborted(url) == before + 1
    assert client.responses.retrieve(response_id).status == "cancelled"


def test_the_store_is_bounded(client):
    ids = [client.responses.create(model=MODEL, input="Once", max_output_tokens=1).id for _ in range(MAX_STORED + 2)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[1])   # the oldest dropped
    assert [client.responses.retrieve(i).id for i in ids[2:]] == ids[2:]


def test_store_drops_finished_before_running():
    async def main():
        store = ResponseStore(2)
        running = asyncio.create_task(asyncio.sleep(60))
        store.put("a", StoredResponse({"status": "in_progress", "output": []}, [], running))
        store.put("b", StoredResponse({"status": "completed", "output": []}, []))
        store.put("c", StoredResponse({"status": "completed", "output": []}, []))
        assert store.get("a") is not None and store.get("b") is None and len(store) == 2
        store.put("d", StoredResponse({"status": "queued", "output": []}, []))   # c, the one finished, goes
        assert store.get("c") is None and not running.cancelled()
        store.put("e", StoredResponse({"status": "queued", "output": []}, []))   # all running: the oldest goes
        await asyncio.sleep(0)
        assert store.get("a") is None and running.cancelled()   # the oldest running one, cancelled

    asyncio.run(main())


@pytest.mark.parametrize("error, status, code, level", [
    (EngineStepError("the step failed"), 500, "500", logging.ERROR),
    (EngineDeadError("the server is shutting down"), 503, "503", logging.WARNING)])
def test_a_failed_background_response_says_why(error, status, code, level, caplog):
    """An engine error in a background generation: the stored response is failed with OpenAI's
    error object, logged as an error unless the engine stopped (a server shutting down)."""
    async def failing(state):
        yield RequestOutput("r", None, [1], [CompletionOutput(0, "Once", [5])], False)
        raise error

    errors: list[int] = []
    state = SimpleNamespace(settings=SimpleNamespace(tool_call_parser=None, retry_after_s=1),
                            metrics=SimpleNamespace(record_error=errors.append))
    prep = SimpleNamespace(stream=failing)
    kept = StoredResponse({"id": "resp_1", "status": "queued", "output": []}, [])
    with caplog.at_level(logging.WARNING, logger="deepserve"):
        asyncio.run(_run_background(state, ResponsesRequest(input="x", background=True), prep, kept))
    assert kept.response["status"] == "failed" and errors == [status]
    assert kept.response["error"] == {"code": code, "message": str(error)}
    assert [r.levelno for r in caplog.records if "resp_1" in r.getMessage()] == [level]


def test_conversation_of_a_stored_response():
    output = [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
              {"type": "message", "content": [{"type": "output_text", "text": "Hi", "annotations": []}]},
              {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}]
    kept = StoredResponse({"status": "completed", "output": output}, [{"type": "message", "role": "user",
                                                                       "content": "Hello"}])
    assert kept.conversation() == [
        {"type": "message", "role": "user", "content": "Hello"},
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "role": "assistant", "content": "Hi"},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}]


def test_a_tool_call_continued_by_id():
    """A stored response's function call, continued with its output as the only new input: the
    chat messages hold the call and its result; instructions are the new request's only."""
    kept = StoredResponse({"status": "completed", "output": [
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "add", "arguments": '{"a": 2}',
         "status": "completed"}]}, [{"type": "message", "role": "user", "content": "2 + 2?"}])
    req = ResponsesRequest(input=[{"type": "function_call_output", "call_id": "call_1", "output": "4"}],
                           instructions="Be brief", previous_response_id="resp_1")
    assert chat_messages(req, kept.conversation()) == [
        {"role": "system", "content": "Be brief"}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"}]
    with pytest.raises(APIError, match=r"input\[0\].call_id"):   # without the history the call is unknown
        chat_messages(req)


def test_vllm_env_var_and_one_api_server(monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert ServerArgs().responses_store_size() == 0
    assert ServerArgs(enable_responses_api_store=True, responses_store_max_size=7).responses_store_size() == 7
    monkeypatch.setenv(STORE_ENV, "1")
    assert ServerArgs().responses_store_size() == 1000
    monkeypatch.setenv(STORE_ENV, "yes")
    with pytest.raises(ValueError, match=STORE_ENV):
        ServerArgs()
    with pytest.raises(ValueError, match="responses_store_max_size"):
        ServerArgs(responses_store_max_size=0)
    monkeypatch.setenv(STORE_ENV, "0")
    with pytest.raises(ValueError, match="--api-server-count 1"):   # each process would keep its own
        run_server(EngineArgs(api_server_count=2), ServerArgs(enable_responses_api_store=True))


def test_without_the_store_the_fields_are_refused(demo_server):
    c = openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)
    for field, value in (("store", True), ("previous_response_id", "resp_1"), ("background", True)):
        with pytest.raises(openai.BadRequestError) as info:
            c.responses.create(model=MODEL, input="Once", max_output_tokens=2, **{field: value})
        assert info.value.body["param"] == field and "--enable-responses-api-store" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        c.responses.retrieve("resp_1")
    assert "--enable-responses-api-store" in info.value.body["message"]
