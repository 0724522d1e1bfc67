"""The API features agents and evaluation harnesses use, with the official `openai` client
against `deepserve serve` on the demo model: unsupported fields refused, logit_bias, echo +
logprobs and prompt_logprobs against transformers' log_softmax (fp32), echo with max_tokens 0,
chat top_logprobs (top_logprobs 0 without logprobs asks for nothing), chat metadata,
continuous usage stats, structured outputs (JSON schema, choice, regex) that must parse and
validate, and the demo model's own chat template."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from conftest import API_KEY

from deepserve.config import DEMO_MODEL

PROMPT = "Once upon a time, there was a little girl named Lily"


@pytest.fixture(scope="module")
def client(demo_server):
    return openai.OpenAI(base_url=demo_server.v1, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf_logprobs():
    """log_softmax of transformers' Llama on the demo model (fp32): ids -> [len, V]."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return run


def tokenize(server, text: str) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"prompt": text}, headers={"Authorization": f"Bearer {API_KEY}"})
    return r.json()["tokens"]


def expect_400(fn, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as info:
        fn()
    err = info.value.body
    assert err["param"] == param, err
    return err["message"]


# --------------------------------------------------------------------------- no silent ignores
def test_unimplemented_fields_are_refused(client):
    base = dict(model="stories260k", prompt=PROMPT, max_tokens=2)
    msg = expect_400(lambda: client.completions.create(**base, extra_body={"prediction": {"type": "content"}}),
                     "prediction")
    assert "not supported" in msg
    expect_400(lambda: client.completions.create(**base, extra_body={"store": True}), "store")
    # a field neither OpenAI's nor vLLM's API defines is ignored (with a warning line), as vLLM does
    assert client.completions.create(**base, extra_body={"some_new_field": 1}).choices[0].text
    expect_400(lambda: client.chat.completions.create(
        model="stories260k", messages=[{"role": "user", "content": "hi", "audio": {"id": "x"}}]), "messages[0].audio")
    expect_400(lambda: client.completions.create(**base, extra_body={"priority": 3}), "priority")
    chat = dict(model="stories260k", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    for field, value in (("chat_template", "{{ messages }}"), ("best_of", 3)):
        expect_400(lambda: client.chat.completions.create(**chat, extra_body={field: value}), field)
    expect_400(lambda: client.completions.create(**base, n=2, best_of=1), "best_of")   # fewer than n
    assert len(client.completions.create(**base, n=2, best_of=2).choices) == 2
    # null / false asks for nothing, and the fields vLLM clients send are implemented
    r = client.completions.create(**base, user="u1", extra_body={"use_beam_search": False, "functions": None,
                                                                 "top_k": 5, "min_p": 0.05, "priority": 0})
    assert r.choices[0].text


# --------------------------------------------------------------------------- logit_bias
def test_logit_bias_forces_and_bans(client, demo_server):
    forced = tokenize(demo_server, " dragon")[-1]
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3,
                                  logprobs=0, logit_bias={str(forced): 100})
    text = httpx.post(demo_server.url + "/detokenize", json={"tokens": [forced] * 4}).json()["prompt"]
    assert r.choices[0].text == text
    greedy = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, temperature=0)
    top = tokenize(demo_server, PROMPT + greedy.choices[0].text)[-1]
    banned = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, temperature=0,
                                       logit_bias={str(top): -100})
    assert banned.choices[0].text != greedy.choices[0].text
    expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT, logit_bias={"512": 5}),
               "logit_bias")


def test_logit_bias_beyond_100_is_clamped_as_vllms_api_does(client, demo_server):
    """vLLM's API clamps each bias to [-100, 100]: 1000 samples as 100 does, -1000 as -100."""
    def text(bias):
        return client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=4, temperature=1.0,
                                         seed=3, logit_bias=bias).choices[0].text
    plain = text({})
    first = str(tokenize(demo_server, PROMPT + plain)[len(tokenize(demo_server, PROMPT))])   # its first token
    assert text({"300": 1000}) == text({"300": 100}) != plain
    assert text({first: -1000}) == text({first: -100}) != plain
    with pytest.raises(openai.BadRequestError) as info:   # only the keys that are no token id, in vLLM's words
        text({"5": 1, "x": 2})
    assert info.value.body["param"] == "logit_bias"
    assert info.value.body["message"] == ("logit_bias contains key(s) that cannot be converted to integer "
                                          "token IDs: ['x']")


