"""What an agent framework sees from /v1/chat/completions with the official `openai` client,
on each real tokenizer and chat template (DeepSeek-R1, R1-Distill-Qwen, R1-Distill-Llama): tool
calls cut short, reasoning hidden with include_reasoning false, logprobs beside tool calls.

The app runs in this process over a scripted engine (`ScriptedLLM`): it writes a fixed text
token by token through the real tokenizer and detokenizer, so the parsers see exactly what a
model writing that text would give them, tool-call markers that the distilled models' tokenizers
split into many tokens included (the chain model of conftest.py needs every token unique).
"""
from __future__ import annotations

import asyncio
import copy
import functools
import json
from typing import Optional

import httpx
import openai
import pytest
from conftest import SHARED

from deepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from deepserve.engine.tokenizer import Tokenizer
from deepserve.server.app import build_app
from deepserve.server.metrics import ServerMetrics
from deepserve.server.serving_common import ServerSettings, ServerState
from deepserve.server.tool_parsers import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

TOKENIZERS = ["deepseek-r1", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def r1_call(name: str, arguments: str) -> str:
    return CALL_BEGIN + "function" + SEP + name + "\n```json\n" + arguments + "\n```" + CALL_END


class ScriptedLLM:
    """AsyncLLM's interface over a fixed output: `script`'s tokens then EOS, one token a step,
    cut at max_tokens (finish_reason "length"); each token's logprob entry lists it first."""

    def __init__(self, tokenizer: Tokenizer, script: str):
        self.tokenizer, self.script = tokenizer, script
        self.max_model_len, self.vocab_size = 4096, tokenizer.vocab_size
        self.prompts: list[str] = []     # the rendered prompt of each request

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 0) -> None: ...

    def check_can_accept(self) -> None: ...

    async def generate(self, prompt, params, request_id):
        tok = self.tokenizer
        self.prompts.append(prompt["prompt"])
        ids = (tok.encode(self.script, add_special_tokens=False) + [tok.eos_token_id])[:params.max_tokens]
        texts = [tok.decode_stream(prompt["prompt_token_ids"], params.skip_special_tokens) for _ in range(params.n)]
        for k, token in enumerate(ids):
            last = k == len(ids) - 1
            for text in texts:
                if token not in tok.eos_token_ids:
                    text.add(token)
            logprobs = None
            if params.logprobs is not None:
                logprobs = [{t: Logprob(-0.5 * rank, rank, tok.token_text(t)) for rank, t in
                             enumerate([ids[j], 100, 101][:params.logprobs + 1], start=1)} for j in range(k + 1)]
            finish = ("stop" if token in tok.eos_token_ids else "length") if last else None
            yield RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"],
                                [CompletionOutput(i, text.text, ids[:k + 1], logprobs=logprobs, finish_reason=finish)
                                 for i, text in enumerate(texts)], last)
            await asyncio.sleep(0)


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str) -> Tokenizer:
    folder = SHARED / "tokenizers" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    return Tokenizer(folder)


def serve(tokenizer: str, script: str, template: Optional[str] = None,
          parser: str = "deepseek_v3", **settings) -> openai.AsyncOpenAI:
    """The app over ScriptedLLM (`client.engine`), served as "m" with --reasoning-parser
    deepseek_r1 --enable-auto-tool-choice --tool-call-parser `parser` (and --chat-template
    `template`; `settings`: other ServerSettings); an openai client bound to it."""
    tok = copy.copy(load_tokenizer(tokenizer))
    tok.chat_template = template or tok.chat_template
    settings = ServerSettings(served_model_names=["m"], model_path=tokenizer, reasoning_parser="deepseek_r1",
                              tool_call_parser=parser, enable_auto_tool_choice=True, **settings)
    engine = ScriptedLLM(tok, script)
    state = ServerState(llm=engine, settings=settings, metrics=ServerMetrics("m", lambda: {}))
    transport = httpx.ASGITransport(app=build_app(state))
    client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="unused", max_retries=0,
                                http_client=httpx.AsyncClient(transport=transport, base_url="http://app"))
    client.engine = engine
    return client


