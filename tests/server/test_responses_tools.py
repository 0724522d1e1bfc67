"""POST /v1/responses with reasoning, tools and structured outputs, with the official `openai`
client, on the one-layer model with the real R1 tokenizer whose greedy output is a fixed script
(reasoning, `</think>`, a V3.1-format call of get_weather), served with --reasoning-parser
deepseek_r1 --enable-auto-tool-choice --tool-call-parser deepseek_v31 and greedy defaults:
a `reasoning` item and a `function_call` item (call_id, name, JSON arguments), streamed as
OpenAI's events; the call's output sent back as a second turn renders the prompt the chat
endpoint renders for the same conversation; tool_choice none / required / named and
text.format json_schema go through chat's grammars.
"""
from __future__ import annotations

import json

import httpx
import openai
import pydantic
import pytest
from conftest import R1_TOKENIZER
import test_server_tools as chat_tools
from test_server_tools import REASONING, SCRIPT, validate_call

from openai.types.responses import Response, ResponseStreamEvent

from deepserve.server.tool_parsers import CALLS_BEGIN

server, client = chat_tools.server, chat_tools.client   # the chat tool tests' server, one for this module

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                         "required": ["city", "unit"], "additionalProperties": False}},
         {"type": "function", "name": "add",
          "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                          "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "required": ["a", "b"], "additionalProperties": False}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
INPUT = "Weather in Paris?"


def reasoning_tokens() -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(R1_TOKENIZER / "tokenizer.json"))
    return tok.encode(SCRIPT, add_special_tokens=False).ids.index(tok.token_to_id("</think>"))


def test_reasoning_and_function_call_items(client):
    r = client.responses.create(model="tiny-r1", input=INPUT, tools=TOOLS)
    assert [o.type for o in r.output] == ["reasoning", "function_call"] and r.status == "completed"
    reasoning, call = r.output
    assert [c.text for c in reasoning.content] == [REASONING] and reasoning.id.startswith("rs_")
    assert (call.name, json.loads(call.arguments), call.status) == ("get_weather", {"city": "Paris"}, "completed")
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.output_text == ""
    assert r.usage.output_tokens_details.reasoning_tokens == reasoning_tokens() > 0
    assert r.usage.output_tokens > r.usage.output_tokens_details.reasoning_tokens
    assert [t.name for t in r.tools] == ["get_weather", "add"] and r.parallel_tool_calls is True


def test_streamed_items_equal_the_response(client):
    whole = client.responses.create(model="tiny-r1", input=INPUT, tools=TOOLS)
    events = list(client.responses.create(model="tiny-r1", input=INPUT, tools=TOOLS, stream=True))
    kinds = [e.type for e in events]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert squeezed == ["response.created", "response.in_progress",
                        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
                        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                        "response.output_item.added", "response.function_call_arguments.delta",
                        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    args = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert reasoning == REASONING and "".join(args) == whole.output[1].arguments   # deltas merge when the reader lags
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.type, e.item.status) for e in added] == [(0, "reasoning", "in_progress"),
                                                                           (1, "function_call", "in_progress")]
    assert added[1].item.name == "get_weather" and added[1].item.arguments == ""
    final = events[-1].response
    assert [o.type for o in final.output] == ["reasoning", "function_call"]
    assert final.output[1].call_id == added[1].item.call_id and final.output[1].arguments == "".join(args)
    assert final.usage.model_dump() == whole.usage.model_dump()


def test_second_turn_sends_the_call_output_back(server, client):
    """The pattern of OpenAI's function-calling guide: input += response.output, then the
    function_call_output; the prompt is the chat endpoint's for the same conversation."""
    first = client.responses.create(model="tiny-r1", input=[{"role": "user", "content": INPUT}], tools=TOOLS)
    call = first.output[1]
    conversation = [{"role": "user", "content": INPUT}, *first.output,
                    {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}]
    second = client.responses.create(model="tiny-r1", input=conversation, tools=TOOLS, max_output_tokens=3)
    messages = [{"role": "user", "content": INPUT},
                {"role": "assistant", "content": None, "reasoning_content": REASONING,
                 "tool_calls": [{"id": call.call_id, "type": "function",
                                 "function": {"name": "get_weather", "arguments": call.arguments}}]},
                {"role": "tool", "tool_call_id": call.call_id, "content": "18 C, sunny"}]
    prompt = httpx.post(server.url + "/tokenize", json={"messages": messages, "tools": CHAT_TOOLS}).json()
    assert second.usage.input_tokens == prompt["count"] > first.usage.input_tokens
    chat = client.chat.completions.create(model="tiny-r1", messages=messages, tools=CHAT_TOOLS, max_tokens=3)
    assert second.output_text == (chat.choices[0].message.content or "")