# --------------------------------------------------------------------------- logprobs
def test_echo_logprobs_equal_transformers(client, demo_server, hf_logprobs):
    ids = tokenize(demo_server, PROMPT)
    r = client.completions.create(model="stories260k", prompt=ids, max_tokens=1, temperature=0, logprobs=2,
                                  echo=True)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = hf_logprobs(ids)
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)
        assert max(lp.top_logprobs[pos].values()) == pytest.approx(ref[pos - 1].max().item(), abs=1e-4)
    assert lp.token_logprobs[-1] == pytest.approx(ref[-1].max().item(), abs=1e-4)   # the greedy token
    # the prompt as vLLM echoes token ids: tokenizer.decode, its BOS written out
    assert r.choices[0].text.startswith("<s> " + PROMPT)
    assert lp.text_offset[:3] == [0, 4, 8]


def test_prompt_logprobs_shape(client, demo_server, hf_logprobs):
    ids = tokenize(demo_server, PROMPT)
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 3})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    ref = hf_logprobs(ids)
    for pos in range(1, len(ids)):
        entry = plp[pos]
        assert {e["rank"] for e in entry.values()} >= {1, 2, 3} and len(entry) in (3, 4)
        assert entry[str(ids[pos])]["logprob"] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4)


def test_echo_logprobs_bring_prompt_logprobs(client, demo_server, hf_logprobs):
    """vLLM scores the prompt for echo's logprobs and returns them as the choice's prompt_logprobs
    too (k = logprobs); an explicit prompt_logprobs keeps its own k; a stream carries none."""
    ids = tokenize(demo_server, PROMPT)
    ref = hf_logprobs(ids)
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2,
                                  echo=True)
    plp, lp = r.choices[0].model_extra["prompt_logprobs"], r.choices[0].logprobs
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        top2 = {k: v for k, v in plp[pos].items() if v["rank"] <= 2}
        assert [v["rank"] for v in top2.values()] == [1, 2]
        assert [v["logprob"] for v in top2.values()] == pytest.approx(ref[pos - 1].topk(2).values.tolist(), abs=1e-4)
        assert plp[pos][str(ids[pos])]["logprob"] == pytest.approx(lp.token_logprobs[pos], abs=1e-6)
        assert len(plp[pos]) in (2, 3)
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=0, logprobs=3, echo=True,
                                  extra_body={"prompt_logprobs": 0})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert [list(e) for e in plp[1:]] == [[str(t)] for t in ids[1:]]
    assert len(r.choices[0].logprobs.top_logprobs[1]) >= 3
    chunks = list(client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=2, logprobs=1,
                                            echo=True, stream=True))
    assert all("prompt_logprobs" not in c.choices[0].model_extra for c in chunks)


def test_chat_top_logprobs(client, demo_server, hf_logprobs):
    messages = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="stories260k", messages=messages, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=3)
    prompt = httpx.post(demo_server.url + "/tokenize", json={"messages": messages},
                        headers={"Authorization": f"Bearer {API_KEY}"}).json()["tokens"]
    ref = hf_logprobs(prompt)[-1]
    first = r.choices[0].logprobs.content[0]
    assert first.logprob == pytest.approx(ref.max().item(), abs=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)


def test_continuous_usage_stats(client):
    """Every chunk's usage counts the tokens streamed so far (however many a chunk carries: a
    loaded server sends several at once)."""
    chunks = list(client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=6, stream=True,
                                            temperature=0, logprobs=0,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None and c.usage.prompt_tokens > 0 for c in chunks)
    streamed = 0
    for c in chunks[:-1]:
        streamed += len(c.choices[0].logprobs.tokens)
        assert c.usage.completion_tokens == streamed
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == streamed == 6


# --------------------------------------------------------------------------- structured outputs
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "mood": {"type": "string", "enum": ["happy", "sad", "brave"]},
                         "age": {"type": "integer", "minimum": 1, "maximum": 120},
                         "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                                  "legs": {"type": "integer", "minimum": 0,
                                                                           "maximum": 4}},
                                 "required": ["kind", "legs"], "additionalProperties": False}},
          "required": ["name", "mood", "age", "pet"]}


def test_json_schema_output_validates_on_20_seeds(client):
    jsonschema = pytest.importorskip("jsonschema")
    r = client.chat.completions.create(
        model="stories260k", messages=[{"role": "user", "content": PROMPT}], n=20, seed=7, temperature=1.0,
        max_tokens=100, response_format={"type": "json_schema",
                                         "json_schema": {"name": "kid", "schema": SCHEMA, "strict": True}})
    assert len(r.choices) == 20
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({c.message.content for c in r.choices}) > 5   # sampled, not one fixed answer


def test_choice_regex_and_json_object(client):
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=10, n=6, seed=1,
                                  extra_body={"guided_choice": ["yes", "no", "maybe so"]})
    assert {c.text for c in r.choices} <= {"yes", "no", "maybe so"}
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=30, n=4, seed=2,
                                  extra_body={"structured_outputs": {"regex": "[a-c]{2,5}-[0-9]{3}"}})
    assert all(re.fullmatch("[a-c]{2,5}-[0-9]{3}", c.text) for c in r.choices), [c.text for c in r.choices]
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=60, seed=5, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT,
                                                 extra_body={"guided_regex": "a", "guided_choice": ["b"]}),
               "structured_outputs")


