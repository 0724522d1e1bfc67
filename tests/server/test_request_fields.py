"""Every request field of vLLM 0.26's ChatCompletionRequest and CompletionRequest is either
honoured with vLLM's meaning or refused with a 400 naming it, never taken and ignored."""
from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import API_KEY

from deepserve.config import DEMO_MODEL
from deepserve.engine.tokenizer import Tokenizer
from deepserve.server.errors import APIError
from deepserve.server.protocol import KNOWN_UNSUPPORTED, ChatCompletionRequest, CompletionRequest, unsupported_field
from deepserve.server.serving_chat import request_template_kwargs, render_text

# vLLM 0.26's request models, field by field (entrypoints/openai/{chat_completion,completion}/protocol.py)
SHARED = ("model frequency_penalty logit_bias logprobs max_tokens n presence_penalty response_format seed stop "
          "stream stream_options temperature top_p user use_beam_search top_k min_p repetition_penalty "
          "length_penalty stop_token_ids include_stop_str_in_output ignore_eos min_tokens skip_special_tokens "
          "spaces_between_special_tokens truncate_prompt_tokens truncation_side prompt_logprobs "
          "logprob_token_ids allowed_token_ids bad_words add_special_tokens structured_outputs priority "
          "request_id return_tokens_as_token_ids return_token_ids return_token_offsets cache_salt "
          "kv_transfer_params ec_transfer_params vllm_xargs repetition_detection thinking_token_budget echo").split()
VLLM_FIELDS = {
    ChatCompletionRequest: SHARED + ("messages top_logprobs max_completion_tokens tools tool_choice reasoning_effort "
                                     "include_reasoning parallel_tool_calls add_generation_prompt "
                                     "continue_final_message documents chat_template chat_template_kwargs "
                                     "media_io_kwargs mm_processor_kwargs return_prompt_text "
                                     "return_assistant_tokens_mask").split(),
    CompletionRequest: SHARED + "prompt suffix prompt_embeds".split(),
}

# a value asking for something of each field this server refuses
REFUSED = {"truncation_side": "right", "logprob_token_ids": [5], "thinking_token_budget": 8,
           "return_token_offsets": True, "ec_transfer_params": {"a": 1}, "repetition_detection": {"max_pattern_size": 4},
           "media_io_kwargs": {"image": {}}, "return_assistant_tokens_mask": True}


@pytest.mark.parametrize("model", list(VLLM_FIELDS), ids=lambda m: m.__name__)
def test_every_vllm_field_is_declared_or_refused(model):
    unknown = [f for f in VLLM_FIELDS[model] if f not in model.model_fields and f not in KNOWN_UNSUPPORTED]
    assert unknown == []


def test_values_asking_for_nothing_pass():
    """vLLM's defaults and empty values (what a client sending every field of vLLM's model sends)."""
    nothing = {"length_penalty": 1.0, "bad_words": [], "vllm_xargs": {}, "chat_template": "", "documents": [],
               "repetition_detection": {}, "truncation_side": "left", "use_beam_search": False,
               "return_token_ids": False, "logprob_token_ids": None}
    req = CompletionRequest.model_validate({"prompt": "x", **nothing})
    assert unsupported_field(req) is None
    for name, value in (("kv_transfer_params", {"a": 1}), ("vllm_xargs", {"a": 1})):
        req = CompletionRequest.model_validate({"prompt": "x", name: value})
        assert unsupported_field(req)[0] == name
    so = {"json": {"type": "object"}, "whitespace_pattern": " "}
    req = CompletionRequest.model_validate({"prompt": "x", "structured_outputs": so})
    assert unsupported_field(req)[0] == "structured_outputs.whitespace_pattern"
    req = CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {**so, "whitespace_pattern": None}})
    assert unsupported_field(req) is None
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "stream": True,
                                                "stream_options": {"include_obfuscation": True}})
    assert unsupported_field(req)[0] == "stream_options.include_obfuscation"


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


def status_of(call) -> tuple[int, object]:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code, exc.body.get("param")
    return 200, None


