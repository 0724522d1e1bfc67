"""vLLM's hermes and llama3_json tool-call formats (R1-Distill-Qwen's and R1-Distill-Llama's base
models' calls): whole and streamed parses agree at every chunking, calls cut short keep what
the stream sent, text that is not a call stays content; strict tools' grammar in each format."""
from __future__ import annotations

import json

import pytest
from conftest import SHARED

from deepserve.server.tool_parsers import TOOL_PARSERS, make_tool_parser, tool_calls_tag
from deepserve.server.tool_parsers_json import HermesToolParser, Llama3JsonToolParser

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}),
         ("search", {"query": "R1 \"tool\" {tokens}\nsecond line", "k": [3, {"deep": None}]})]


def hermes_text(calls, content="") -> str:
    """Qwen2.5's chat template's rendering of assistant tool calls."""
    return content + "".join(f'<tool_call>\n{{"name": "{n}", "arguments": {json.dumps(a)}}}\n</tool_call>\n'
                             for n, a in calls).rstrip("\n")


def llama_text(calls, tag: bool = False) -> str:
    """Llama 3.1's JSON tool calls, `; ` between them."""
    return ("<|python_tag|>" if tag else "") + "; ".join(
        json.dumps({"name": n, "parameters": a}) for n, a in calls)


def streamed(parser, text: str, chunk: int):
    """(content, [(name, arguments)]) from the streaming deltas, OpenAI-client style."""
    content, calls = "", {}
    for i in range(0, len(text), chunk):
        c, deltas = parser.feed(text[i:i + chunk])
        content += c
        for d in deltas:
            call = calls.setdefault(d["index"], ["", ""])
            assert ("id" in d) == (call[0] == ""), "the id comes once, with the name"
            call[0] += d["function"].get("name", "")
            call[1] += d["function"].get("arguments", "")
    c, deltas = parser.finish()
    assert not deltas
    return content + c, [tuple(calls[i]) for i in sorted(calls)]


def both_ways(make, text: str):
    """The whole parse, after checking that every chunking streams the same."""
    content, calls = make().parse(text)
    whole = (content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for chunk in (1, 2, 3, 7, len(text) or 1):
        s_content, s_calls = streamed(make(), text, chunk)
        # blank text before calls is no content whole, though streamed as it came (vLLM's)
        assert (s_content if s_content.strip() or not s_calls else "", s_calls) == whole, chunk
    return whole


def test_both_parsers_are_choices():
    assert {"hermes", "llama3_json"} <= set(TOOL_PARSERS)
    assert isinstance(make_tool_parser("hermes"), HermesToolParser)
    assert isinstance(make_tool_parser("llama3_json"), Llama3JsonToolParser)


@pytest.mark.parametrize("calls", [CALLS[:1], CALLS])
@pytest.mark.parametrize("content", ["", "Let me check that for you.\n"])
def test_hermes_calls(calls, content):
    got_content, got = both_ways(HermesToolParser, hermes_text(calls, content))
    assert got_content == content   # as written, its line break too (vLLM's)
    assert [(n, json.loads(a)) for n, a in got] == calls


@pytest.mark.parametrize("calls", [CALLS[:1], CALLS])
@pytest.mark.parametrize("tag", [False, True])
def test_llama3_json_calls(calls, tag):
    content, got = both_ways(Llama3JsonToolParser, llama_text(calls, tag))
    assert content == "" and [(n, json.loads(a)) for n, a in got] == calls
    # "arguments" as well as "parameters", keys in any order
    text = '{"arguments": {"a": 1}, "name": "add"}'
    assert both_ways(Llama3JsonToolParser, text) == ("", [("add", '{"a": 1}')])


@pytest.mark.parametrize("text", [
    "Plain answer, with {braces} and a <tool_c",
    'The answer is {"name": "x", "parameters": {}}',     # a call must open the output
    '{"answer": 4}',                                      # a JSON answer whose first key is not "name"
    "{}",
    "",
])
def test_llama3_json_text_stays_content(text):
    assert both_ways(Llama3JsonToolParser, text) == (text, [])


@pytest.mark.parametrize("text", [
    "Plain answer, with {braces} and a <tool_c",
    "Broken: <tool_call>\nnot json\n</tool_call>",
    'Cut: <tool_call>\n{"name": "get_wea',                # no name went out
])
def test_hermes_text_stays_content(text):
    assert both_ways(HermesToolParser, text) == (text, [])


@pytest.mark.parametrize("make, text", [
    (HermesToolParser, hermes_text(CALLS)), (Llama3JsonToolParser, llama_text(CALLS))])
def test_calls_cut_anywhere_keep_what_the_stream_sent(make, text):
    """Cut at every length: whole and streamed agree, each call's arguments are a prefix of
    its full arguments (whole ones are the full ones), and a call counts once its name is whole."""
    full = [json.dumps(a) for _, a in CALLS]
    for cut in range(len(text) + 1):
        content, calls = both_ways(make, text[:cut])
        if calls:
            assert content == ""
        assert [n for n, _ in calls] == [n for n, _ in CALLS][:len(calls)]
        for (_, args), want in zip(calls, full):
            assert want.startswith(args), (cut, args)


STRICT = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]   # not strict


@pytest.mark.parametrize("variant, tokenizer, render", [
    ("hermes", "deepseek-r1-distill-qwen-7b", lambda calls, content="": hermes_text(calls, content)),
    ("llama3_json", "deepseek-r1-distill-llama-8b", lambda calls, content="": llama_text(calls))])
def test_strict_tools_grammar_in_each_format(variant, tokenizer, render):
    """tool_choice auto with a strict tool: a call's arguments must fit its schema, the tools
    that are not strict take any object, text without calls stays free; the parser reads what
    the grammar lets through."""
    xgr = pytest.importorskip("xgrammar")
    from deepserve.engine.grammar import GrammarCompiler
    from deepserve.engine.sampling_params import GuidedDecoding
    from deepserve.engine.tokenizer import Tokenizer
    from deepserve.server.protocol import Tool

    folder = SHARED / "tokenizers" / tokenizer
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    tok = Tokenizer(folder)
    tools = [Tool.model_validate(t) for t in STRICT]

    compiler = GrammarCompiler(tok, tok.vocab_size, tok.eos_token_ids)   # its vocabulary's table: seconds, made once

    def matcher(parallel=True, answer=None):
        tag = tool_calls_tag(variant, tools, parallel, answer)
        compiled = compiler.compile(GuidedDecoding(structural_tag=tag))

        def accepts(text: str) -> bool:
            m = xgr.GrammarMatcher(compiled)
            ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
            return all(m.accept_token(t) for t in ids)
        return accepts

    accepts = matcher()
    good = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("search", {"q": "x"})]
    assert accepts(render(good)) and accepts("No call: just an answer, with { braces }.")
    assert not accepts(render([("get_weather", {"city": "Paris"})]))             # unit missing
    assert not accepts(render([("get_weather", {"city": "Paris", "unit": "kelvin"})]))
    assert not matcher(parallel=False)(render(good))                              # one call at most
    answer = matcher(answer={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    assert answer('{"n": 4}') and not answer("The answer is 4.") and answer(render(good[:1]))
    parser = make_tool_parser(variant)
    assert [c["function"]["name"] for c in parser.parse(render(good))[1]] == ["get_weather", "search"]
