"""Tool calling and reasoning-aware structured outputs end to end, with the official `openai`
client, on a one-layer model with the real R1 tokenizer whose greedy output is a fixed script:
reasoning, `</think>`, then a tool call in the V3.1 format. The server runs with
--reasoning-parser deepseek_r1 --enable-auto-tool-choice --tool-call-parser deepseek_v31 and
--generation-config pointing at temperature 0, so requests that give no temperature decode
greedily (and reproduce the script only if the defaults were applied).

Also: a tool conversation's prompt equals transformers' apply_chat_template token for token,
and the generation-config defaults (R1's 0.6 / 0.95) reach SamplingParams.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import R1_TOKENIZER, build_echo_model, launch

from deepserve.server.api_server import generation_defaults
from deepserve.server.protocol import ChatCompletionRequest
from deepserve.server.tool_parsers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

REASONING = "Need the weather."
SCRIPT = (REASONING + "</think>\n\n" + CALLS_BEGIN + CALL_BEGIN + "get_weather" + SEP + '{"city": "Paris"}'
          + CALL_END + CALLS_END)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 99},
            "b": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": False}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not R1_TOKENIZER.is_dir():
        pytest.skip(f"{R1_TOKENIZER} not found")
    folder = tmp_path_factory.mktemp("tool-r1")
    build_echo_model(folder, SCRIPT)
    gen = tmp_path_factory.mktemp("genconfig")
    (gen / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    s = launch(str(folder), "--served-model-name", "tiny-r1", "--reasoning-parser", "deepseek_r1",
               "--enable-auto-tool-choice", "--tool-call-parser", "deepseek_v31", "--generation-config", str(gen),
               "--num-gpu-blocks-override", "256")
    s.client = openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=60)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client


def test_auto_tool_call_after_reasoning(client):
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS)  # no temperature: greedy
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == REASONING and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_auto_tool_call_streamed(client):
    chunks = list(client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS, stream=True))
    calls: dict = {}
    reasoning, content, finish = "", "", None
    for c in chunks:
        if not c.choices:
            continue
        d = c.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        finish = c.choices[0].finish_reason or finish
        for tc in d.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = entry["id"] or tc.id
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
    assert (reasoning, content, finish) == (REASONING, "", "tool_calls")
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    # the call's pieces arrive in one or more chunks: a reader that lags behind the engine gets them merged
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) >= 1


def test_tool_choice_none_leaves_the_text(client):
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content.startswith(CALLS_BEGIN) and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "stop"


def validate_call(name: str, arguments: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_follows_the_schema(client, stream):
    """The grammar starts after </think>: the reasoning stays free, the arguments are forced."""
    kwargs = dict(model="tiny-r1", messages=MESSAGES, tools=TOOLS, max_tokens=60, temperature=1.0, seed=11,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if not stream:
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].message.reasoning_content == REASONING
        [call] = r.choices[0].message.tool_calls
        name, args, finish = call.function.name, call.function.arguments, r.choices[0].finish_reason
    else:
        name, args, finish = "", "", None
        for c in client.chat.completions.create(**kwargs, stream=True):
            for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                name += tc.function.name or ""
                args += tc.function.arguments or ""
            finish = (c.choices[0].finish_reason if c.choices else None) or finish
    assert name == "get_weather" and finish == "stop"
    validate_call(name, args)


def test_auto_tool_choice_holds_a_strict_tool_to_its_schema(client):
    """The script's call leaves out `unit`, which get_weather requires: with strict: true (the
    OpenAI Agents SDK's default) the grammar makes the arguments fit the schema, as OpenAI does;
    without it they stay as the model wrote them."""
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    kwargs = dict(model="tiny-r1", messages=MESSAGES, max_tokens=120)
    loose = client.chat.completions.create(tools=TOOLS, **kwargs).choices[0].message.tool_calls[0]
    assert json.loads(loose.function.arguments) == {"city": "Paris"}
    r = client.chat.completions.create(tools=strict, **kwargs)
    assert r.choices[0].message.reasoning_content == REASONING      # the grammar starts after </think>
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    validate_call(call.function.name, call.function.arguments)


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_leaves_the_tools_callable(client, stream):
    """With tools (auto) and response_format the output is the formatted answer or tool calls, as
    on OpenAI (the OpenAI Agents SDK sends both for an agent with an output type): the JSON
    grammar used to hold the whole output, so no tool could ever be called."""
    kwargs = dict(model="tiny-r1", messages=MESSAGES, tools=TOOLS, max_tokens=120, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}})
    if not stream:
        r = client.chat.completions.create(**kwargs)
        calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        calls = [(c.function.name, c.function.arguments) for c in calls or []]
    else:
        parts, finish = {}, None
        for c in client.chat.completions.create(**kwargs, stream=True):
            for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                name, args = parts.get(tc.index, ("", ""))
                parts[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
            finish = (c.choices[0].finish_reason if c.choices else None) or finish
        calls = [parts[i] for i in sorted(parts)]
    assert [(name, json.loads(args)) for name, args in calls] == [("get_weather", {"city": "Paris"})]
    assert finish == "tool_calls"


def test_forced_tool_choice_with_response_format(client):
    """A turn that must call a tool has no answer for response_format to shape: the calls come
    (OpenAI takes both; this was a 400). vLLM's guided_* fields would be overridden: refused."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       response_format=fmt, max_tokens=100, parallel_tool_calls=False)
    [call] = r.choices[0].message.tool_calls
    validate_call(call.function.name, call.function.arguments)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS, max_tokens=10,
                                       tool_choice="required", extra_body={"guided_regex": "a+"})
    assert info.value.body["param"] == "tool_choice" and "guided_regex" in info.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_calls_valid_tools(client, stream):
    for seed in range(2):
        kwargs = dict(model="tiny-r1", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=100,
                      temperature=1.0, seed=seed, parallel_tool_calls=False)
        if not stream:
            r = client.chat.completions.create(**kwargs)
            calls = [(c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
            finish = r.choices[0].finish_reason
        else:
            parts: dict = {}
            finish = None
            for c in client.chat.completions.create(**kwargs, stream=True):
                for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                    entry = parts.setdefault(tc.index, ["", ""])
                    entry[0] += tc.function.name or ""
                    entry[1] += tc.function.arguments or ""
                finish = (c.choices[0].finish_reason if c.choices else None) or finish
            calls = [tuple(parts[i]) for i in sorted(parts)]
        assert finish == "tool_calls" and len(calls) == 1
        for name, args in calls:
            validate_call(name, args)


def test_required_tool_choice_streams_the_same_calls_argument_by_argument(client):
    kwargs = dict(model="tiny-r1", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=100,
                  temperature=1.0, seed=1, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    parts: dict = {}
    for c in client.chat.completions.create(**kwargs, stream=True):
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            entry = parts.setdefault(tc.index, {"name": "", "args": [], "id": None})
            entry["name"] += tc.function.name or ""
            entry["id"] = entry["id"] or tc.id
            if tc.function.arguments:
                entry["args"].append(tc.function.arguments)
    streamed = [parts[i] for i in sorted(parts)]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole] == [
        (p["name"], json.loads("".join(p["args"]))) for p in streamed]
    assert all(p["id"] for p in streamed)
    assert max(len(p["args"]) for p in streamed) > 1      # the arguments came in several chunks


def test_structured_output_after_reasoning(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["sunny", "rainy"]}}, "required": ["answer"]}
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, max_tokens=40,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "w", "schema": schema}})
    msg = r.choices[0].message
    assert msg.reasoning_content == REASONING
    assert json.loads(msg.content)["answer"] in ("sunny", "rainy")


