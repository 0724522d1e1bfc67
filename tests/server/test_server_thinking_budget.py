"""thinking_token_budget through `deepserve serve --reasoning-parser deepseek_r1` and the official
openai client (extra_body, as with vLLM): on the echo model (the real R1 tokenizer and template;
its greedy output is a fixed script with `</think>` in the middle) a budget of N ends the
reasoning after the template's "\\n" and N - 1 script tokens (vLLM's count), and the answer follows."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import API_KEY, ECHO_SCRIPT, R1_TOKENIZER, launch

from deepserve.engine.thinking_budget import reasoning_delimiters

ANSWER = "The answer is 4"
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def client(r1_server):
    return openai.OpenAI(base_url=r1_server.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def script():
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(R1_TOKENIZER / "tokenizer.json"))
    ids = tok.encode(ECHO_SCRIPT, add_special_tokens=False).ids
    return tok, ids, ids.index(tok.token_to_id("</think>"))


@pytest.mark.parametrize("budget", [1, 4, 9])
def test_chat_reasoning_is_cut_at_the_budget(client, script, budget):
    tok, ids, end = script
    want = tok.decode(ids[:budget - 1])
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0,
                                       extra_body={"thinking_token_budget": budget})
    msg = r.choices[0].message
    assert (msg.reasoning_content or "", msg.content) == (want, ANSWER)
    # reasoning, the forced </think>, then the script's answer and EOS
    assert r.usage.completion_tokens == budget - 1 + len(ids) - end + 1
    chunks = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0, stream=True,
                                            extra_body={"thinking_token_budget": budget})
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert ("".join(getattr(d, "reasoning_content", None) or "" for d in deltas),
            "".join(d.content or "" for d in deltas)) == (want, ANSWER)


def test_a_budget_past_the_reasoning_changes_nothing(client, script):
    tok, ids, end = script
    for budget in (end + 1, -1):
        r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0,
                                           extra_body={"thinking_token_budget": budget})
        assert r.choices[0].message.reasoning_content == tok.decode(ids[:end])


def test_completions_take_it_too(client, r1_server, script):
    tok, ids, end = script
    prompt = httpx.post(r1_server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    r = client.completions.create(model="tiny-r1", prompt=prompt, max_tokens=40, temperature=0,
                                  extra_body={"thinking_token_budget": 3})
    assert r.choices[0].text == tok.decode(ids[:2]) + "</think>\n\n" + ANSWER


def status_of(call) -> tuple[int, object, str]:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body.get("param"), exc.body.get("message", "")
    return 200, None, ""


@pytest.mark.parametrize("bad", [-2, 1.5, True, "8"])
def test_values_vllm_refuses_are_400(client, bad):
    code, param, _ = status_of(lambda: client.chat.completions.create(
        model="tiny-r1", messages=MESSAGES, extra_body={"thinking_token_budget": bad}))
    assert (code, param) == (400, "thinking_token_budget")


def test_responses_api_refuses_it_by_name(client):
    code, param, message = status_of(lambda: client.responses.create(
        model="tiny-r1", input="Hi", extra_body={"thinking_token_budget": 4}))
    assert (code, param) == (400, "thinking_token_budget") and "chat completions and completions only" in message


def test_without_a_reasoning_parser_it_is_400_naming_the_flag(demo_server):
    client = openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)
    for call in (lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                   extra_body={"thinking_token_budget": 8}),
                 lambda: client.chat.completions.create(model="stories260k", messages=MESSAGES, max_tokens=1,
                                                        extra_body={"thinking_token_budget": 8})):
        code, param, message = status_of(call)
        assert (code, param) == (400, "thinking_token_budget") and "--reasoning-parser deepseek_r1" in message


def test_vllm_reasoning_config_alone_enables_it(echo_model, script):
    """--reasoning-config's strings without a reasoning parser: budgets count, no split (vLLM's)."""
    tok, ids, end = script
    config = json.dumps({"reasoning_start_str": "<think>", "reasoning_end_str": "</think>"})
    server = launch(str(echo_model), "--served-model-name", "tiny-r1", "--reasoning-config", config,
                    "--num-gpu-blocks-override", "64")
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0,
                                           extra_body={"thinking_token_budget": 2})
        assert r.choices[0].message.content == tok.decode(ids[:1]) + "</think>\n\n" + ANSWER
    finally:
        server.stop()


@pytest.mark.parametrize("parser, config, want", [
    ("deepseek_r1", None, ("<think>", "</think>")),
    (None, None, None),
    (None, {"reasoning_parser": "deepseek_r1"}, ("<think>", "</think>")),
    ("deepseek_r1", {"reasoning_end_str": "</answer-start>"}, ("<think>", "</answer-start>")),
    (None, {"reasoning_start_str": "<think>"}, "needs both"),
    (None, {"reasoning_start": "<think>"}, "unknown key"),
    (None, {"reasoning_parser": "qwen3"}, "must be one of deepseek_r1"),
    (None, ["<think>"], "must be a JSON object"),
    (None, {"reasoning_start_str": "", "reasoning_end_str": ""}, "reasoning_start_str must not be empty"),
    ("deepseek_r1", {"reasoning_end_str": ""}, "reasoning_end_str must not be empty"),
])
def test_reasoning_config_settles_as_vllms(parser, config, want):
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            reasoning_delimiters(parser, config)
    else:
        assert reasoning_delimiters(parser, config) == want
