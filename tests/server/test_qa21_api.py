"""What an agent built on the official `openai` client meets on /v1/chat/completions, compared
with vLLM 0.26's server: the turn after tool results, and request bodies vLLM refuses.
"""
from __future__ import annotations

import asyncio
import json
import math
import types

import httpx
import openai
import pydantic
import pytest
from conftest import DEMO_TEMPLATE, launch
from test_qa14_chat_agents import MESSAGES, TOOLS, TOKENIZERS, r1_call, serve, whole_and_streamed

from deepserve.engine.grammar import GrammarCompiler
from deepserve.server.tool_parsers import CALLS_BEGIN, CALLS_END

CALLED = [{"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("answer, content, calls", [
    ("It is sunny in Paris.", "It is sunny in Paris.", []),
    (CALLS_BEGIN + r1_call("add", '{"a": 1}') + CALLS_END, None, [("add", '{"a": 1}')])], ids=["answer", "call"])
def test_turn_after_tool_results_splits_its_reasoning(tokenizer, answer, content, calls):
    """R1's templates end a prompt after tool results with no think tag (no generation prompt,
    no <think>). vLLM's deepseek_r1 parser takes the output to start in its reasoning unless
    the prompt closed it, so the model's `...</think>` is split there, whole and streamed, and a
    call after it is a call."""
    client = serve(tokenizer, "Sunny, so say so.</think>\n\n" + answer)
    whole, (reasoning, streamed, deltas, finish, _) = asyncio.run(whole_and_streamed(
        client, model="m", messages=MESSAGES + CALLED, tools=TOOLS))
    assert "<think>" not in client.engine.prompts[-1].split("sunny, 21 C")[-1]
    assert whole.message.reasoning_content == reasoning == "Sunny, so say so."
    assert whole.message.content == content and streamed == (content or "")
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []] == deltas == calls
    assert whole.finish_reason == finish == ("tool_calls" if calls else "stop")


@pytest.mark.parametrize("escape", ["\\ud800", "a\\udfffb", "\\ud83d\\u0041"])
def test_lone_surrogate_escape_is_a_400_that_says_so(escape):
    """A JSON string with half a surrogate pair: Python's json (vLLM's FastAPI) takes it and
    vLLM's tokenizer refuses the text, a 400; here the JSON parser refuses it, a 400 whose
    message names the lone surrogate. A whole pair is a character."""
    client = serve("deepseek-r1", "Hi.</think>\n\nHello.")

    async def post(text: str):
        body = '{"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "%s"}]}' % text
        return await client._client.post("/v1/chat/completions", content=body.encode(),
                                         headers={"content-type": "application/json"})
    bad, pair = asyncio.run(post(escape)), asyncio.run(post("\\ud83d\\ude00"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] is None
    message = bad.json()["error"]["message"]
    assert "half a UTF-16 surrogate pair" in message and "encodes no Unicode character at line 1 column" in message
    assert pair.status_code == 200 and "\U0001F600" in client.engine.prompts[-1]


class City(pydantic.BaseModel):
    name: str


class Trip(pydantic.BaseModel):
    to: City
    stops: list[City]


def with_grammars(client):
    """The scripted engine given xgrammar over its tokenizer, as the server's engine compiles
    specs; the sampling params of each request are kept in `client.params`."""
    tok = client.engine.tokenizer
    compiler = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids)
    client.engine.engine = types.SimpleNamespace(grammar_compiler=lambda: compiler)
    client.params, generate = [], client.engine.generate

    def kept(prompt, params, request_id):
        client.params.append(params)
        return generate(prompt, params, request_id)
    client.engine.generate = kept
    return client