def test_auto_needs_the_flag_and_named_needs_a_known_tool(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"


def test_tool_conversation_prompt_equals_transformers(server):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "system", "content": "You can call tools."},
                {"role": "user", "content": "Weather in Paris and 2+3?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "5"},
                {"role": "assistant", "content": "It is sunny, 18 C; 2+3 = 5."},
                {"role": "user", "content": "Thanks!"}]
    ours = httpx.post(server.url + "/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    tok = transformers.AutoTokenizer.from_pretrained(str(R1_TOKENIZER))
    # transformers 5 drops None-valued keys, which R1's template then cannot read: "" renders
    # the same text there as None does here (the OpenAI client sends None)
    hf_messages = [dict(m, content=m["content"] or "") for m in messages]
    theirs = tok.apply_chat_template(hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs)
    assert 128806 in ours and 128810 in ours   # <｜tool▁calls▁begin｜>, <｜tool▁outputs▁begin｜>


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.95}))
    defaults = generation_defaults("auto", str(tmp_path))
    assert defaults == {"temperature": 0.6, "top_p": 0.95}
    assert generation_defaults("vllm", str(tmp_path)) == {}
    assert generation_defaults(str(tmp_path), "/nonexistent") == defaults
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES})
    params = req.sampling_params(None, None, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 0)
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES, "temperature": 0.2})
    assert req.sampling_params(None, None, defaults).temperature == 0.2
    with pytest.raises(FileNotFoundError):
        generation_defaults(str(tmp_path / "missing"), "/nonexistent")


def test_yaml_deployment_takes_the_tool_options(tmp_path):
    from deepserve.server.config_file import load_serve_config

    path = tmp_path / "serve.yaml"
    path.write_text("engine_args:\n  model: deepseek-r1\n  enable-auto-tool-choice: true\n"
                    "  tool-call-parser: deepseek_v3\n  generation-config: vllm\n  max-logprobs: 5\n")
    config = load_serve_config(str(path))
    assert config.server == {"enable_auto_tool_choice": True, "tool_call_parser": "deepseek_v3",
                             "generation_config": "vllm", "max_logprobs": 5}


def test_no_call_leaves_tool_calls_out(client):
    """Cut inside the reasoning, an auto tool choice has no call: the message has no tool_calls
    field (OpenAI and vLLM send none), not an empty list."""
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, tools=TOOLS, max_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
