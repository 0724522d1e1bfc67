"""Structured outputs' structural tags and options as vLLM 0.26's xgrammar backend takes them:
response_format {"type": "structural_tag"} (xgrammar's `format`, or vLLM's legacy structures +
triggers) and structured_outputs.structural_tag; disable_any_whitespace and
disable_additional_properties (what xgrammar does: compact JSON, strict mode); whitespace_pattern
refused by name (xgrammar has none). Checked with the openai client on the demo model."""
from __future__ import annotations

import json
import re

import openai
import pytest
from conftest import API_KEY

from deepserve.config import DEMO_MODEL

pytest.importorskip("xgrammar")

PROMPT = "Once upon a time"
# free text; a "," must open a <kid> tag holding "cat" or "dog", a "." an <age> tag holding 1..9
LEGACY = {"type": "structural_tag", "triggers": [",", "."], "structures": [
    {"begin": ",<kid>", "schema": {"enum": ["cat", "dog"]}, "end": "</kid>"},
    {"begin": ".<age>", "schema": {"type": "integer", "minimum": 1, "maximum": 9}, "end": "</age>"}]}
TAGS = (r',<kid>"(cat|dog)"</kid>', r"\.<age>[1-9]</age>")
TAG_TEXTS = [f',<kid>"{p}"</kid>' for p in ("cat", "dog")] + [f".<age>{n}</age>" for n in range(1, 10)]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "pet": {"enum": ["cat", "dog"]}}, "required": ["n", "pet"]}
# xgrammar's own format: exactly one <n> tag holding SCHEMA's JSON, then the output ends
FORMAT = {"type": "triggered_tags", "triggers": ["<"], "at_least_one": True, "stop_after_first": True,
          "tags": [{"type": "tag", "begin": "<n>", "end": "</n>",
                    "content": {"type": "json_schema", "json_schema": SCHEMA, "max_whitespace_cnt": 1}}]}


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def follows_legacy_tags(text: str) -> bool:
    """Every trigger in `text` opens a complete tag, the last one possibly cut by max_tokens."""
    free = r"[^,.]*"
    whole = f"{free}(?:(?:{'|'.join(TAGS)}){free})*"
    if re.fullmatch(whole, text):
        return True
    cut = max(text.rfind(","), text.rfind("."))
    return bool(re.fullmatch(whole, text[:cut])) and any(t.startswith(text[cut:]) for t in TAG_TEXTS)


def test_legacy_structural_tag_constrains_text_after_each_trigger(client):
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=40, n=4, seed=3, response_format=LEGACY)
    texts = [c.message.content for c in r.choices]
    assert all(follows_legacy_tags(t) for t in texts), texts
    assert sum(t.count("<kid>") + t.count("<age>") for t in texts) >= 4, texts   # the triggers came
    # the same request without the format: the demo model writes commas and periods freely
    free = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=40, n=4, seed=3)
    assert not all(follows_legacy_tags(c.message.content) for c in free.choices)


@pytest.mark.parametrize("where", ["response_format", "structured_outputs"])
def test_structural_tag_format(client, where):
    if where == "response_format":
        r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=40, n=3, seed=5,
                                           response_format={"type": "structural_tag", "format": FORMAT})
        texts = [(c.message.content, c.finish_reason) for c in r.choices]
    else:
        tag = json.dumps({"type": "structural_tag", "format": FORMAT})
        r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=40, n=3, seed=5,
                                      extra_body={"structured_outputs": {"structural_tag": tag}})
        texts = [(c.text, c.finish_reason) for c in r.choices]
    for text, finish in texts:
        m = re.fullmatch(r"<n>(.*)</n>", text, re.S)
        assert m and finish == "stop", texts
        value = json.loads(m.group(1))
        assert set(value) == {"n", "pet"} and 0 <= value["n"] <= 9 and value["pet"] in ("cat", "dog"), texts


def test_bad_structural_tags_are_400_naming_their_field(client):
    def param_of(call) -> object:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        return info.value.body["param"], info.value.body["message"]

    chat = dict(model="stories260k", messages=[{"role": "user", "content": PROMPT}], max_tokens=2)
    for rf in ({"type": "structural_tag"}, {"type": "structural_tag", "format": {"type": "wat"}},
               {"type": "structural_tag", "structures": [{"begin": "a", "schema": {}}], "triggers": ["a"]}):
        param, msg = param_of(lambda: client.chat.completions.create(**chat, response_format=rf))
        assert param == "response_format" and "Check failed" not in msg, msg
    param, msg = param_of(lambda: client.completions.create(
        model="stories260k", prompt=PROMPT, max_tokens=2, extra_body={"structured_outputs": {"structural_tag": "{"}}))
    assert param == "structured_outputs" and "structural_tag" in msg, msg
    # the top-level field is neither vLLM's nor this server's: refused, pointing at where it goes
    param, msg = param_of(lambda: client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=2,
                                                            extra_body={"structural_tag": json.dumps(FORMAT)}))
    assert param == "structural_tag" and "structured_outputs.structural_tag" in msg, msg