async def whole_and_streamed(client: openai.AsyncOpenAI, **kwargs):
    """(the response's first choice, what the stream's chunks add up to: reasoning, content,
    [(name, arguments)], finish_reason, logprob tokens)."""
    whole = (await client.chat.completions.create(**kwargs)).choices[0]
    reasoning, content, calls, finish, tokens = "", "", {}, None, []
    async for chunk in await client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            finish = choice.finish_reason or finish
            tokens += [lp.token for lp in (choice.logprobs.content if choice.logprobs else [])]
            for tc in delta.tool_calls or []:
                call = calls.setdefault(tc.index, ["", ""])
                call[0] += tc.function.name or ""
                call[1] += tc.function.arguments or ""
    return whole, (reasoning, content, [tuple(c) for _, c in sorted(calls.items())], finish, tokens)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@pytest.mark.parametrize("cut", ["in the arguments", "before the closing marker", "in the second call"])
def test_call_cut_by_max_tokens_is_a_call_whole_and_streamed(tokenizer, cut):
    """max_tokens ends the output inside a call: the stream has sent its name and arguments by
    then, and the whole response has the same call (arguments as far as they got), finish
    "length", as OpenAI's. (It used to come back as content holding the raw markers.)"""
    script = ("Need the weather.</think>\n\n" + CALLS_BEGIN + r1_call("get_weather", '{"city": "Paris"}') + "\n"
              + r1_call("add", '{"a": 1, "b": 2}') + CALLS_END)
    end = {"in the arguments": script.index('Paris"}'), "before the closing marker": script.index("\n```<"),
           "in the second call": script.index('2}')}[cut]
    client = serve(tokenizer, script)
    max_tokens = len(load_tokenizer(tokenizer).encode(script[:end], add_special_tokens=False))
    whole, (reasoning, content, calls, finish, _) = asyncio.run(
        whole_and_streamed(client, model="m", messages=MESSAGES, tools=TOOLS, max_tokens=max_tokens))
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert got == calls and got and got[0][0] == "get_weather"
    assert len(got) == (2 if cut == "in the second call" else 1)
    assert '{"city": "Paris"}'.startswith(got[0][1]) and got[0][1].startswith('{"city": ')
    if cut != "in the arguments":
        assert got[0][1] == '{"city": "Paris"}'
    assert whole.finish_reason == finish == "length"
    assert whole.message.reasoning_content == reasoning == "Need the weather."
    assert whole.message.content is None and content == ""


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_required_call_cut_by_max_tokens_whole_and_streamed(tokenizer):
    script = 'Two calls.</think>\n\n[{"name": "get_weather", "parameters": {"city": "Paris"}}, ' \
             '{"name": "add", "parameters": {"a": 1, "b": 2}}]'
    client = serve(tokenizer, script)
    max_tokens = len(load_tokenizer(tokenizer).encode(script[:script.index("2}")], add_special_tokens=False))
    whole, (_, content, calls, finish, _) = asyncio.run(whole_and_streamed(
        client, model="m", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=max_tokens))
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [name for name, _ in got] == [name for name, _ in calls] == ["get_weather", "add"]
    assert json.loads(got[0][1]) == json.loads(calls[0][1]) == {"city": "Paris"}
    assert got[1][1] == calls[1][1] and calls[1][1].startswith('{"a": 1')   # as far as it got
    assert whole.finish_reason == finish == "length" and content == ""


@pytest.mark.parametrize("field", [{"logprobs": True}, {"logprobs": True, "top_logprobs": 2},
                                   {"extra_body": {"return_token_ids": True}}])