def test_required_calls_of_tools_with_nested_models():
    """tool_choice required with tools whose parameters are pydantic models holding models
    (openai.pydantic_function_tool writes `$defs` and `#/$defs/City`): the calls' array schema
    holds each tool's parameters under its root, so their $defs go to the root (vLLM's), and the
    model's calls are what its grammar takes. Two tools defining one name differently: vLLM's 400."""
    xgr = pytest.importorskip("xgrammar")
    tools = [openai.pydantic_function_tool(Trip), openai.pydantic_function_tool(City, name="visit")]
    calls = [{"name": "Trip", "parameters": {"to": {"name": "Rome"}, "stops": [{"name": "Pisa"}]}},
             {"name": "visit", "parameters": {"name": "Rome"}}]
    client = with_grammars(serve("deepseek-r1", "Plan.</think>\n\n" + json.dumps(calls)))
    reply = asyncio.run(client.chat.completions.create(model="m", messages=MESSAGES, tools=tools,
                                                       tool_choice="required")).choices[0]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in reply.message.tool_calls] == [
        (c["name"], c["parameters"]) for c in calls]
    matcher = xgr.GrammarMatcher(client.params[-1].guided.compiled)
    assert all(matcher.accept_token(t) for t in client.engine.tokenizer.encode(json.dumps(calls), False))
    assert matcher.accept_token(client.engine.tokenizer.eos_token_id)

    other = {"type": "function", "function": {"name": "other", "parameters": {
        "type": "object", "properties": {"c": {"$ref": "#/$defs/City"}}, "$defs": {"City": {"type": "integer"}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        asyncio.run(client.chat.completions.create(model="m", messages=MESSAGES, tools=tools + [other],
                                                   tool_choice="required"))
    assert err.value.body["message"] == "Tool definition 'City' has multiple schemas, which is not supported."
    assert err.value.body["param"] == "tools"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model served with vLLM's --max-logprobs -1 (no cap)."""
    template = tmp_path_factory.mktemp("tmpl") / "demo.jinja"
    template.write_text(DEMO_TEMPLATE)
    server = launch("--max-logprobs", "-1", "--chat-template", str(template))
    yield server
    server.stop()


def test_whole_vocabulary_logprobs(demo):
    """vLLM's -1 for logprobs / top_logprobs: every token of the vocabulary (512 for the demo
    model) at each position, under --max-logprobs -1 (vLLM's "no cap"); completions' echo with
    logprobs 512 lists the prompt's the same way (completions' logprobs takes no -1: vLLM's 400).
    Chat's top_logprobs takes -1 as vLLM's does; below it is a 400."""
    client = openai.OpenAI(base_url=demo.v1, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    # tokens named by id: many tokens' texts are alike (bytes, special tokens), and the legacy format keys by text
    whole = client.completions.create(model=model, prompt="Once upon", max_tokens=2, logprobs=512, echo=True,
                                      extra_body={"return_tokens_as_token_ids": True})
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="Once upon", max_tokens=2, logprobs=-1, echo=True)
    assert err.value.body["param"] == "logprobs"
    tops = whole.choices[0].logprobs.top_logprobs
    assert tops[0] is None and [len(t) for t in tops[1:]] == [512] * (len(tops) - 1)
    assert all(abs(math.log(sum(math.exp(v) for v in t.values()))) < 1e-3 for t in tops[1:])
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Once"}], max_tokens=2,
                                          logprobs=True, top_logprobs=-1)
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [512, 512]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Once"}], max_tokens=2,
                                       logprobs=True, top_logprobs=-2)
    assert err.value.body["param"] == "top_logprobs"


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_empty_structural_tag_is_a_400(demo, endpoint):
    """structured_outputs.structural_tag "" is no JSON: vLLM's 400, answered at once (the
    compiler's error names the kind of an empty spec as of any other; an exception its worker
    thread's future cannot carry, StopIteration, would leave the request waiting)."""
    body = {"max_tokens": 3, "structured_outputs": {"structural_tag": ""}}
    if endpoint == "completions":
        r = httpx.post(f"{demo.v1}/completions", json={**body, "prompt": "Once"}, timeout=30)
    else:
        r = httpx.post(f"{demo.v1}/chat/completions", json={**body, "messages": [{"role": "user", "content": "Once"}]},
                       timeout=30)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "structured_outputs"
    assert error["message"].startswith("the structural_tag structured-output spec does not compile: not JSON")


@pytest.mark.parametrize("in_reasoning", [False, True])
def test_completions_grammar_waits_for_the_reasoning_the_prompt_left_open(in_reasoning):
    """/v1/completions with a structured output on a server with a reasoning parser: as vLLM's
    engine, each prompt's grammar holds from </think> on unless the prompt closed the reasoning
    (R1's chat prompt opened it, a prompt without a tag leaves it to the output), and from the
    first token with vLLM's enable_in_reasoning."""
    client = serve("deepseek-r1", '{"a": 1}', grammar_in_reasoning=in_reasoning)
    seen, generate = [], client.engine.generate

    def recording(prompt, params, request_id):
        seen.append((prompt["prompt"], params.guided.start_after_token))
        return generate(prompt, params, request_id)
    client.engine.generate = recording
    prompts = ["<｜User｜>Hi<｜Assistant｜><think>\n", "Hi", "<think>\nHm.</think>\n\n"]
    asyncio.run(client.completions.create(model="m", prompt=prompts, max_tokens=8,
                                          extra_body={"response_format": {"type": "json_object"}}))
    think_end = client.engine.tokenizer.tok.token_to_id("</think>")
    expected = [None] * 3 if in_reasoning else [think_end, think_end, None]
    assert sorted(seen) == sorted(zip(prompts, expected))
