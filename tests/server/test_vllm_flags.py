"""`deepserve serve` against `vllm serve` 0.26's flags: the ones it lacked that it can honour,
with vLLM's meaning (compared with what vLLM's code does for the same input), and the ones for
features it does not have, refused in one line naming the flag."""
from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import openai
import pytest
from test_qa14_chat_agents import load_tokenizer, serve

from deepserve.cli.serve import register, resolve
from deepserve.config import DEMO_MODEL
from deepserve.engine.tokenizer import Tokenizer
from deepserve.server.errors import APIError
from deepserve.server.protocol import ChatCompletionRequest
from deepserve.server.serving_chat import UNTRUSTED_TEMPLATE, detected_content_format, render_text


@pytest.fixture
def parser():
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p


# each content loop vLLM's detection (renderers/hf.py _detect_content_format) finds, and templates without one
@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "string"),
    ("{% for m in messages %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% for p in m.content | selectattr('type', 'equalto', 'text') %}{{ p.text }}"
     "{% endfor %}{% endfor %}", "openai"),
    ("{% set loop_messages = messages[1:] %}{% for m in loop_messages %}{% for p in m['content'] %}x{% endfor %}"
     "{% endfor %}", "openai"),
    ("{% for m in messages %}{% set content = m['content'] %}{% for item in content %}x{% endfor %}{% endfor %}",
     "openai"),
    ("{% for m in messages %}{% for t in m['tool_calls'] %}x{% endfor %}{% endfor %}", "string"),
    ("{% for m in messages %", "string"),   # does not parse
])
def test_content_format_detected_as_vllm_detects_it(template, expected):
    assert detected_content_format(template) == expected


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-r1-distill-qwen-7b", "deepseek-r1-distill-llama-8b"])
def test_the_models_templates_take_strings(name):
    assert detected_content_format(load_tokenizer(name).chat_template) == "string"


SHOW = "{% for m in messages %}{{ m['role'] }}={{ m['content'] | tojson }};{% endfor %}"
LOOPS = "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}" \
        "{% for p in m['content'] %}[{{ p['text'] }}]{% endfor %}{% endif %};{% endfor %}"
PARTS = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": PARTS},
            {"role": "tool", "tool_call_id": "c", "content": PARTS}]


@pytest.mark.parametrize("template, content_format, expected", [
    # vLLM's string format: text parts joined by newlines
    (SHOW, "string", 'system="s";user="a\\nb";tool="a\\nb";'),
    # openai: lists of text parts, a string as one part; a tool result's parts joined (vLLM's too)
    (SHOW, "openai", 'system=[{"type": "text", "text": "s"}];user=[{"type": "text", "text": "a"}, '
                     '{"type": "text", "text": "b"}];tool="a\\nb";'),
    (SHOW, "auto", 'system="s";user="a\\nb";tool="a\\nb";'),
    (LOOPS, "auto", "[s];[a][b];a\nb;"),
    (LOOPS, "string", "s;a\nb;a\nb;"),
])
def test_chat_template_content_format(template, content_format, expected):
    """--chat-template-content-format (was an unrecognized argument; content was always joined
    into a string, so a template that loops over parts, as vLLM's auto detects, saw characters)."""
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template=template))
    req = ChatCompletionRequest.model_validate({"messages": MESSAGES})
    assert render_text(state, req.messages, add_generation_prompt=False, content_format=content_format) == expected


def test_content_format_flag(parser):
    _, server, _ = resolve(parser.parse_args(["serve", "m", "--chat-template-content-format", "openai",
                                              "--trust-request-chat-template"]))
    assert (server.chat_template_content_format, server.trust_request_chat_template) == ("openai", True)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "m", "--chat-template-content-format", "json"])


OWN = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
HI = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("body", [{"chat_template": OWN}, {"chat_template": ""},
                                  {"chat_template_kwargs": {"chat_template": OWN}}])
def test_request_chat_template_refused_unless_trusted(body):
    """A request's own chat template (or chat_template_kwargs' one) is refused with vLLM's
    message without --trust-request-chat-template; chat_template was refused as unsupported
    even with the flag, and chat_template_kwargs' went into the template as a variable."""
    client = serve("deepseek-r1", "Fine.")

    async def ask():
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="m", messages=HI, extra_body=body)
        return err.value
    err = asyncio.run(ask())
    assert err.status_code == 400 and err.body["message"] == UNTRUSTED_TEMPLATE
    with pytest.raises(openai.BadRequestError) as tok_err:
        asyncio.run(client.post("http://app/tokenize", cast_to=object, body={"model": "m", "messages": HI, **body}))
    assert tok_err.value.body["message"] == UNTRUSTED_TEMPLATE