@pytest.mark.parametrize("stream", [False, True])
def test_hidden_reasoning_is_not_shown_token_by_token(field, stream):
    """include_reasoning false hides the reasoning; the reply's tokens (logprobs, token ids)
    would list it, so they are left out, as vLLM 0.26 does (the prompt's ids stay); the answer
    comes. (It was a 400 naming the field, which vLLM answers.)"""
    client = serve("deepseek-r1", "The secret plan.</think>\n\nHello.")
    field = dict(field)
    extra = {**field.pop("extra_body", {}), "include_reasoning": False}

    async def ask():
        r = await client.chat.completions.create(model="m", messages=MESSAGES, stream=stream, extra_body=extra,
                                                 **field)
        return [c async for c in r] if stream else r
    got = asyncio.run(ask())
    choices = [c.choices[0] for c in got if c.choices] if stream else got.choices
    text = "".join((c.delta.content or "") for c in choices) if stream else choices[0].message.content
    assert text == "Hello." and all(c.logprobs is None for c in choices)
    assert all(c.model_dump().get("token_ids") is None for c in choices)   # vLLM's: null, or left out of a chunk
    dumped = "".join(c.model_dump_json() for c in got) if stream else got.model_dump_json()
    assert "secret" not in dumped and "reasoning_content" not in dumped
    if not stream:   # vLLM's ChatMessage: reasoning null when hidden
        assert got.choices[0].message.model_dump()["reasoning"] is None
    else:
        assert all(getattr(c.delta, "reasoning", None) is None for c in choices)
    if "return_token_ids" in extra:   # the prompt's ids are no reasoning
        first = got[0] if stream else got
        assert first.model_dump()["prompt_token_ids"] == client.engine.tokenizer.encode(
            client.engine.prompts[-1], add_special_tokens=False)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_logprobs_beside_reasoning_and_calls_agree_streamed_and_whole(tokenizer):
    """One logprob entry per generated token, the same streamed and whole, spelling the whole
    output (reasoning, the calls' markers, EOS) while the parsers split it."""
    script = "Check.</think>\n\nOne moment." + CALLS_BEGIN + r1_call("get_weather", '{"city": "Paris"}') + CALLS_END
    client = serve(tokenizer, script)
    whole, (reasoning, content, calls, finish, tokens) = asyncio.run(whole_and_streamed(
        client, model="m", messages=MESSAGES, tools=TOOLS, logprobs=True, top_logprobs=2))
    listed = [lp.token for lp in whole.logprobs.content]
    assert listed == tokens and len(listed) == len(load_tokenizer(tokenizer).encode(script, False)) + 1
    assert all(len(lp.top_logprobs) == 2 for lp in whole.logprobs.content)
    if tokenizer == "deepseek-r1":   # its markers are single tokens, spelt whole
        assert "".join(listed) == script + "<｜end▁of▁sentence｜>"
    assert (reasoning, content, calls, finish) == ("Check.", "One moment.",
                                                   [("get_weather", '{"city": "Paris"}')], "tool_calls")
    assert whole.message.content == "One moment." and whole.finish_reason == "tool_calls"


# a template given inline (--chat-template takes a file or the text), longer than a file name
# can be, that lists the tools in the system prompt and strips reasoning from past turns
INLINE_TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}You can call these functions, writing <｜tool▁calls▁begin｜> first:"
    "{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ (m['content'] or '').split('</think>')[-1] }}"
    "<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def test_inline_chat_template_longer_than_a_file_name():
    """--chat-template TEXT: a template longer than a file name may be (255 bytes) is the
    template (asking the file system about it raised ENAMETOOLONG, and the server died at start)."""
    from types import SimpleNamespace

    from deepserve.server.api_server import load_chat_template

    assert len(INLINE_TOOLS_TEMPLATE.encode()) > 255
    folder = SHARED / "tokenizers" / "deepseek-r1"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    engine = SimpleNamespace(tokenizer=Tokenizer(folder))
    load_chat_template(engine, INLINE_TOOLS_TEMPLATE)
    tok = Tokenizer(folder, chat_template=INLINE_TOOLS_TEMPLATE)
    for t in (engine.tokenizer, tok):
        assert t.chat_template == INLINE_TOOLS_TEMPLATE
        text = t.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
        assert '"name": "get_weather"' in text and text.endswith("<｜User｜>Weather in Paris?<｜Assistant｜><think>\n")


