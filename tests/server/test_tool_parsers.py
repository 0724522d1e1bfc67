"""The deepseek_v3 / deepseek_v31 tool-call parsers on canned R1 outputs: the calls text is
R1's own chat template rendering of assistant tool calls, so the parser reads exactly the
format the model was trained to write. Streamed (chunked at every split point) and whole
parses must agree."""
from __future__ import annotations

import functools
import json

import pytest
from conftest import R1_TOKENIZER

from deepserve.engine.tokenizer import Tokenizer
from deepserve.server.tool_parsers import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP, DeepSeekToolParser,
                                          RequiredCallsStream, required_calls, tool_calls_tag)

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}),
         ("search", {"query": "R1 \"tool\" tokens\nsecond line", "k": 3})]


@functools.cache
def r1_tokenizer() -> Tokenizer:
    """The R1 tokenizer (a second to load), shared by the tests of this file."""
    return Tokenizer(R1_TOKENIZER)


def r1_calls_text(calls, content=None) -> str:
    """What R1 writes after `<｜Assistant｜>` for these calls, from its chat template."""
    if not R1_TOKENIZER.is_dir():
        pytest.skip(f"{R1_TOKENIZER} not found")
    tok = r1_tokenizer()
    msg = {"role": "assistant", "content": content,
           "tool_calls": [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
                          for n, a in calls]}
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, msg], tokenize=False)
    body = text.split("<｜Assistant｜>", 1)[1]
    assert body.endswith("<｜end▁of▁sentence｜>")
    return body[:-len("<｜end▁of▁sentence｜>")]


def streamed(text: str, chunk: int, variant: str = "deepseek_v3"):
    """(content, tool calls) assembled from the streaming deltas, OpenAI-client style."""
    p = DeepSeekToolParser(variant)
    content, calls = "", {}
    pieces = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    for piece in pieces:
        c, deltas = p.feed(piece)
        content += c
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
            assert ("id" in d) == (call["name"] == ""), "the id comes once, with the name"
            call["name"] += d["function"].get("name", "")
            call["arguments"] += d["function"].get("arguments", "")
    c, deltas = p.finish()
    assert not deltas
    content += c
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("calls", [CALLS[:1], CALLS])
@pytest.mark.parametrize("prefix", [None, "Let me check that for you."])
def test_r1_calls_parse_whole_and_streamed(calls, prefix):
    text = r1_calls_text(calls, prefix)
    assert text.startswith((prefix or "") + CALLS_BEGIN) and text.endswith(CALLS_END)
    content, parsed = DeepSeekToolParser("deepseek_v3").parse(text)
    assert content == prefix
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == calls
    assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in parsed)
    for chunk in (1, 2, 3, 7, 1000):  # arguments and markers split across chunks
        s_content, s_calls = streamed(text, chunk)
        assert s_content == (prefix or "")
        assert [(c["name"], json.loads(c["arguments"])) for c in s_calls] == calls


def test_v31_format():
    text = ("Sure." + CALLS_BEGIN + CALL_BEGIN + "get_weather" + SEP + '{"city": "Oslo"}' + CALL_END
            + CALL_BEGIN + "search" + SEP + '{"query": "x"}' + CALL_END + CALLS_END)
    content, parsed = DeepSeekToolParser("deepseek_v31").parse(text)
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == [
        ("get_weather", {"city": "Oslo"}), ("search", {"query": "x"})]
    for chunk in (1, 4):
        assert streamed(text, chunk, "deepseek_v31") == ("Sure.", [
            {"name": "get_weather", "arguments": '{"city": "Oslo"}'}, {"name": "search", "arguments": '{"query": "x"}'}])


@pytest.mark.parametrize("text", [
    "Plain answer with no calls.",
    "Broken: " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n{not fenced}",
    "Cut off: " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_wea",
])
def test_no_or_malformed_calls_stay_content(text):
    content, parsed = DeepSeekToolParser("deepseek_v3").parse(text)
    assert parsed == [] and content == text
    assert streamed(text, 3) == (text, [])


def test_unknown_parser_name():
    with pytest.raises(ValueError, match="deepseek_v3"):
        DeepSeekToolParser("hermes")


def required_streamed(text: str, chunk: int) -> list[dict]:
    """(name, arguments text) per call index from RequiredCallsStream fed `chunk` chars at a time."""
    stream, calls = RequiredCallsStream(), {}
    for i in range(0, len(text), chunk):
        for d in stream.feed(text[i:i + chunk]):
            call = calls.setdefault(d["index"], {"name": None, "arguments": "", "headers": 0})
            if "name" in d["function"]:
                assert d["id"].startswith("chatcmpl-tool-") and d["type"] == "function"
                call["name"] = d["function"]["name"]
                call["headers"] += 1
            call["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("text", [
    '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris }", "unit": "c", "n": [1, {"x": "]"}]}},'
    ' {"name":"add","parameters":{"a":1,"b":2}}]',
    '[ {"parameters": {"a": 3}, "name": "add"} ]',            # parameters before the name
    '[{"name": "f", "parameters": "text, with } and ]"}, {"name": "g", "parameters": 5}]',
])
def test_required_calls_stream_call_by_call(text):
    want = json.loads(text)
    for chunk in (1, 2, 5, len(text)):
        got = required_streamed(text, chunk)
        assert [c["name"] for c in got] == [w["name"] for w in want]
        assert [json.loads(c["arguments"]) for c in got] == [w["parameters"] for w in want]
        assert all(c["headers"] == 1 for c in got)