def test_refused_fields_are_400_naming_them(client):
    chat = [{"role": "user", "content": "Hi"}]
    for name, value in REFUSED.items():
        extra = {name: value}
        assert status_of(lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                           extra_body=extra)) == (400, name), name
        assert status_of(lambda: client.chat.completions.create(model="stories260k", messages=chat, max_tokens=1,
                                                                extra_body=extra)) == (400, name), name
    # vLLM's default side, which this server's truncation keeps
    r = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=1,
                                  extra_body={"truncate_prompt_tokens": 2, "truncation_side": "left"})
    assert r.usage.prompt_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_return_prompt_text_is_the_rendered_prompt(client, demo_server, stream):
    """vLLM's chat return_prompt_text: the template's rendered prompt as the response's
    prompt_text (streamed: on the role chunks, one per choice); it tokenizes to the prompt's
    ids. Completions (no template) refuse it, naming it."""
    chat = [{"role": "system", "content": "Once upon"}, {"role": "user", "content": " a time"}]
    kwargs = dict(model="stories260k", messages=chat, max_tokens=3,
                  extra_body={"return_prompt_text": True, "return_token_ids": True})
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, n=2, seed=1, stream=True))
        firsts = [c.model_extra for c in chunks if c.choices and c.choices[0].delta.role]
        assert len(firsts) == 2 and all(c.get("prompt_text") == firsts[0]["prompt_text"] for c in firsts)
        text, ids = firsts[0]["prompt_text"], firsts[0]["prompt_token_ids"]
        assert all("prompt_text" not in c.model_extra for c in chunks if not (c.choices and c.choices[0].delta.role))
    else:
        r = client.chat.completions.create(**kwargs)
        text, ids = r.model_extra["prompt_text"], r.model_extra["prompt_token_ids"]
    assert text == "<s>Once upon a time"   # the demo template: BOS, then the turns' text
    tokenized = httpx.post(demo_server.url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                           headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    assert tokenized == ids
    plain = client.chat.completions.create(model="stories260k", messages=chat, max_tokens=1)
    assert plain.model_extra["prompt_text"] is None   # vLLM's model_dump sends it null
    assert status_of(lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                       extra_body={"return_prompt_text": True})) == \
        (400, "return_prompt_text")


def test_truncate_prompt_tokens_minus_one_and_echo(client):
    """-1 (vLLM's): the prompt's last tokens, as many as the context holds beside max_tokens;
    echo shows the prompt the model saw."""
    long = "Once upon a time, there was a little girl named Lily. " * 60   # > 512 tokens
    r = client.completions.create(model="stories260k", prompt=long, max_tokens=4, temperature=0,
                                  extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens == 512 - 4
    r = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=2, temperature=0,
                                  echo=True, extra_body={"truncate_prompt_tokens": 2})
    assert r.choices[0].text.startswith("a time") and r.usage.prompt_tokens == 2
    assert status_of(lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                       extra_body={"truncate_prompt_tokens": 0})) \
        == (400, "truncate_prompt_tokens")


def test_truncate_prompt_tokens_beyond_the_context_is_400(client):
    """vLLM's rule: truncate_prompt_tokens may not pass max_model_len less the reply's budget
    (512 for the demo model); -1 and a value within it still truncate."""
    chat = [{"role": "user", "content": "Hi"}]
    for call in (lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                    extra_body={"truncate_prompt_tokens": 100000}),
                 lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=13,
                                                    extra_body={"truncate_prompt_tokens": 500}),
                 lambda: client.chat.completions.create(model="stories260k", messages=chat, max_completion_tokens=13,
                                                         extra_body={"truncate_prompt_tokens": 500})):
        assert status_of(call) == (400, "truncate_prompt_tokens")
    with pytest.raises(openai.BadRequestError, match=r"max_model_len - max_completion_tokens = 499"):
        client.chat.completions.create(model="stories260k", messages=chat, max_completion_tokens=13,
                                       extra_body={"truncate_prompt_tokens": 500})
    r = client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=12,
                                  extra_body={"truncate_prompt_tokens": 500})
    assert 0 < r.usage.prompt_tokens < 500
    r = client.chat.completions.create(model="stories260k", messages=chat, max_tokens=1,
                                       extra_body={"truncate_prompt_tokens": -1})
    assert r.usage.prompt_tokens > 0


@pytest.mark.parametrize("stop", ["", ["a", ""]])
def test_an_empty_stop_string_is_400(client, stop):
    """vLLM's check (an empty string would end every reply at once), not dropped in silence."""
    assert status_of(lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                       stop=stop)) == (400, "stop")


def test_thinking_switches_a_template_cannot_read_are_400(client):
    chat = [{"role": "user", "content": "Hi"}]
    for extra, param in (({"reasoning_effort": "none"}, "reasoning_effort"),
                         ({"chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
                         ({"chat_template_kwargs": {"thinking": True}}, "chat_template_kwargs")):
        assert status_of(lambda: client.chat.completions.create(model="stories260k", messages=chat, max_tokens=1,
                                                                extra_body=extra)) == (400, param), extra
    assert status_of(lambda: client.completions.create(model="stories260k", prompt="Hi", max_tokens=1,
                                                       extra_body={"reasoning_effort": "low"})) \
        == (400, "reasoning_effort")
    # null asks for nothing
    assert status_of(lambda: client.chat.completions.create(
        model="stories260k", messages=chat, max_tokens=1,
        extra_body={"reasoning_effort": None, "chat_template_kwargs": {"enable_thinking": None}})) == (200, None)


QWEN3_LIKE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
              "{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}")
EFFORT_ONLY = "{% for m in messages %}{{ m['content'] }}{% endfor %} effort={{ reasoning_effort }}"


@pytest.mark.parametrize("template, extra, expected", [
    (QWEN3_LIKE, {}, "Hi"),
    (QWEN3_LIKE, {"reasoning_effort": "none"}, "Hi<think></think>"),
    (QWEN3_LIKE, {"reasoning_effort": "low"}, "Hi"),
    (QWEN3_LIKE, {"chat_template_kwargs": {"enable_thinking": False}}, "Hi<think></think>"),
    # the request's own chat_template_kwargs win over what reasoning_effort implies (vLLM's)
    (QWEN3_LIKE, {"reasoning_effort": "none", "chat_template_kwargs": {"enable_thinking": True}}, "Hi"),
    (EFFORT_ONLY, {"reasoning_effort": "high"}, "Hi effort=high"),
])
def test_reasoning_effort_reaches_the_template(template, extra, expected):
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template=template))
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **extra})
    assert render_text(state, req.messages, template_kwargs=request_template_kwargs(state, req)) == expected