def test_trusted_request_chat_template_renders_the_prompt():
    client = serve("deepseek-r1", "Fine.", trust_request_chat_template=True)
    tok = load_tokenizer("deepseek-r1")

    async def ask(body):
        await client.chat.completions.create(model="m", messages=HI, extra_body=body)
        tokenized = await client.post("http://app/tokenize", cast_to=object, body={"model": "m", "messages": HI, **body})
        return client.engine.prompts[-1], tokenized["tokens"]
    for body in ({"chat_template": OWN}, {"chat_template_kwargs": {"chat_template": OWN}}):
        assert asyncio.run(ask(body)) == ("<<Hi>>", tok.encode("<<Hi>>", add_special_tokens=False))
    prompt, _ = asyncio.run(ask({"chat_template": ""}))   # "" falls back to the model's (vLLM's `or`)
    assert prompt == tok.apply_chat_template(HI)
    for bad in ("{% for m in messages %}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        with pytest.raises(openai.BadRequestError) as err:
            asyncio.run(ask({"chat_template": bad}))
        assert err.value.body["param"] == "chat_template", bad


def test_untrusted_template_is_an_api_error_with_vllms_words():
    state = SimpleNamespace(settings=SimpleNamespace(trust_request_chat_template=False))
    from deepserve.server.serving_chat import request_template
    assert request_template(state, None, {"enable_thinking": False}) is None
    with pytest.raises(APIError) as err:
        request_template(state, None, {"chat_template": OWN})
    assert err.value.message == ("Chat template is passed with request, but --trust-request-chat-template is not "
                                 "set. Refused request with untrusted chat template.")


def test_structured_outputs_config(parser):
    """vLLM's --structured-outputs-config (JSON or the dotted keys), was an unrecognized argument:
    what xgrammar serves passes, its reasoning_parser is --reasoning-parser's, the rest is refused
    in one line naming the key."""
    from deepserve.cli.main import normalize_argv

    def server_of(*flags):
        return resolve(parser.parse_args(normalize_argv(["serve", "m", *flags])))[1]
    server = server_of("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')
    assert server.structured_outputs_config == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert server.reasoning_parser is None and not server.grammar_in_reasoning()
    server = server_of("--structured-outputs-config.reasoning_parser", "deepseek_r1",
                       "--structured-outputs-config.enable_in_reasoning", "true")
    assert server.reasoning_parser == "deepseek_r1" and server.grammar_in_reasoning()
    assert server_of("--reasoning-parser", "deepseek_r1", "--structured-outputs-config.reasoning_parser",
                     "deepseek_r1").reasoning_parser == "deepseek_r1"
    for flags, message in (
            (("--structured-outputs-config.backend", "guidance"),
             "--structured-outputs-config backend 'guidance' is not supported (deepserve's grammars are xgrammar's; "
             "it takes 'auto' or 'xgrammar')"),
            (("--structured-outputs-config.reasoning_parser", "qwen3"), "reasoning_parser 'qwen3' is not supported"),
            (("--structured-outputs-config.reasoning_parser_plugin", "/p.py"), "reasoning_parser_plugin '/p.py'"),
            (("--structured-outputs-config.whitespace", "x"), "--structured-outputs-config whitespace is not supported"),
            (("--structured-outputs-config.enable_in_reasoning", "yes"), "enable_in_reasoning must be true or false"),
            (("--structured-outputs-config", "[1]"), "must be a JSON object"),
            (("--reasoning-parser", "deepseek_r1", "--structured-outputs-config", '{"reasoning_parser": "x"}'),
             "reasoning_parser 'x' is not supported")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            server_of(*flags)


@pytest.mark.parametrize("in_reasoning", [False, True])
def test_enable_in_reasoning_starts_the_grammar_at_the_first_token(in_reasoning):
    """With a reasoning parser a grammar holds from </think> on; vLLM's enable_in_reasoning holds
    it from the first token, the reasoning included."""
    client = serve("deepseek-r1", '{"a": 1}', grammar_in_reasoning=in_reasoning)
    seen = []
    generate = client.engine.generate

    def recording(prompt, params, request_id):
        seen.append(params.guided.start_after_token)
        return generate(prompt, params, request_id)
    client.engine.generate = recording
    asyncio.run(client.chat.completions.create(model="m", messages=HI, response_format={"type": "json_object"}))
    think_end = load_tokenizer("deepseek-r1").tok.token_to_id("</think>")
    assert seen == [None if in_reasoning else think_end]


def test_override_generation_config(parser, tmp_path):
    """vLLM's --override-generation-config (was an unrecognized argument): set over
    generation_config.json's defaults, the only ones with --generation-config vllm (vLLM's
    get_diff_sampling_param)."""
    from deepserve.server.api_server import generation_defaults

    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.95}')
    _, server, _ = resolve(parser.parse_args(["serve", "m", "--override-generation-config",
                                              '{"temperature": 0.5, "max_new_tokens": 64}']))
    overrides = server.override_generation_config
    assert generation_defaults("auto", str(tmp_path), overrides) == {"temperature": 0.5, "top_p": 0.95,
                                                                     "max_tokens": 64}
    assert generation_defaults("vllm", str(tmp_path), overrides) == {"temperature": 0.5, "max_tokens": 64}
    with pytest.raises(ValueError, match="--override-generation-config must be a JSON object, got 0.5"):
        resolve(parser.parse_args(["serve", "m", "--override-generation-config", "0.5"]))


@pytest.mark.parametrize("request_says, expected", [(None, True), (False, False), (True, True)])
def test_return_tokens_as_token_ids_flag(request_says, expected):
    """vLLM's --return-tokens-as-token-ids (was an unrecognized argument): the default of
    requests that leave return_tokens_as_token_ids out, on chat and completions."""
    client = serve("deepseek-r1", "Fine.", return_tokens_as_token_ids=True)
    extra = {} if request_says is None else {"return_tokens_as_token_ids": request_says}

    async def ask():
        chat = await client.chat.completions.create(model="m", messages=HI, logprobs=True, extra_body=extra)
        text = await client.completions.create(model="m", prompt="Hi", logprobs=0, extra_body=extra)
        return [e.token for e in chat.choices[0].logprobs.content], text.choices[0].logprobs.tokens
    for tokens in asyncio.run(ask()):
        assert tokens and all(t.startswith("token_id:") == expected for t in tokens), tokens
