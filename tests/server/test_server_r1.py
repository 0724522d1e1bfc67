"""The R1 reasoning split end to end: the real DeepSeek-R1 tokenizer and chat template (which
opens `<think>\\n` in the prompt) on a model whose greedy output is a fixed script with
`</think>` in the middle; streamed and non-streamed responses must split it the same way."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import launch

REASONING = "Okay, the user asks for a sum; adding them gives four."
ANSWER = "The answer is 4"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def client(r1_server):
    return openai.OpenAI(base_url=r1_server.v1, api_key="unused", max_retries=0, timeout=60)


def test_non_streamed_split(client):
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0)
    msg = r.choices[0].message
    assert msg.content == ANSWER
    assert msg.reasoning_content == REASONING and msg.reasoning == REASONING
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 22          # the script's 21 tokens + EOS


def test_streamed_split_matches(client):
    chunks = list(client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    also = "".join(getattr(d, "reasoning", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, also, content) == (REASONING, REASONING, ANSWER)
    assert not any("think>" in (d.content or "") + (getattr(d, "reasoning_content", None) or "")
                   for d in deltas)
    # streamed as it comes (a loaded machine may put a few tokens in one event, never all of them)
    assert sum(1 for d in deltas if getattr(d, "reasoning_content", None)) > 1


def test_cut_inside_reasoning_is_all_reasoning(client):
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0, max_tokens=5)
    msg = r.choices[0].message
    assert msg.content is None and REASONING.startswith(msg.reasoning_content) and msg.reasoning_content
    assert r.choices[0].finish_reason == "length"


def test_completions_endpoint_keeps_raw_text(client, r1_server):
    ids = httpx.post(r1_server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert ids[-2:] == [128798, 201]                # the template opened "<think>\n"
    r = client.completions.create(model="tiny-r1", prompt=ids, max_tokens=40, temperature=0)
    assert r.choices[0].text == f"{REASONING}</think>\n\n{ANSWER}"


def test_echoed_bos_takes_no_room(client, r1_server):
    from test_server_openai_features import check_text_offsets
    ids = httpx.post(r1_server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    r = client.completions.create(model="tiny-r1", prompt=ids, max_tokens=6, temperature=0, echo=True, logprobs=1)
    choice = r.choices[0]
    bos = "<｜begin▁of▁sentence｜>"       # echoed token ids are vLLM's tokenizer.decode(ids): the BOS stays
    assert choice.logprobs.tokens[0] == bos and choice.text.startswith(bos + "Be brief.")
    check_text_offsets(choice.text, choice.logprobs, set())
    assert choice.text.endswith("<｜Assistant｜><think>\nOkay, the user asks for")


def test_chat_template_kwargs_override_the_switches(r1_server):
    def tokens(**body):
        r = httpx.post(r1_server.url + "/tokenize", json={"messages": MESSAGES, **body})
        return r.status_code, r.json()
    plain = tokens(add_generation_prompt=False)
    assert plain[0] == 200 and plain[1]["tokens"][-1] != 201                # no "<think>\n" opened
    assert tokens(chat_template_kwargs={"add_generation_prompt": False}) == plain
    status, body = tokens(chat_template_kwargs={"messages": []})
    assert status == 400 and body["error"]["param"] == "chat_template_kwargs"


def test_developer_message_is_the_system_prompt(r1_server):
    """R1's template renders system turns only: a developer message (OpenAI's name for the
    instructions) goes in as one, rather than vanishing from the prompt."""
    def tokens(*messages):
        return httpx.post(r1_server.url + "/tokenize", json={"messages": list(messages)}).json()["tokens"]
    user = MESSAGES[1]
    with_system = tokens({"role": "system", "content": "Be brief."}, user)
    assert len(with_system) > len(tokens(user))
    assert tokens({"role": "developer", "content": "Be brief."}, user) == with_system


def test_streamed_prompt_logprobs_when_the_first_tokens_print_nothing(r1_server):
    """The model answers this prompt with BOS tokens (special: no text): the stream's only chunk
    still carries prompt_logprobs (they went with a first chunk that was never sent)."""
    body = {"model": "tiny-r1", "prompt": "What is 2+2?", "max_tokens": 3, "temperature": 0, "prompt_logprobs": 1}
    whole = httpx.post(r1_server.v1 + "/completions", json=body).json()["choices"][0]
    assert whole["text"] == "" and len(whole["prompt_logprobs"]) == 7   # its 7 tokens (no BOS, as vLLM's)
    with httpx.stream("POST", r1_server.v1 + "/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    sent = [c["choices"][0]["prompt_logprobs"] for c in chunks if "prompt_logprobs" in c["choices"][0]]
    assert sent == [whole["prompt_logprobs"]]


def test_include_reasoning_false_drops_it(client):
    r = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0,
                                       extra_body={"include_reasoning": False})
    msg = r.choices[0].message
    assert msg.content == ANSWER and getattr(msg, "reasoning_content", None) is None
    chunks = list(client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0, stream=True,
                                                 extra_body={"include_reasoning": False}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ANSWER
    assert not any(getattr(d, "reasoning_content", None) or getattr(d, "reasoning", None) for d in deltas)


PREFILL = "Okay, the user asks"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_continue_final_message_and_echo(client, r1_server, stream):
    """An assistant prefill is continued (its end-of-turn token cut as transformers does), and
    echo opens the reply with it."""
    transformers = pytest.importorskip("transformers")
    from conftest import R1_TOKENIZER
    messages = MESSAGES + [{"role": "assistant", "content": PREFILL}]
    cont = {"add_generation_prompt": False, "continue_final_message": True}
    ours = httpx.post(r1_server.url + "/tokenize", json={"messages": messages, **cont}).json()["tokens"]
    tok = transformers.AutoTokenizer.from_pretrained(str(R1_TOKENIZER))
    theirs = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    assert ours == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    for echo in (False, True):
        kw = dict(model="tiny-r1", messages=messages, temperature=0, extra_body={**cont, "echo": echo})
        if stream:
            deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw) if c.choices]
            reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
            content = "".join(d.content or "" for d in deltas)
        else:
            msg = client.chat.completions.create(**kw).choices[0].message
            reasoning, content = msg.reasoning_content, msg.content
        # a prompt without a think tag leaves the reasoning open (vLLM's): the continued text is
        # reasoning up to </think>; echo opens the content with the prefill
        assert reasoning == REASONING[len(PREFILL):]
        assert content == (PREFILL if echo else "") + ANSWER
    # a prefill inside <think>: the rest of the reasoning, then the answer, split as usual
    thinking = MESSAGES + [{"role": "assistant", "content": "<think>\n" + PREFILL}]
    msg = client.chat.completions.create(model="tiny-r1", messages=thinking, temperature=0, extra_body=cont).choices[0].message
    assert (msg.reasoning_content, msg.content) == (REASONING[len(PREFILL):], ANSWER)
    both = httpx.post(r1_server.v1 + "/chat/completions", json={"model": "tiny-r1", "messages": messages,
                                                                  "continue_final_message": True})
    assert both.status_code == 400 and "add_generation_prompt" in both.json()["error"]["message"]


TINY_V3 = {"num_hidden_layers": 2, "first_k_dense_replace": 1, "hidden_size": 64, "intermediate_size": 128,
           "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
           "topk_group": 1, "num_attention_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
           "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
           "max_position_embeddings": 1024, "num_nextn_predict_layers": 0}


@pytest.fixture(scope="module")
def v3_server(echo_model):
    """The deepseek-r1 preset shrunk to a tiny random DeepSeek-V3 (MLA + MoE), real R1 tokenizer
    and template (`echo_model` only guarantees the shared tokenizer is there)."""
    import json
    from conftest import R1_TOKENIZER
    server = launch("deepseek-r1", "--tokenizer", str(R1_TOKENIZER), "--hf-overrides", json.dumps(TINY_V3),
                    "--num-gpu-blocks-override", "128", "--reasoning-parser", "deepseek_r1")
    yield server
    server.stop()


def test_tiny_deepseek_v3_chat(v3_server):
    client = openai.OpenAI(base_url=v3_server.v1, api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["deepseek-r1"]
    kw = dict(model="deepseek-r1", messages=MESSAGES, temperature=0, max_tokens=12)
    r = client.chat.completions.create(logprobs=True, top_logprobs=2, **kw)
    (first,) = r.choices
    # random weights never close </think> here: the whole output is reasoning
    assert first.message.content is None and first.message.reasoning_content
    assert len(first.logprobs.content) == 12 and r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                       for c in chunks if c.choices)
    assert streamed == first.message.reasoning_content
    plain = client.completions.create(model="deepseek-r1", prompt="Hello", max_tokens=12, temperature=0)
    assert plain.usage.completion_tokens == 12
