"""POST /v1/messages and /v1/messages/count_tokens, Anthropic's Messages API as vLLM 0.26 serves
it, checked against Anthropic's published shapes: over the scripted R1 engine of
test_qa14_chat_agents (reasoning as a thinking block, a tool call as a tool_use block, whole and
streamed, and a tool turn rendered as the equivalent chat messages), and on the demo server
(stop_sequence, count_tokens against /tokenize, Anthropic's error object)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest
from conftest import API_KEY
from test_qa14_chat_agents import MESSAGES, ScriptedLLM, load_tokenizer, r1_call

from deepserve.engine.async_llm import EngineStepError
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.server.app import build_app
from deepserve.server.metrics import ServerMetrics
from deepserve.server.protocol_anthropic import MessagesRequest
from deepserve.server.serving_anthropic import _stream
from deepserve.server.serving_common import ServerSettings, ServerState
from deepserve.server.tool_parsers import CALLS_BEGIN, CALLS_END

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def scripted(script: str):
    """An httpx client of the app over ScriptedLLM writing `script` (R1's tokenizer and template,
    --reasoning-parser deepseek_r1, --enable-auto-tool-choice --tool-call-parser deepseek_v3)."""
    engine = ScriptedLLM(load_tokenizer("deepseek-r1"), script)
    settings = ServerSettings(served_model_names=["m"], model_path="deepseek-r1", reasoning_parser="deepseek_r1",
                              tool_call_parser="deepseek_v3", enable_auto_tool_choice=True)
    state = ServerState(llm=engine, settings=settings, metrics=ServerMetrics("m", lambda: {}))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)), base_url="http://app")
    client.engine = engine
    return client


def events_of(text: str) -> list[dict]:
    """The SSE stream's events, each checked to carry its type on the `event:` line too."""
    out = []
    for frame in text.strip().split("\n\n"):
        name, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        out.append(event)
    return out


def blocks_of(events: list[dict]) -> list[dict]:
    """The content blocks the stream's events build (Anthropic's accumulation rules)."""
    blocks: list[dict] = []
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == len(blocks)
            blocks.append(dict(e["content_block"], partial=""))
        elif e["type"] == "content_block_delta":
            block, delta = blocks[e["index"]], e["delta"]
            key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial",
                   "signature_delta": "signature"}[delta["type"]]
            block[key] = block.get(key, "") + delta[{"input_json_delta": "partial_json"}.get(delta["type"], key)]
    for block in blocks:
        partial = block.pop("partial")
        if block["type"] == "tool_use":
            block["input"] = json.loads(partial)
    return blocks


async def whole_and_streamed(client, body: dict) -> tuple[dict, list[dict]]:
    whole = (await client.post("/v1/messages", json=body)).json()
    streamed = await client.post("/v1/messages", json={**body, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    return whole, events_of(streamed.text)


def test_reasoning_is_a_thinking_block_whole_and_streamed():
    client = scripted("The user greets.</think>\n\nHello there.")
    body = {"model": "m", "max_tokens": 64, "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}]}
    whole, events = asyncio.run(whole_and_streamed(client, body))
    assert [b["type"] for b in whole["content"]] == ["thinking", "text"]
    assert whole["content"][0]["thinking"] == "The user greets." and whole["content"][1]["text"] == "Hello there."
    assert (whole["type"], whole["role"], whole["model"], whole["stop_reason"], whole["stop_sequence"]) == \
        ("message", "assistant", "m", "end_turn", None) and whole["id"].startswith("msg_")
    assert [e["type"] for e in events][:2] == ["message_start", "content_block_start"]
    assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
    streamed = blocks_of(events)
    assert [(b["type"], b.get("thinking"), b.get("text")) for b in streamed] == \
        [(b["type"], b.get("thinking"), b.get("text")) for b in whole["content"]]
    assert streamed[0]["signature"] and whole["content"][0]["signature"]
    start, delta = events[0]["message"], events[-2]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    # usage: the rendered prompt's tokens (the system message before the user's), the reply's tokens
    tok = client.engine.tokenizer
    prompt = client.engine.prompts[-1]
    assert prompt.startswith(tok.bos_token + "Be brief.") and "Hi" in prompt
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    n_reply = len(tok.encode("The user greets.</think>\n\nHello there.", add_special_tokens=False)) + 1   # + EOS
    assert whole["usage"] == {"input_tokens": n_prompt, "output_tokens": n_reply}
    assert start["usage"] == {"input_tokens": n_prompt, "output_tokens": 0} and start["content"] == []
    assert delta["usage"] == whole["usage"]


def test_tool_call_is_a_tool_use_block_whole_and_streamed():
    script = ("Need the weather.</think>\n\nLet me check.\n\n" + CALLS_BEGIN
              + r1_call("get_weather", '{"city": "Paris"}') + CALLS_END)
    client = scripted(script)
    body = {"model": "m", "max_tokens": 200, "tools": [WEATHER], "messages": MESSAGES}
    whole, events = asyncio.run(whole_and_streamed(client, body))
    assert [b["type"] for b in whole["content"]] == ["thinking", "text", "tool_use"]
    call = whole["content"][2]
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris"}) and call["id"].startswith("toolu_")
    assert whole["stop_reason"] == "tool_use" and events[-2]["delta"]["stop_reason"] == "tool_use"
    streamed = blocks_of(events)
    assert [(b["type"], b.get("text"), b.get("name"), b.get("input")) for b in streamed] == \
        [(b["type"], b.get("text"), b.get("name"), b.get("input")) for b in whole["content"]]


def test_a_tool_turn_renders_as_the_chat_messages_do():
    """An assistant tool_use and the user's tool_result render the prompt the equivalent chat
    messages render (vLLM's conversion), and count_tokens counts it."""
    client = scripted("Done.</think>\n\nIt is sunny.")
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                               {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                "input": {"city": "Paris"}}]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                           "content": [{"type": "text", "text": "sunny"}]}]}]
    chat = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}]
    tool = {"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                             "parameters": WEATHER["input_schema"]}}

    async def ask():
        r = await client.post("/v1/messages", json={"model": "m", "max_tokens": 8, "tools": [WEATHER],
                                                    "messages": turns})
        await client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 8, "tools": [tool],
                                                        "messages": chat})
        counted = await client.post("/v1/messages/count_tokens", json={"model": "m", "tools": [WEATHER],
                                                                       "messages": turns})
        return r.json(), counted.json()
    reply, counted = asyncio.run(ask())
    ours, theirs = client.engine.prompts[-2:]
    assert ours == theirs and "sunny" in ours
    assert reply["content"][1:] == [{"type": "text", "text": "It is sunny."}]
    assert counted["input_tokens"] == reply["usage"]["input_tokens"] == \
        len(client.engine.tokenizer.encode(ours, add_special_tokens=False))