def test_bad_schema_is_a_400_naming_its_field(client):
    expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT,
                                                 extra_body={"guided_json": {"type": "object", "minProperties": "x"}}),
               "guided_json")
    msg = expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT,
                                                       extra_body={"guided_regex": "(["}), "guided_regex")
    assert msg.startswith("the regex structured-output spec does not compile: ") and ".cc:" not in msg, msg
    chat = dict(model="stories260k", messages=[{"role": "user", "content": PROMPT}], max_tokens=4)
    expect_400(lambda: client.chat.completions.create(**chat, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}), "response_format")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]
    expect_400(lambda: client.chat.completions.create(**chat, tools=tools, tool_choice="required"), "tools")


# --------------------------------------------------------------------------- demo chat template
def test_demo_model_ships_a_chat_template():
    from deepserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(DEMO_MODEL)
    text = tok.apply_chat_template([{"role": "system", "content": "Be kind."},
                                    {"role": "user", "content": "Once upon a time"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<s>Be kind.\nOnce upon a time"


# --------------------------------------------------------------------------- lm-eval loglikelihood
def test_lm_eval_local_completions_loglikelihood(demo_server, hf_logprobs, monkeypatch):
    """lm-eval's own API client (echo + logprobs=1, max_tokens=1 on token-id prompts) scores
    continuations; the sums must equal transformers' log_softmax over the same tokens."""
    pytest.importorskip("tenacity")   # lm-eval's [api] extra
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    lm = LocalCompletionsAPI(base_url=demo_server.v1 + "/completions", model="stories260k",
                             tokenizer_backend="huggingface", tokenizer=DEMO_MODEL, num_concurrent=1,
                             max_retries=1)
    pairs = [("Once upon a time, there was a little", " girl"),
             ("The cat sat on the", " mat and looked at the dog.")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    results = lm.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
        ref = hf_logprobs(whole)
        expected = sum(ref[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == all(ref[i - 1].argmax().item() == whole[i] for i in range(len(ctx), len(whole)))


def test_streamed_echo_logprobs_and_max_logprobs(client, demo_server):
    ids = tokenize(demo_server, PROMPT)
    kwargs = dict(model="stories260k", prompt=ids, max_tokens=3, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values = [], []
    for c in client.completions.create(**kwargs, stream=True):
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            values += c.choices[0].logprobs.token_logprobs
    assert tokens == whole.tokens and values[0] is None
    assert values[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-6)
    expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT, logprobs=21), "logprobs")
    expect_400(lambda: client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "x"}],
                                                      logprobs=True, top_logprobs=21), "top_logprobs")


def check_text_offsets(text: str, lp, absent: set) -> None:
    """Each token's text_offset points at it in the choice's text (tokens the text does not
    hold, like an added BOS, take no room), in order, streamed or not."""
    assert lp.text_offset == sorted(lp.text_offset) and len(lp.text_offset) == len(lp.tokens)
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert token in absent or text.startswith(token, offset), (token, offset, text)


def test_echo_text_offsets_point_into_the_text(client):
    kwargs = dict(model="stories260k", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.logprobs.tokens[0] == "<s>" and whole.text.startswith(PROMPT)
    check_text_offsets(whole.text, whole.logprobs, {"<s>"})
    offsets, text = [], ""
    for c in client.completions.create(**kwargs, stream=True):
        if c.choices:
            text += c.choices[0].text
            offsets += c.choices[0].logprobs.text_offset
    assert text == whole.text and offsets == whole.logprobs.text_offset


def test_allowed_token_ids_truncation_and_request_id(client, demo_server):
    allowed = tokenize(demo_server, " cat dog")[1:]
    r = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=2,
                                  logprobs=0, extra_body={"allowed_token_ids": allowed})
    ids = tokenize(demo_server, PROMPT + r.choices[0].text)[len(tokenize(demo_server, PROMPT)):]
    assert ids and set(ids) <= set(allowed)
    expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT,
                                                 extra_body={"allowed_token_ids": [9999]}), "allowed_token_ids")
    full = tokenize(demo_server, PROMPT)
    cut = client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=3, temperature=0,
                                    extra_body={"truncate_prompt_tokens": 4})
    ref = client.completions.create(model="stories260k", prompt=full[-4:], max_tokens=3, temperature=0)
    assert cut.usage.prompt_tokens == 4 and cut.choices[0].text == ref.choices[0].text
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=1, extra_body={"request_id": "abc"})
    assert r.id == "chatcmpl-abc"


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_is_the_prompt_alone(client, stream):
    """OpenAI's legacy scoring call (vLLM takes it too): echo with max_tokens 0 answers each prompt
    with its logprobs, finish_reason length and no completion tokens."""
    kwargs = dict(model="stories260k", prompt=[PROMPT, "The cat"], echo=True, logprobs=1, temperature=0)
    one = client.completions.create(**kwargs, max_tokens=1)   # the prompt, then one token
    if not stream:
        r = client.completions.create(**kwargs, max_tokens=0)
        choices, usage = r.choices, r.usage
    else:
        chunks = list(client.completions.create(**kwargs, max_tokens=0, stream=True,
                                                stream_options={"include_usage": True}))
        choices = sorted((c.choices[0] for c in chunks if c.choices), key=lambda c: c.index)
        assert len(choices) == 2   # one chunk per choice
        usage = chunks[-1].usage
    assert [c.text for c in choices] == [PROMPT, "The cat"]
    assert [c.finish_reason for c in choices] == ["length", "length"]
    assert usage.completion_tokens == 0 and usage.prompt_tokens == one.usage.prompt_tokens
    for got, want in zip(choices, one.choices):
        assert got.logprobs.tokens == want.logprobs.tokens[:-1]
        assert got.logprobs.text_offset == want.logprobs.text_offset[:-1]
        assert got.logprobs.token_logprobs[0] is None
        assert got.logprobs.token_logprobs[1:] == pytest.approx(want.logprobs.token_logprobs[1:-1], abs=1e-4)
    expect_400(lambda: client.completions.create(model="stories260k", prompt=PROMPT, max_tokens=0), "max_tokens")


