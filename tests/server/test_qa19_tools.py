"""Forced tool calls, reasoning fields and tool turns as an agent framework meets them, with the
official `openai` client over the scripted engine of test_qa14_chat_agents (the real tokenizers,
detokenizer and parsers; the engine writes a fixed text), compared with what vLLM 0.26 returns.
"""
from __future__ import annotations

import asyncio
import json

import openai
import pytest
from test_qa14_chat_agents import (INLINE_TOOLS_TEMPLATE, MESSAGES, TOOLS, load_tokenizer, r1_call, serve,
                                  whole_and_streamed)

from deepserve.server.tool_parsers import CALLS_BEGIN, CALLS_END

NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice", [NAMED, "required"])
def test_forced_call_when_the_reasoning_never_ends(choice):
    """max_tokens ends the output inside <think>: the grammar of a forced call starts after
    </think>, so nothing of a call was written. vLLM 0.26 then returns no tool_calls, content ""
    and the reasoning so far, finish "length", and its stream sends no call; a named choice came
    back with a call of empty arguments, which no JSON parser takes."""
    script = "Need the weather for Paris today.</think>\n\n" + '{"city": "Paris"}'
    client = serve("deepseek-r1", script)
    cut = len(load_tokenizer("deepseek-r1").encode("Need the weather", add_special_tokens=False))
    whole, (reasoning, content, calls, finish, _) = asyncio.run(whole_and_streamed(
        client, model="m", messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=cut))
    assert whole.message.tool_calls is None and calls == []
    assert whole.message.content == "" and content == ""
    assert whole.message.reasoning_content == reasoning == "Need the weather"
    assert whole.finish_reason == finish == "length"


@pytest.mark.parametrize("choice, answer, expected", [
    (NAMED, '{"city": "Paris"}', [("get_weather", '{"city": "Paris"}')]),
    ("required", '[{"name": "add", "parameters": {"a": 1}}]', [("add", '{"a": 1}')])])
def test_forced_call_reply_content_is_empty_text(choice, answer, expected):
    """A named or required call's reply: the call, content "" (vLLM's), finish
    "stop" for a named call and "tool_calls" for required ones, as vLLM's."""
    client = serve("deepseek-r1", "Need the weather.</think>\n\n" + answer)
    whole, (reasoning, content, calls, finish, _) = asyncio.run(whole_and_streamed(
        client, model="m", messages=MESSAGES, tools=TOOLS, tool_choice=choice))
    got = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert got == calls == expected and json.loads(got[0][1])
    assert whole.message.content == "" and content == ""
    assert whole.finish_reason == finish == ("stop" if choice == NAMED else "tool_calls")


def test_responses_call_cut_by_max_output_tokens_is_incomplete_whole_and_streamed():
    """/v1/responses, tool_choice required, max_output_tokens inside the second call: the
    response is incomplete and so is its last function_call item, whole as streamed."""
    script = ('Two calls.</think>\n\n[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
              '{"name": "add", "parameters": {"a": 1, "b": 2}}]')
    client = serve("deepseek-r1", script)
    cut = len(load_tokenizer("deepseek-r1").encode(script[:script.index("2}")], add_special_tokens=False))
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    kwargs = dict(model="m", input="Weather in Paris?", tools=tools, tool_choice="required", max_output_tokens=cut)

    async def ask():
        whole = await client.responses.create(**kwargs)
        events = [e async for e in await client.responses.create(**kwargs, stream=True)]
        return whole, events[-1].response
    whole, streamed = asyncio.run(ask())
    items = [[(o.type, o.status, getattr(o, "name", None), getattr(o, "arguments", None)) for o in r.output]
             for r in (whole, streamed)]
    assert items[0] == items[1]
    assert [(kind, status, name) for kind, status, name, _ in items[0]] == [
        ("reasoning", "completed", None), ("function_call", "completed", "get_weather"),
        ("function_call", "incomplete", "add")]
    assert whole.status == streamed.status == "incomplete" and items[0][2][3].startswith('{"a": 1')


@pytest.mark.parametrize("stream", [False, True])
def test_responses_answer_logprobs_with_the_reasoning_hidden(stream):
    """/v1/responses with include_reasoning false and include message.output_text.logprobs: the
    logprobs here are the answer's tokens only, which show nothing of the hidden reasoning, so
    they come (chat's 400 for the reply's whole token list does not apply)."""
    client = serve("deepseek-r1", "The secret plan.</think>\n\nHello there.")
    kwargs = dict(model="m", input="Hi", include=["message.output_text.logprobs"], top_logprobs=1,
                  extra_body={"include_reasoning": False})

    async def ask():
        if not stream:
            return await client.responses.create(**kwargs)
        return [e async for e in await client.responses.create(**kwargs, stream=True)][-1].response
    r = asyncio.run(ask())
    [message] = r.output
    part = message.content[0]
    assert part.text == "Hello there." and "".join(lp.token for lp in part.logprobs) == "Hello there."
    assert "secret" not in r.model_dump_json()


