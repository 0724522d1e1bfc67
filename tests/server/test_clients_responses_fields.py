"""vLLM 0.26's own Responses API fields, on the echo model (R1's tokenizer, a fixed reasoning
then answer) with the R1 reasoning parser: include_reasoning, include_stop_str_in_output and
chat_template_kwargs act as in chat completions; enable_response_messages and
previous_input_messages (vLLM's, for its harmony models) are refused by name. Each was ignored
with a warning that said neither API defines it."""
from __future__ import annotations

import json

import httpx
import pytest

BASE = {"model": "tiny-r1", "input": "What is 2+2?", "max_output_tokens": 40, "temperature": 0}


def respond(server, **fields) -> httpx.Response:
    return httpx.post(server.v1 + "/responses", json={**BASE, **fields}, timeout=60)


def test_include_reasoning_false_leaves_the_reasoning_item_out(r1_server):
    full = respond(r1_server).json()
    assert [item["type"] for item in full["output"]] == ["reasoning", "message"]
    answer = full["output"][1]["content"][0]["text"]
    hidden = respond(r1_server, include_reasoning=False).json()
    assert [item["type"] for item in hidden["output"]] == ["message"]
    assert hidden["output"][0]["content"][0]["text"] == answer
    assert hidden["usage"] == full["usage"]   # the reasoning is still generated and counted
    with httpx.stream("POST", r1_server.v1 + "/responses", json={**BASE, "include_reasoning": False, "stream": True},
                      timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert not [e for e in events if "reasoning" in e["type"]]
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message"]


def test_stop_string_kept_with_include_stop_str_in_output(r1_server):
    def text(**fields):
        out = respond(r1_server, stop=["answer"], **fields).json()["output"]
        return out[-1]["content"][0]["text"]
    assert text().endswith("The ") and text(include_stop_str_in_output=True).endswith("The answer")


def test_chat_template_kwargs_reach_the_template(r1_server):
    """The chat path's check applies: a kwarg that would replace the template's messages is a 400
    naming chat_template_kwargs (it passed as ignored)."""
    r = respond(r1_server, chat_template_kwargs={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    assert respond(r1_server, chat_template_kwargs={"unused_flag": True}).status_code == 200


@pytest.mark.parametrize("field,value", [("enable_response_messages", True),
                                         ("previous_input_messages", [{"role": "user", "content": "Hi"}])])
def test_harmony_fields_are_refused_by_name(r1_server, field, value):
    r = respond(r1_server, **{field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