def test_top_logprobs_0_without_logprobs_and_metadata(client):
    messages = [{"role": "user", "content": "Once upon a time"}]
    r = client.chat.completions.create(model="stories260k", messages=messages, max_tokens=2, top_logprobs=0)
    assert r.choices[0].logprobs is None
    expect_400(lambda: client.chat.completions.create(model="stories260k", messages=messages, max_tokens=2,
                                                      top_logprobs=1), "top_logprobs")
    # metadata labels a stored completion on OpenAI; nothing is stored here, so it is only checked
    r = client.chat.completions.create(model="stories260k", messages=messages, max_tokens=2, metadata={"run": "qa"})
    assert r.choices[0].message.content
    expect_400(lambda: client.chat.completions.create(model="stories260k", messages=messages, max_tokens=2,
                                                      metadata={str(i): "x" for i in range(17)}), "metadata")
    expect_400(lambda: client.chat.completions.create(model="stories260k", messages=messages, max_tokens=2,
                                                      metadata={"k": "v" * 513}), "metadata")


def test_text_parts_join_with_newlines(client, demo_server):
    """A message's text parts reach the template joined by newlines, as vLLM joins them for
    templates that take string content (the prompt was the parts run together)."""
    def prompt_ids(content):
        r = httpx.post(demo_server.url + "/tokenize", json={"messages": [{"role": "user", "content": content}]},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        return r.json()["tokens"]
    parts = [{"type": "text", "text": "Once upon a time"}, {"type": "text", "text": "there was a cat"}]
    assert prompt_ids(parts) == prompt_ids("Once upon a time\nthere was a cat")
    r = client.chat.completions.create(model="stories260k", messages=[{"role": "user", "content": parts}], max_tokens=1)
    assert r.usage.prompt_tokens == len(prompt_ids("Once upon a time\nthere was a cat"))


def test_the_stop_token_is_counted_not_written(client, demo_server):
    """As vLLM: the token that ends a completion (one of stop_token_ids, or EOS with
    skip_special_tokens false) counts as a completion token and is its stop_reason, but its
    text is left out unless include_stop_str_in_output (it was written)."""
    head, whole = tokenize(demo_server, "Once upon"), tokenize(demo_server, "Once upon a")
    assert whole[:len(head)] == head and len(whole) == len(head) + 1
    base = dict(model="stories260k", prompt="Once upon", temperature=0, max_tokens=8)
    r = client.completions.create(**base, extra_body={"stop_token_ids": [whole[-1]]})
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    assert r.choices[0].model_extra["stop_reason"] == whole[-1]
    kept = client.completions.create(**base, extra_body={"stop_token_ids": [whole[-1]],
                                                         "include_stop_str_in_output": True})
    assert kept.choices[0].text == " a"
    eos = {"logit_bias": {"2": 100}, "skip_special_tokens": False}   # the demo model's EOS, forced
    r = client.completions.create(**base, extra_body=eos)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    kept = client.completions.create(**base, extra_body={**eos, "include_stop_str_in_output": True})
    assert kept.choices[0].text == "</s>"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        **base, stream=True, extra_body={"stop_token_ids": [whole[-1]]}) if c.choices)
    assert streamed == ""