def test_whitespace_patterns_are_refused_by_name(client):
    for extra, param in (({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": r"[ ]?"}},
                          "structured_outputs.whitespace_pattern"),
                         ({"guided_json": SCHEMA, "guided_whitespace_pattern": r"[ ]?"}, "guided_whitespace_pattern")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=2, extra_body=extra)
        assert info.value.body["param"] == param and "xgrammar" in info.value.body["message"]


def test_disable_any_whitespace_and_additional_properties(client):
    """The output's tokens walk xgrammar's own grammar for the schema without free whitespace,
    and its keys are only those the schema names (it says nothing of additionalProperties)."""
    from deepserve.engine.grammar import GrammarCompiler
    from deepserve.engine.tokenizer import Tokenizer

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "a": {"type": "integer", "minimum": 0, "maximum": 99}}}
    r = client.completions.create(
        model="stories260k", prompt=PROMPT, max_tokens=40, n=6, seed=3,
        extra_body={"return_token_ids": True, "structured_outputs": {
            "json": schema, "disable_any_whitespace": True, "disable_additional_properties": True}})
    tok = Tokenizer(DEMO_MODEL)
    compact = GrammarCompiler(tok, 512, tok.eos_token_ids)._get().compile_json_schema(json.dumps(schema),
                                                                                     any_whitespace=False)
    xgr = pytest.importorskip("xgrammar")
    finished = 0
    for c in r.choices:
        matcher = xgr.GrammarMatcher(compact)
        assert all(matcher.accept_token(t) for t in c.token_ids if t not in tok.eos_token_ids), c.text
        if c.finish_reason == "stop":
            finished += 1
            value = json.loads(c.text)
            assert set(value) <= {"name", "a"}, c.text
            assert c.text == json.dumps(value, ensure_ascii=False), c.text   # no whitespace but the separators'
    assert finished >= 3, [c.text for c in r.choices]


def test_a_structural_tag_response_format_stays_with_auto_tools():
    """tool_choice auto builds its tool-call tag around a JSON response_format's schema; a
    structural tag is no JSON answer, so the request's own tag is kept."""
    from types import SimpleNamespace

    from deepserve.engine.sampling_params import SamplingParams
    from deepserve.server.protocol import ChatCompletionRequest
    from deepserve.server.serving_chat import PreparedChat

    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "structural_tag", "format": FORMAT}})
    prep = PreparedChat.__new__(PreparedChat)
    prep.params = SamplingParams(guided=req.guided())
    state = SimpleNamespace(settings=SimpleNamespace(enable_auto_tool_choice=True, tool_call_parser="deepseek_v31"))
    prep._tools(state, req)
    assert json.loads(prep.params.guided.structural_tag)["format"] == FORMAT
    assert prep.tool_mode == "auto" and prep.guided_field == "response_format"


def test_responses_take_structured_outputs(client):
    """vLLM's Responses request takes structured_outputs, though not beside text.format."""
    tag = json.dumps({"type": "structural_tag", "format": FORMAT})
    r = client.responses.create(model="stories260k", input=PROMPT, max_output_tokens=40,
                                extra_body={"structured_outputs": {"structural_tag": tag}})
    m = re.fullmatch(r"<n>(.*)</n>", r.output_text, re.S)
    assert m and set(json.loads(m.group(1))) == {"n", "pet"}, r.output_text
    r = client.responses.create(model="stories260k", input=PROMPT, max_output_tokens=8,
                                extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.output_text in ("yes", "no")
    for extra, param in (({"structured_outputs": {"choice": ["yes"]}, "text": {"format": {"type": "text"}}},
                          "structured_outputs"),
                         ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": " "}},
                          "structured_outputs.whitespace_pattern")):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model="stories260k", input=PROMPT, max_output_tokens=8, extra_body=extra)
        assert info.value.body["param"] == param, info.value.body


def test_structured_outputs_options_beside_response_format(client):
    """structured_outputs with only its options (no constraint of its own) beside response_format
    json_object: the response_format's constraint applies (vLLM merges the two); the options alone
    are a 400 that names structured_outputs."""
    r = client.chat.completions.create(
        model="stories260k", messages=[{"role": "user", "content": "Hi"}], max_tokens=30, seed=1,
        response_format={"type": "json_object"}, extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{"), text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=2,
                                  extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    assert "structured_outputs" in info.value.body["message"], info.value.body