@pytest.mark.parametrize("tokenizer, parser, calls", [
    ("deepseek-r1", "deepseek_v3", CALLS_BEGIN + r1_call("get_weather", '{"city": "Paris"}') + CALLS_END),
    ("deepseek-r1-distill-qwen-7b", "hermes",
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')])
def test_text_before_calls_keeps_its_trailing_blank_lines(tokenizer, parser, calls):
    """The text before the calls is the content as written, whole as streamed (vLLM's); the
    whole response stripped its trailing blank lines, which the stream had sent. /v1/responses:
    the message item's text is the same, streamed or not; blank text alone opens no message."""
    client = serve(tokenizer, "Hmm.</think>\n\nOne moment.\n\n" + calls, parser=parser)
    whole, (_, content, streamed, finish, _) = asyncio.run(whole_and_streamed(
        client, model="m", messages=MESSAGES, tools=TOOLS))
    assert whole.message.content == content == "One moment.\n\n"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == streamed
    kwargs = dict(model="m", input="Weather?", tools=[{"type": "function", **t["function"]} for t in TOOLS])

    async def respond():
        return (await client.responses.create(**kwargs),
                [e async for e in await client.responses.create(**kwargs, stream=True)][-1].response)
    for script, text in (("One moment.\n\n", "One moment.\n\n"), ("\n\n", None)):
        client.engine.script = "Hmm.</think>\n\n" + script + calls
        for r in asyncio.run(respond()):
            messages = [o for o in r.output if o.type == "message"]
            assert [m.content[0].text for m in messages] == ([text] if text else [])
            assert [o.type for o in r.output][-1] == "function_call"


# reads enable_thinking as Qwen3's template does: false closes the reasoning in the prompt
THINKING_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>"
                     "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                     "{% else %}<think>\n{% endif %}")


def test_responses_reasoning_effort_reaches_the_template_as_chats():
    """/v1/responses reasoning.effort is chat's reasoning_effort (vLLM's Responses hands it to the
    template, with enable_thinking false for "none"): the prompt is chat's, the reply's split
    follows it, and the response echoes the effort; where the template reads neither key it is
    the 400 chat gives, naming reasoning.effort."""
    client = serve("deepseek-r1", "Fine.", template=THINKING_TEMPLATE)

    async def ask(effort):
        r = await client.responses.create(model="m", input="Hi", reasoning={"effort": effort})
        responses_prompt = client.engine.prompts[-1]
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                             reasoning_effort=effort)
        return r, responses_prompt, client.engine.prompts[-1]
    r, prompt, chat_prompt = asyncio.run(ask("none"))
    assert prompt == chat_prompt and prompt.endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    assert [o.type for o in r.output] == ["message"] and r.output_text == "Fine." and r.reasoning.effort == "none"
    r, prompt, chat_prompt = asyncio.run(ask("high"))
    assert prompt == chat_prompt and prompt.endswith("<｜Assistant｜><think>\n")
    assert [o.type for o in r.output] == ["reasoning"] and r.reasoning.effort == "high"   # never closed: all reasoning
    r1 = serve("deepseek-r1", "Fine.")   # R1's template reads neither key
    with pytest.raises(openai.BadRequestError) as err:
        asyncio.run(r1.responses.create(model="m", input="Hi", reasoning={"effort": "low"}))
    assert err.value.body["param"] == "reasoning.effort" and "reads neither" in err.value.message


@pytest.mark.parametrize("exclude", [False, True])
def test_exclude_tools_when_tool_choice_none(exclude):
    """vLLM's --exclude-tools-when-tool-choice-none: a tool_choice none request's prompt lists no
    tools; auto's still does, and without the flag none's does too."""
    client = serve("deepseek-r1", "Hi.", INLINE_TOOLS_TEMPLATE, exclude_tools_when_tool_choice_none=exclude)

    async def prompts():
        got = []
        for choice in ("none", "auto"):
            await client.chat.completions.create(model="m", messages=MESSAGES, tools=TOOLS, tool_choice=choice)
            got.append('"name": "get_weather"' in client.engine.prompts[-1])
        return got
    assert asyncio.run(prompts()) == [not exclude, True]


def test_default_chat_template_kwargs_under_the_requests_own():
    """vLLM's --default-chat-template-kwargs: every chat request's template gets them, under the
    request's chat_template_kwargs and reasoning_effort (vLLM's merge), /tokenize's too; a thinking
    switch the template does not read is refused at start, naming the flag."""
    from deepserve.server.serving_chat import check_template_kwargs

    client = serve("deepseek-r1", "Fine.", template=THINKING_TEMPLATE,
                   default_chat_template_kwargs={"enable_thinking": False})

    async def prompt(**kwargs):
        r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], **kwargs)
        return client.engine.prompts[-1], r.choices[0].message
    closed, message = asyncio.run(prompt())
    assert closed.endswith("<think>\n\n</think>\n\n") and message.content == "Fine." and message.reasoning is None
    for kwargs in ({"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}, {"reasoning_effort": "high"}):
        opened, message = asyncio.run(prompt(**kwargs))
        assert opened.endswith("<｜Assistant｜><think>\n") and message.reasoning == "Fine.", kwargs
    tokenized = asyncio.run(client.post("http://app/tokenize", cast_to=object, body={
        "model": "m", "messages": [{"role": "user", "content": "Hi"}]}))
    assert tokenized["tokens"] == load_tokenizer("deepseek-r1").encode(closed, add_special_tokens=False)
    with pytest.raises(ValueError, match="--default-chat-template-kwargs: enable_thinking is not read"):
        check_template_kwargs(load_tokenizer("deepseek-r1"), {"enable_thinking": False}, "--default-chat-template-kwargs")
    check_template_kwargs(load_tokenizer("deepseek-r1"), {"other": 1}, "--default-chat-template-kwargs")