def test_required_calls_stream_sends_arguments_as_they_grow():
    stream = RequiredCallsStream()
    assert stream.feed('[{"name": "add", "par') == [
        {"index": 0, "id": stream.calls[0]["id"], "type": "function", "function": {"name": "add", "arguments": ""}}]
    assert stream.feed('ameters": {"a": 1') == [{"index": 0, "function": {"arguments": '{"a": 1'}}]
    assert stream.feed(', "b"') == [{"index": 0, "function": {"arguments": ', "b"'}}]
    # cut by max_tokens here: what was sent stays a prefix of the arguments, nothing breaks
    assert stream.feed("") == []


@pytest.mark.parametrize("cut", [0, 22, 23, 40, 56, 57, 60, 73, 74, 98, 99, None])
def test_required_calls_whole_has_the_calls_the_stream_sent(cut):
    """A list cut by max_tokens: the whole response has the calls the stream sent, the cut one
    (once its name is out) with its arguments' text as far as it got."""
    first, second = '{"name": "get_weather", "parameters": {"city": "Paris"}}', '{"name": "add", "parameters": {"a": 1}}'
    text = f"[{first} , {second}]"[:cut]
    whole = [(c["function"]["name"], c["function"]["arguments"]) for c in required_calls(text)]
    sent = [(c["name"], c["arguments"]) for c in required_streamed(text, 3)]
    assert [name for name, _ in whole] == [name for name, _ in sent]
    for (_, got), (_, want) in zip(whole, sent):
        try:
            assert json.loads(got) == json.loads(want)      # a complete call, re-serialised
        except json.JSONDecodeError:
            assert got == want                               # the cut call, as sent
    names = [name for it, name, at in ((first, "get_weather", 23), (second, "add", 74)) if len(text) >= at]
    assert [name for name, _ in whole] == names


STRICT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]   # not strict


@functools.cache
def r1_grammar_compiler():
    """A grammar compiler over the R1 tokenizer's vocabulary (whose table takes seconds to make),
    shared by the tests of this file."""
    from deepserve.engine.grammar import GrammarCompiler

    tok = r1_tokenizer()
    return GrammarCompiler(tok, 129280, tok.eos_token_ids)


def strict_matcher(variant: str, tools=STRICT_TOOLS, parallel: bool = True, answer=None):
    """`accepts(text)`: whether the strict-tools grammar takes `text`'s R1 tokens, then EOS."""
    xgr = pytest.importorskip("xgrammar")
    from deepserve.engine.sampling_params import GuidedDecoding
    from deepserve.server.protocol import Tool

    tok = r1_tokenizer()
    tag = tool_calls_tag(variant, [Tool.model_validate(t) for t in tools], parallel, answer)
    compiled = r1_grammar_compiler().compile(GuidedDecoding(structural_tag=tag))

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(compiled)
        ids = tok.encode(text, add_special_tokens=False) + sorted(tok.eos_token_ids)[:1]
        return all(matcher.accept_token(t) for t in ids)
    return accepts


def test_strict_tools_hold_the_calls_to_their_schemas_in_r1_format():
    """tool_choice auto with a strict tool: text stays free, a call's arguments must fit its
    tool's schema (a tool that is not strict takes any object); R1's own rendering of calls passes."""
    accepts = strict_matcher("deepseek_v3")
    assert accepts(r1_calls_text(CALLS, "Let me check that for you."))           # R1's template writes these
    assert accepts("No call: just an answer, with { braces } and ``` fences.")
    assert not accepts(r1_calls_text([("get_weather", {"city": "Paris"})]))      # unit missing
    assert not accepts(r1_calls_text([("get_weather", {"city": "Paris", "unit": "kelvin"})]))
    assert not accepts(r1_calls_text([("unknown_tool", {"city": "Paris"})]))
    assert not strict_matcher("deepseek_v3", parallel=False)(r1_calls_text(CALLS))   # one call at most


def test_strict_tools_in_v31_format_and_none_without_strict():
    call = CALLS_BEGIN + CALL_BEGIN + "get_weather" + SEP + '{"city": "Paris", "unit": "%s"}' + CALL_END + CALLS_END
    accepts = strict_matcher("deepseek_v31")
    assert accepts(call % "celsius") and not accepts(call % "kelvin")
    assert DeepSeekToolParser("deepseek_v31").parse(call % "celsius")[1][0]["function"]["name"] == "get_weather"
    from deepserve.server.protocol import Tool
    loose = [Tool.model_validate({**t, "function": {**t["function"], "strict": False}}) for t in STRICT_TOOLS]
    assert tool_calls_tag("deepseek_v31", loose) is None     # no strict tool: no grammar, as before


def test_answer_format_or_calls():
    """With response_format's schema the output is that JSON, or text and a calls block."""
    accepts = strict_matcher("deepseek_v3", answer={"type": "object", "properties": {"n": {"type": "integer"}},
                                                     "required": ["n"]})
    assert accepts('{"n": 4}') and not accepts('{"m": 4}') and not accepts("The answer is 4.")
    assert accepts(r1_calls_text(CALLS, "Let me check that for you."))
    assert not accepts(r1_calls_text([("get_weather", {"city": "Paris"})]))   # get_weather is strict