# reads every assistant turn's content as a string and writes a call's arguments with tojson, as
# vLLM's example tool templates do (vLLM hands templates the arguments as a dict)
STRING_CONTENT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<｜Assistant｜>{{ c }}{% for t in m['tool_calls'] or [] %}"
    "[{{ t['function']['name'] }} {{ t['function']['arguments'] | tojson }}]{% endfor %}<｜end▁of▁sentence｜>"
    "{% elif m['role'] == 'tool' %}<｜tool▁output▁begin｜>{{ m['content'] }}<｜tool▁output▁end｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_tool_results_turn_with_each_template(tokenizer):
    """An agent's second turn: its first reply (tool calls, content None, as the client returns
    it) and the tool results go back. The model's own template renders the calls (R1-Distill's
    test `content is none`); a template that reads content as a string (vLLM's example tool
    templates, written for vLLM, which sends "" for a missing content) gets "" rather than a 400,
    and its `arguments | tojson` writes the arguments' JSON, not a JSON string holding it."""
    first = "<think>\nNeed the weather.</think>\n\n" + CALLS_BEGIN + r1_call("get_weather", '{"city": "Paris"}') + CALLS_END
    for template in (None, STRING_CONTENT_TEMPLATE):
        client = serve(tokenizer, first, template)
        reply = asyncio.run(client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS)).choices[0]
        [call] = reply.message.tool_calls
        history = MESSAGES + [reply.message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        assert "content" not in history[1]
        client.engine.script = "<think>\nSunny.</think>\n\nIt is sunny in Paris."   # neither prompt opened it
        answer = asyncio.run(client.chat.completions.create(model="m", messages=history, tools=TOOLS)).choices[0]
        assert (answer.message.reasoning_content, answer.message.content) == ("Sunny.", "It is sunny in Paris.")
        prompt = client.engine.prompts[-1]
        assert "sunny, 21 C" in prompt and "Need the weather." not in prompt
        if template is None:
            assert CALL_BEGIN + "function" + SEP + 'get_weather\n```json\n{"city": "Paris"}\n```' in prompt
        else:
            assert '<｜Assistant｜>[get_weather {"city": "Paris"}]<｜end▁of▁sentence｜>' in prompt


@pytest.mark.parametrize("tokenizer, parser, calls", [
    ("deepseek-r1-distill-qwen-7b", "hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                              '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'),
    ("deepseek-r1-distill-llama-8b", "llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": '
                                                    '"Paris"}}; {"name": "add", "parameters": {"a": 1}}')])
def test_distilled_models_call_formats(tokenizer, parser, calls):
    """--tool-call-parser hermes (R1-Distill-Qwen: Qwen2.5's <tool_call> tags) and llama3_json
    (R1-Distill-Llama: Llama 3.1's JSON calls after <|python_tag|>, a special token the text
    drops), as vLLM serves them: reasoning apart, calls streamed and whole alike."""
    client = serve(tokenizer, "Need the weather.</think>\n\n" + calls, parser=parser)
    whole, (reasoning, content, streamed, finish, _) = asyncio.run(
        whole_and_streamed(client, model="m", messages=MESSAGES, tools=TOOLS))
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert got == streamed == [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1}')]
    assert whole.finish_reason == finish == "tool_calls"
    assert whole.message.reasoning_content == reasoning == "Need the weather."
    assert whole.message.content is None and content == ""


def test_past_calls_arguments_through_tojson_are_their_value():
    """A template that writes whole turns with tojson writes a past call's arguments as the JSON
    value (vLLM's rendering), empty or null arguments as {} (vLLM's); text that is not JSON is a
    400 naming the message and call, as vLLM's json.loads of it is (it was rendered as sent)."""
    client = serve("deepseek-r1", "Done.", "{% for m in messages %}{{ (m['tool_calls'] or []) | tojson }}\n{% endfor %}")
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": [1, "é"]}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": ""}},
             {"id": "c", "type": "function", "function": {"name": "h", "arguments": "null"}}]

    def ask(calls):
        return client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls}])
    asyncio.run(ask(calls))
    prompt = client.engine.prompts[-1].splitlines()
    assert json.loads(prompt[1]) == [{**calls[0], "function": {"name": "f", "arguments": {"x": [1, "é"]}}},
                                     {**calls[1], "function": {"name": "g", "arguments": {}}},
                                     {**calls[2], "function": {"name": "h", "arguments": {}}}]
    broken = {"id": "d", "type": "function", "function": {"name": "g", "arguments": '{"x": 1'}}
    with pytest.raises(openai.BadRequestError) as err:
        asyncio.run(ask([calls[0], broken]))
    assert err.value.status_code == 400 and err.value.body["param"] == "messages"
    assert err.value.body["message"].startswith("messages[1].tool_calls[1].function.arguments is not JSON (")


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_think_opened_again_after_the_template_opened_it(tokenizer):
    """The templates end the prompt with <think>\\n; an output that opens <think> all the same
    keeps the tag out of reasoning_content (vLLM drops it), streamed and whole."""
    client = serve(tokenizer, "<think>\nTwo and two.</think>\n\nFour.")
    whole, (reasoning, content, _, finish, _) = asyncio.run(whole_and_streamed(client, model="m", messages=MESSAGES))
    assert (whole.message.reasoning_content, whole.message.content) == (reasoning, content) == ("Two and two.", "Four.")
    assert client.engine.prompts[-1].endswith("<think>\n") and finish == "stop"