def test_a_final_assistant_message_is_a_prefill():
    """Anthropic's rule: the reply continues the final assistant message, so the prompt ends with
    its text, no new assistant turn opened after it (vLLM opens one)."""
    client = scripted("done</think>\n\n 42.")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, the answer is"}]
    r = asyncio.run(client.post("/v1/messages", json={"model": "m", "max_tokens": 16, "messages": turns}))
    assert r.status_code == 200
    assert client.engine.prompts[-1].endswith("<｜Assistant｜>Sure, the answer is")


@pytest.mark.parametrize("body, param_in_message", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": MESSAGES, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"messages": MESSAGES, "kv_transfer_params": {"a": 1}}, "kv_transfer_params"),
    ({"messages": MESSAGES, "system": [{"type": "image", "source": {}}]}, "system[0]"),
    ({"messages": MESSAGES, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
])
def test_refusals_are_anthropic_errors(body, param_in_message):
    client = scripted("x")
    r = asyncio.run(client.post("/v1/messages", json={"model": "m", "max_tokens": 8, **body}))
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert param_in_message in err["error"]["message"]


@pytest.fixture(scope="module")
def http(demo_server):
    return httpx.Client(base_url=demo_server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def test_stop_sequence_and_counts_on_the_demo_server(http):
    """On the real engine: a stop sequence ends the reply with stop_reason stop_sequence naming
    it (Anthropic's rule), streamed as not; count_tokens equals /tokenize of the same chat
    messages; an unknown model is Anthropic's not_found_error."""
    body = {"model": "stories260k", "max_tokens": 30, "temperature": 0, "stop_sequences": [" was"],
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1;"}, {"type": "text", "text": "Once"}],
            "messages": [{"role": "user", "content": " upon a time"}]}
    whole = http.post("/v1/messages", json=body).json()
    assert whole["content"] == [{"type": "text", "text": ", there"}]
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("stop_sequence", " was")
    events = events_of(http.post("/v1/messages", json={**body, "stream": True}).text)
    assert blocks_of(events) == whole["content"]
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": " was"}
    chat = [{"role": "system", "content": "Once"}, {"role": "user", "content": " upon a time"}]
    tokens = http.post("/tokenize", json={"model": "stories260k", "messages": chat}).json()["tokens"]
    counted = http.post("/v1/messages/count_tokens", json={"model": "stories260k", "system": body["system"],
                                                          "messages": body["messages"]}).json()
    assert counted["input_tokens"] == whole["usage"]["input_tokens"] == len(tokens)
    # a final assistant message is a prefill: the reply continues it (Anthropic's rule)
    prefill = {"model": "stories260k", "max_tokens": 6, "temperature": 0,
               "messages": [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": ", there"}]}
    continued = http.post("/v1/messages", json=prefill).json()["content"][0]["text"]
    plain = http.post("/v1/completions", json={"model": "stories260k", "prompt": "Once upon a time, there",
                                               "max_tokens": 6, "temperature": 0}).json()["choices"][0]["text"]
    assert continued == plain and continued.startswith(" was")
    r = http.post("/v1/messages", json={**body, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_an_engine_error_mid_stream_is_an_error_event():
    """Once message_start is sent the status line is gone: a failing engine request ends the
    stream with Anthropic's `error` event (its error object), no message_stop."""
    async def failing(state):
        yield RequestOutput("r", None, [1], [CompletionOutput(0, "Once", [5])], False)
        raise EngineStepError("the step failed")

    errors: list[int] = []
    state = SimpleNamespace(settings=SimpleNamespace(tool_call_parser=None, retry_after_s=1,
                                                     enable_prompt_tokens_details=False),
                            metrics=SimpleNamespace(record_error=errors.append))
    prep = SimpleNamespace(model="m", prompt_ids=[1, 2], stream=failing, reasoning_parser=lambda: None,
                           tool_mode=None, tool_name=None, parallel_tool_calls=None, include_reasoning=True)
    req = MessagesRequest(model="m", max_tokens=4, messages=[{"role": "user", "content": "x"}])

    async def frames() -> str:
        return "".join([f async for f in _stream(state, req, prep, "msg_1")])

    events = events_of(asyncio.run(frames()))
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1]["error"] == {"type": "api_error", "message": "the step failed"} and errors == [500]