def test_tool_choice_none_required_and_named(client):
    none = client.responses.create(model="tiny-r1", input=INPUT, tools=TOOLS, tool_choice="none")
    assert [o.type for o in none.output] == ["reasoning", "message"] and none.output_text.startswith(CALLS_BEGIN)
    for choice in ("required", {"type": "function", "name": "add"}):
        r = client.responses.create(model="tiny-r1", input=INPUT, tools=TOOLS, tool_choice=choice,
                                    parallel_tool_calls=False, max_output_tokens=100, temperature=1.0,
                                    extra_body={"seed": 3})
        [call] = [o for o in r.output if o.type == "function_call"]
        validate_call(call.name, call.arguments)
        if choice != "required":
            assert call.name == "add" and r.tool_choice.name == "add"


def test_strict_tool_holds_the_call_to_its_schema(client):
    """The script's call leaves out `unit`, which get_weather requires: strict true makes the
    arguments fit (chat's structural-tag grammar)."""
    strict = [{**t, "strict": True} for t in TOOLS]
    r = client.responses.create(model="tiny-r1", input=INPUT, tools=strict, max_output_tokens=120)
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and "unit" in json.loads(call.arguments)
    validate_call(call.name, call.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_format_after_reasoning(client, stream):
    schema = {"type": "object", "properties": {"answer": {"enum": ["sunny", "rainy"]}}, "required": ["answer"],
              "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "weather", "schema": schema, "strict": True}}
    kwargs = dict(model="tiny-r1", input=INPUT, text=fmt, max_output_tokens=40)
    if stream:
        r = [e for e in client.responses.create(**kwargs, stream=True)][-1].response
    else:
        r = client.responses.create(**kwargs)
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == REASONING
    assert json.loads(r.output_text)["answer"] in ("sunny", "rainy")
    assert r.text.format.type == "json_schema" and r.text.format.name == "weather"


def test_named_tool_choice_must_name_a_tool(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny-r1", input=INPUT, tools=TOOLS,
                                tool_choice={"type": "function", "name": "nope"})
    assert info.value.body["param"] == "tool_choice"


def test_logprobs_are_the_answers_tokens(client):
    """After reasoning, the logprobs are the answer's tokens (after </think> and the blank line
    the parser drops): joined they are the text, streamed delta by delta; with tool calls the
    text is no answer, so logprobs are refused there."""
    kwargs = dict(model="tiny-r1", input=INPUT, tools=TOOLS, tool_choice="none",
                  include=["message.output_text.logprobs"], top_logprobs=1)
    r = client.responses.create(**kwargs)
    reasoning, message = r.output
    [part] = message.content
    assert "".join(lp.token for lp in part.logprobs) == part.text and part.text.startswith(CALLS_BEGIN)
    assert r.usage.output_tokens > len(part.logprobs) > 5
    events = list(client.responses.create(**kwargs, stream=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all("".join(lp.token for lp in d.logprobs) == d.delta for d in deltas) and deltas   # merged when lagging
    assert not any(getattr(e, "logprobs", None) for e in events if e.type.startswith("response.reasoning"))
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**{**kwargs, "tool_choice": "auto"})
    assert info.value.body["param"] == "include"


@pytest.mark.parametrize("extra", [{}, {"max_output_tokens": 4},
                                   {"tool_choice": "none", "include": ["message.output_text.logprobs"]}])
def test_wire_json_validates_as_the_sdk_types(server, extra):
    """The SDK builds its objects without validating: the JSON itself must fit its types (every
    required field there), the response and each stream event, whose `event:` line names its type."""
    body = {"model": "tiny-r1", "input": INPUT, "tools": TOOLS, **extra}
    Response.model_validate(httpx.post(server.v1 + "/responses", json=body, timeout=60).json())
    with httpx.stream("POST", server.v1 + "/responses", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    names, frames = lines[0::2], [json.loads(line[len("data: "):]) for line in lines[1::2]]
    assert names == [f"event: {f['type']}" for f in frames] and len(frames) > 8
    adapter = pydantic.TypeAdapter(ResponseStreamEvent)
    for frame in frames:
        adapter.validate_python(frame)