def test_reasoning_effort_is_refused_where_the_template_reads_neither_key():
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template=EFFORT_ONLY.split(" effort")[0]))
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}],
                                                "reasoning_effort": "low"})
    with pytest.raises(APIError) as err:
        request_template_kwargs(state, req)
    assert err.value.param == "reasoning_effort"
    with pytest.raises(APIError) as err:
        render_text(state, req.messages, template_kwargs={"enable_thinking": False})
    assert err.value.param == "chat_template_kwargs" and "enable_thinking" in err.value.message


def test_return_token_ids(client, demo_server):
    """vLLM's return_token_ids: the prompt's ids and each choice's, streamed chunk by chunk."""
    prompt_ids = httpx.post(f"{demo_server.url}/tokenize", json={"prompt": "Once upon a time"},
                            headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    kw = dict(model="stories260k", prompt="Once upon a time", max_tokens=5, temperature=0.8, seed=4, n=2,
              extra_body={"return_token_ids": True})
    whole = client.completions.create(**kw).model_dump()["choices"]
    assert [c["prompt_token_ids"] for c in whole] == [prompt_ids] * 2
    assert all(len(c["token_ids"]) == 5 for c in whole)
    streamed: dict = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.model_dump()["choices"]:
            got = streamed.setdefault(c["index"], [c.get("prompt_token_ids"), []])
            got[1] += c["token_ids"]
    assert streamed == {c["index"]: [prompt_ids, c["token_ids"]] for c in whole}

    kw = dict(model="stories260k", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=5,
              temperature=0, extra_body={"return_token_ids": True})
    chat_ids = httpx.post(f"{demo_server.url}/tokenize", json={"messages": kw["messages"]},
                          headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    r = client.chat.completions.create(**kw).model_dump()
    assert r["prompt_token_ids"] == chat_ids   # the demo template's "<s>Once upon a time", as /tokenize has it
    ids = r["choices"][0]["token_ids"]
    assert len(ids) == r["usage"]["completion_tokens"] == 5
    chunks = [c.model_dump() for c in client.chat.completions.create(stream=True, **kw)]
    assert chunks[0]["prompt_token_ids"] == chat_ids
    assert [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []] == ids


def test_return_tokens_as_token_ids(client):
    """vLLM's return_tokens_as_token_ids: logprobs name each token `token_id:N`."""
    kw = dict(model="stories260k", prompt="Once upon a time", max_tokens=3, temperature=0, logprobs=1, echo=True,
              extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    c = client.completions.create(**kw).choices[0].model_dump()
    ids = c["prompt_token_ids"] + c["token_ids"]
    assert c["logprobs"]["tokens"] == [f"token_id:{t}" for t in ids]
    assert all(f"token_id:{t}" in top for t, top in zip(c["token_ids"], c["logprobs"]["top_logprobs"][-3:]))
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "Once"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                       extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [f"token_id:{t}" for t in r.model_dump()["choices"][0]["token_ids"]]
    assert all(len(e.top_logprobs) == 2 and all(t.token.startswith("token_id:") for t in e.top_logprobs)
               for e in content)


@pytest.mark.parametrize("key", ["reasoning", "reasoning_content"])
def test_an_earlier_turns_reasoning_reaches_the_template_under_either_name(key):
    template = "{% for m in messages %}{{ m['reasoning_content'] }}|{{ m['reasoning'] }}|{{ m['content'] }}{% endfor %}"
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template=template))
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "assistant", "content": "4", key: "2+2"}]})
    assert render_text(state, req.messages, add_generation_prompt=False) == "2+2|2+2|4"


def test_documents_reach_a_template_that_reads_them():
    rag = "{% for d in documents %}[{{ d['title'] }}: {{ d['text'] }}]{% endfor %}{{ messages[0]['content'] }}"
    body = {"messages": [{"role": "user", "content": "Hi"}], "documents": [{"title": "a", "text": "b"}]}
    req = ChatCompletionRequest.model_validate(body)
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template=rag))
    assert render_text(state, req.messages, template_kwargs=request_template_kwargs(state, req)) == "[a: b]Hi"
    state = SimpleNamespace(tokenizer=Tokenizer(DEMO_MODEL, chat_template="{{ messages[0]['content'] }}"))
    with pytest.raises(APIError) as err:
        request_template_kwargs(state, req)
    assert err.value.param == "documents"
