"""POST /v1/responses with the official `openai` client: on the demo model, the text, usage and
status of a response equal the chat endpoint's greedy answer to the same messages, streamed
and not (the SDK's event order, sequence numbers, deltas joining to the final text); fields and
items this server does not serve are refused with a 400 naming them; a client that leaves a
stream frees its KV blocks at once; an engine error mid-stream is OpenAI's `error` event. The reasoning / tool tests are in test_responses_tools.py.
"""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import API_KEY, wait_for
from test_server_load import idle, metrics

from deepserve.engine.async_llm import EngineStepError
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.server.metrics import parse_metrics
from deepserve.server.protocol_responses import ResponsesRequest
from deepserve.server.serving_responses import _stream

MODEL = "stories260k"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def chat_text(client, messages: list[dict], **kwargs) -> tuple[str, object]:
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kwargs)
    return r.choices[0].message.content, r


def test_text_equals_the_chat_answer(client):
    r = client.responses.create(model=MODEL, instructions="Once upon", input="a time", max_output_tokens=12,
                                temperature=0)
    text, chat = chat_text(client, [{"role": "system", "content": "Once upon"}, {"role": "user", "content": "a time"}],
                           max_tokens=12)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL
    assert [o.type for o in r.output] == ["message"] and r.output_text == text and len(text) > 10
    assert (r.status, r.incomplete_details.reason, r.output[0].status) == ("incomplete", "max_output_tokens",
                                                                           "incomplete")
    u = r.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (chat.usage.prompt_tokens, 12,
                                                                 chat.usage.prompt_tokens + 12)
    assert u.output_tokens_details.reasoning_tokens == 0 and u.input_tokens_details.cached_tokens >= 0
    assert (r.instructions, r.max_output_tokens, r.temperature, r.tool_choice, r.tools) == ("Once upon", 12, 0.0,
                                                                                             "auto", [])


def test_response_carries_vllms_fields(client):
    """vLLM's ResponsesResponse.from_request sets service_tier (the request's, auto by default),
    the penalties sampled with, and max_tool_calls / prompt (None here: both are refused)."""
    r = client.responses.create(model=MODEL, input="Once upon a time", max_output_tokens=2, service_tier="default",
                                extra_body={"presence_penalty": 0.5})
    dumped = r.model_dump()
    assert (r.service_tier, r.max_tool_calls, r.prompt) == ("default", None, None)
    assert (dumped["presence_penalty"], dumped["frequency_penalty"]) == (0.5, 0.0)
    assert client.responses.create(model=MODEL, input="Once", max_output_tokens=1).service_tier == "auto"


def test_input_items_become_chat_messages(client):
    """A list of items: roles (developer included), text parts, an earlier assistant answer;
    `stop` ends the response (completed), `metadata` and `user` come back."""
    items = [{"role": "developer", "content": "Once upon a time"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "there was"},
                                                             {"type": "input_text", "text": "a cat"}]},
             {"role": "assistant", "content": [{"type": "output_text", "text": "named Tom", "annotations": []}]},
             {"role": "user", "content": "One day"}]
    r = client.responses.create(model=MODEL, input=items, max_output_tokens=30, temperature=0,
                                metadata={"k": "v"}, user="u1", extra_body={"stop": ["."]})
    text, _ = chat_text(client, [{"role": "developer", "content": "Once upon a time"},
                                 {"role": "user", "content": "there was\na cat"},
                                 {"role": "assistant", "content": "named Tom"},
                                 {"role": "user", "content": "One day"}], max_tokens=30, stop=["."])
    assert r.output_text == text and r.status == "completed" and r.incomplete_details is None
    assert r.metadata == {"k": "v"} and r.user == "u1" and r.output[0].status == "completed"


def test_stream_events_join_to_the_response(client):
    kwargs = dict(model=MODEL, input="Once upon a time", max_output_tokens=30, temperature=0,
                  extra_body={"stop": ["."]})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(d.delta for d in deltas)
    item_id = events[2].item.id
    assert len(deltas) > 2 and all(d.item_id == item_id and d.output_index == 0 for d in deltas)
    assert text == events[-4].text == events[-2].item.content[0].text == whole.output_text
    assert text == chat_text(client, [{"role": "user", "content": "Once upon a time"}], max_tokens=30, stop=["."])[0]
    final = events[-1].response
    assert final.output_text == text and final.status == "completed" and final.usage.output_tokens == \
        whole.usage.output_tokens
    with client.responses.stream(**kwargs) as stream:   # the SDK's helper accumulates the same
        assert stream.get_final_response().output_text == text


def test_cut_stream_ends_completed_with_an_incomplete_response(client):
    """vLLM ends every stream with response.completed; a response cut by max_output_tokens is
    its status (incomplete), so the SDK's stream helper returns it."""
    kwargs = dict(model=MODEL, input="Once upon a time", max_output_tokens=5, temperature=0)
    events = list(client.responses.create(**kwargs, stream=True))
    assert events[-1].type == "response.completed"
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.usage.output_tokens == 5
    with client.responses.stream(**kwargs) as stream:
        got = stream.get_final_response()
    assert (got.status, got.output_text) == ("incomplete", final.output_text)


REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"include": ["message.output_text.logprobs", "file_search_call.results"]}, "include"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "top_logprobs"),
    ({"truncation": "auto"}, "truncation"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"max_tool_calls": 2}, "max_tool_calls"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "http://x"}]}, "tools[0].type"),
    ({"tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                 "environment": "linux"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),   # chat's shape
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice.name"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "5"}]}, "input[0].call_id"),
    ({"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "xyz"}]},
     "input[0].encrypted_content"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 100000}, "max_output_tokens"),
]


@pytest.mark.parametrize("fields,param", REFUSED, ids=[p for _, p in REFUSED])
def test_unsupported_fields_are_refused_by_name(demo_server, fields, param):
    body = {"model": MODEL, "input": "hi", **fields}
    r = httpx.post(demo_server.v1 + "/responses", json=body, headers=AUTH,
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError", err
    assert param.split("[")[0].split(".")[0] in err["message"]


def test_off_settings_and_the_sdk_refusal(client):
    """Fields in their "off" setting ask for nothing and pass; the SDK raises on a refusal."""
    r = client.responses.create(model=MODEL, input="Once", max_output_tokens=2, store=False, background=False,
                                truncation="disabled", include=[], service_tier="auto", parallel_tool_calls=True)
    assert r.status == "incomplete"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="Once", previous_response_id=r.id)
    assert info.value.body["param"] == "previous_response_id"


def aborted(url: str) -> float:
    key = f'deepserve:request_success_total{{model_name="{MODEL}",engine="0",finished_reason="abort"}}'
    return parse_metrics(httpx.get(url + "/metrics").text).get(key, 0.0)


def test_dropped_stream_aborts_the_request(demo_server):
    wait_for(lambda: idle(demo_server.url), timeout=20)
    before, generated = aborted(demo_server.url), metrics(demo_server.url)["generation_tokens_total"]
    body = {"model": MODEL, "input": "Once upon a time", "max_output_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", demo_server.v1 + "/responses", json=body, headers=AUTH, timeout=30) as r:
        kinds = (line for line in r.iter_lines() if line.startswith("event: "))
        assert [next(kinds) for _ in range(5)][-1] == "event: response.output_text.delta"
    wait_for(lambda: idle(demo_server.url), timeout=20)   # no request left, every KV block free
    assert aborted(demo_server.url) == before + 1
    assert metrics(demo_server.url)["generation_tokens_total"] - generated < 500


def test_non_streamed_client_timeout_aborts(demo_server):
    wait_for(lambda: idle(demo_server.url), timeout=20)
    before = aborted(demo_server.url)
    body = {"model": MODEL, "input": "One day", "max_output_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(demo_server.v1 + "/responses", json=body, timeout=0.5, headers=AUTH)
    wait_for(lambda: idle(demo_server.url), timeout=10)
    assert aborted(demo_server.url) == before + 1


def test_error_mid_stream_is_an_error_event():
    """After the first event the status line is gone: a failing engine request ends the stream
    with OpenAI's `error` event (numbered like the rest), which carries the `error` object the
    SDK raises, and no `[DONE]`."""
    async def failing(state):
        yield RequestOutput("r", None, [1], [CompletionOutput(0, "Once", [5])], False)
        raise EngineStepError("the step failed")

    errors: list[int] = []
    state = SimpleNamespace(settings=SimpleNamespace(tool_call_parser=None, retry_after_s=1),
                            metrics=SimpleNamespace(record_error=errors.append))
    params = SimpleNamespace(temperature=1.0, top_p=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    prep = SimpleNamespace(created=0, model=MODEL, params=params, top_k=None,
                           stream=failing, reasoning_parser=lambda: None, tool_mode=None, tool_name=None,
                           parallel_tool_calls=None, include_reasoning=True)

    async def frames() -> list[str]:
        return [f async for f in _stream(state, ResponsesRequest(input="x"), prep, "resp_1")]

    out = asyncio.run(frames())
    events = [json.loads(f.split("data: ", 1)[1]) for f in out]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                           "response.content_part.added", "response.output_text.delta", "error"]
    assert out[-1].startswith("event: error\n") and not any("[DONE]" in f for f in out)
    last = events[-1]
    assert last["sequence_number"] == 5 and last["message"] == "the step failed" and last["code"] == "500"
    assert last["error"]["message"] == "the step failed" and errors == [500]


def test_output_text_logprobs_count_the_tokens(client):
    """include message.output_text.logprobs: one entry per token, with its top_logprobs (the
    joined text is checked on a byte-level tokenizer, test_responses_tools.py)."""
    kwargs = dict(model=MODEL, input="Once upon a time", max_output_tokens=10, temperature=0,
                  include=["message.output_text.logprobs"], top_logprobs=2)
    r = client.responses.create(**kwargs)
    logprobs = r.output[0].content[0].logprobs
    assert len(logprobs) == r.usage.output_tokens == 10 and r.top_logprobs == 2
    assert all(len(lp.top_logprobs) == 2 and lp.logprob == pytest.approx(lp.top_logprobs[0].logprob)
               for lp in logprobs)   # greedy: the chosen token is the top one
    events = list(client.responses.create(**kwargs, stream=True))
    assert sum(len(e.logprobs) for e in events if e.type == "response.output_text.delta") == 10
