"""The offline API as vLLM 0.26 users write it: `from deepserve import LLM, SamplingParams` and
scripts in the style of vLLM's examples, on the demo model (stories260k)."""
from __future__ import annotations

import json
import shutil

import pytest

from deepserve import LLM, SamplingParams
from deepserve.config import DEMO_MODEL
from deepserve.engine.llm_engine import RequestError

GREEDY = SamplingParams(temperature=0, max_tokens=4)
# the demo model ships no chat template: BOS, then the turns' text
DEMO_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
# writes "A:" where a reply starts, and the tools' names
TEMPLATE = ("{{ bos_token }}{% for t in tools or [] %}[{{ t['function']['name'] }}]{% endfor %}"
            "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}")


@pytest.fixture(scope="module")
def llm():
    with LLM(max_model_len=64, disable_log_stats=True, tokenizer_mode="auto", revision=None,
             chat_template=DEMO_TEMPLATE) as llm:
        yield llm


def test_vllm_names_import():
    from deepserve import LLMEngine, PromptType, TextPrompt, TokensPrompt  # noqa: F401
    from deepserve.outputs import CompletionOutput, Logprob, RequestOutput  # noqa: F401
    from deepserve.sampling_params import BeamSearchParams, RequestOutputKind, StructuredOutputsParams  # noqa: F401

    assert Logprob(-0.5) == Logprob(logprob=-0.5, rank=None, decoded_token=None)
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}


def test_outputs_carry_vllms_fields(llm):
    out = llm.generate("Once upon a time", GREEDY, use_tqdm=False)[0]
    assert (out.encoder_prompt, out.encoder_prompt_token_ids, out.kv_transfer_params, out.ec_transfer_params,
            out.lora_request) == (None,) * 5
    assert (out.outputs[0].routed_experts, out.outputs[0].lora_request) == (None, None)


def test_a_request_past_max_model_len_stops_there(llm):
    """vLLM's engine stops a request at max_model_len with finish_reason "length" (offline it
    is not refused); a prompt of max_model_len tokens or more is refused."""
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=100, min_tokens=80,
                                                          ignore_eos=True))[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
    assert out.outputs[0].finish_reason == "length"
    out = llm.generate("Once", SamplingParams(max_tokens=None, min_tokens=100, ignore_eos=True))[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64
    with pytest.raises(ValueError, match=r"prompt \(length 64\) plus the number of requested output tokens"):
        llm.generate({"prompt_token_ids": [5] * 64}, GREEDY)
    with pytest.raises(ValueError, match=r"prompt \(length 70\) is longer than the maximum model length of 64"):
        llm.generate({"prompt_token_ids": [5] * 70}, GREEDY)


def test_an_empty_prompt_is_refused_with_vllms_text(llm):
    with pytest.raises(ValueError, match="^The decoder prompt cannot be empty$"):
        llm.generate({"prompt_token_ids": []}, GREEDY)
    assert llm.generate("", GREEDY)[0].prompt_token_ids == [1]   # BOS only: not empty


def test_a_bad_prompt_in_a_batch_leaves_nothing_queued(llm):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate(["Once upon a time", {"prompt_token_ids": [1, 9999]}], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_prompt_forms_and_generate_keywords(llm):
    from deepserve import TextPrompt, TokensPrompt

    ids = llm.get_tokenizer().encode("Once upon a time")
    want = llm.generate("Once upon a time", GREEDY)[0].outputs[0].text
    assert [o.outputs[0].text for o in llm.generate([TextPrompt(prompt="Once upon a time"),
                                                     TokensPrompt(prompt_token_ids=ids)], GREEDY)] == [want] * 2
    truncated = llm.generate("Once upon a time", GREEDY, tokenization_kwargs={"truncate_prompt_tokens": 2})[0]
    assert truncated.prompt_token_ids == ids[-2:]
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"truncate_prompt_tokens={limit + 1} cannot be greater than max_model_len"):
        llm.generate("Once", GREEDY, tokenization_kwargs={"truncate_prompt_tokens": limit + 1})
    assert llm.generate("Once upon a time", GREEDY, tokenization_kwargs={"truncate_prompt_tokens": -1})[0] \
        .prompt_token_ids == ids
    plain = llm.generate("Once", GREEDY, tokenization_kwargs={"add_special_tokens": False})[0]
    assert plain.prompt_token_ids == llm.get_tokenizer().encode("Once", add_special_tokens=False) != ids[:2]
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "Once", "multi_modal_data": {"image": None}}, GREEDY)
    with pytest.raises(ValueError, match="lora_request is not supported"):
        llm.generate("Once", GREEDY, lora_request=object())
    with pytest.raises(ValueError, match=r"lengths of prompts \(2\) and priority \(1\)"):
        llm.generate(["a", "b"], GREEDY, priority=[0])
    with pytest.raises(ValueError, match="priority scheduling is not enabled"):
        llm.generate(["a", "b"], GREEDY, priority=[1, 0])
    with pytest.raises(ValueError, match="sample logprobs of 21, which is greater than max allowed: 20"):
        llm.generate("Once", SamplingParams(logprobs=21))
    bars = []

    def bar(*args, **kw):   # as vLLM calls it: over the prompts being rendered, then with the total
        from tqdm import tqdm
        bars.append(kw)
        return tqdm(*args, disable=True, **kw)
    llm.generate(["a", "b"], GREEDY, use_tqdm=bar)
    assert [b["desc"] for b in bars] == ["Rendering prompts", "Processed prompts"] and bars[1]["total"] == 2


def test_sampling_params_vllm_fields(llm):
    from deepserve.sampling_params import RequestOutputKind, StructuredOutputsParams

    out = llm.generate("Once upon a time", SamplingParams(
        max_tokens=8, seed=0, structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))[0]
    assert out.outputs[0].text in ("yes", "no")
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True, detokenize=False, extra_args={"k": 1},
                            output_kind=RequestOutputKind.DELTA, seed=-1, spaces_between_special_tokens=True)
    assert (params.logprobs, params.seed, params.extra_args) == (1, None, {"k": 1})
    quiet, loud = (llm.generate("Once upon a time", p)[0].outputs[0]
                   for p in (params, SamplingParams(temperature=0, max_tokens=4, logprobs=1)))
    assert quiet.token_ids == loud.token_ids and loud.text and quiet.text == ""
    assert {lp.decoded_token for entry in quiet.logprobs for lp in entry.values()} == {None}
    for bad, message in ((dict(stop=["x"], detokenize=False), "stop strings are only supported when detokenize"),
                         (dict(flat_logprobs=True), "flat_logprobs"), (dict(temperature=2.5), r"\[0, 2\]")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)
    for bad, message in ((dict(n=2.0), "n must be an integer, got 2.0"), (dict(top_k=3.5), "top_k must be an integer"),
                         (dict(logprobs=1.5), "logprobs must be an integer"), (dict(seed=1.5), "seed must be an integer"),
                         (dict(stop_token_ids=["a"]), "stop_token_ids must contain only integers")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="whitespace_pattern is not supported"):
        StructuredOutputsParams(regex="a", whitespace_pattern=" ")


def test_default_sampling_params_come_from_the_generation_config(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95,
                                                              "max_new_tokens": 5}))
    with LLM(str(model)) as llm:
        assert llm.llm_engine is llm.engine
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.top_p, params.max_tokens) == (0.6, 0.95, 5)
        assert len(llm.generate("Once", SamplingParams(ignore_eos=True, max_tokens=7))[0].outputs[0].token_ids) == 7
        assert len(llm.generate("Once upon a time")[0].outputs[0].token_ids) <= 5
    with pytest.raises(ValueError, match="cpu_offload_gb=4 is not supported"):
        LLM(str(model), cpu_offload_gb=4)
    with pytest.raises(ValueError, match="tokenizer_mode='slow' is not supported"):
        LLM(str(model), tokenizer_mode="slow")
    with LLM(str(model), generation_config="vllm") as llm:
        assert llm.get_default_sampling_params() == SamplingParams()


def test_chat_takes_vllms_arguments(llm):
    user = [{"role": "user", "content": "Once upon a time"}]
    one = llm.chat(user, GREEDY)[0]
    assert one.prompt == "<s>Once upon a time" and one.outputs[0].text
    both = llm.chat([user, [{"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]}]], GREEDY)
    assert [o.outputs[0].text for o in both] == [one.outputs[0].text] * 2
    # vLLM's third positional argument is use_tqdm, not add_generation_prompt
    assert llm.chat(user, GREEDY, False, chat_template=TEMPLATE)[0].prompt == "<s>Once upon a time A:"
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert llm.chat(user, GREEDY, chat_template=TEMPLATE, tools=tools,
                    add_generation_prompt=False)[0].prompt == "<s>[weather]Once upon a time"
    # as vLLM's offline chat: chat_template_kwargs give what the arguments leave unset
    kwargs = {"tools": tools, "add_generation_prompt": False}
    assert llm.chat(user, GREEDY, chat_template=TEMPLATE, chat_template_kwargs=kwargs)[0].prompt == \
        "<s>[weather]Once upon a time A:"
    with pytest.raises(ValueError, match="cannot set bos_token"):
        llm.chat(user, GREEDY, chat_template_kwargs={"bos_token": "x"})
    prefill = user + [{"role": "assistant", "content": ", there"}]
    cont = llm.chat(prefill, GREEDY, add_generation_prompt=False, continue_final_message=True)[0]
    assert cont.prompt == "<s>Once upon a time, there"
    with pytest.raises(ValueError, match="looks like a file path"):
        llm.chat(user, GREEDY, chat_template="templates/missing.jinja")
    with pytest.raises(ValueError, match="image_url"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY)


def test_chat_hands_tool_call_arguments_to_the_template_as_vllm(llm):
    """A past tool call's JSON arguments are an object to `tojson` (vLLM parses them) and their
    text where a template joins them into the prompt (R1's)."""
    turns = [{"role": "user", "content": "Once"},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    template = ("{{ bos_token }}{% for m in messages %}{% for c in m.tool_calls or [] %}"
                "{{ c.function.arguments | tojson }}|{{ '' + c.function.arguments }}{% endfor %}{% endfor %}")
    assert llm.chat(turns, GREEDY, chat_template=template)[0].prompt == '<s>{"a": 1}|{"a": 1}'
    # a template that joins every turn's content: the tool-call turn's None is "" to it
    joined = "{{ bos_token }}{% for m in messages %}{{ m['content'] + '|' }}{% endfor %}"
    assert llm.chat(turns, GREEDY, chat_template=joined)[0].prompt == "<s>Once||"
    # vLLM's parse_chat_messages: empty arguments are {}, text that is not JSON a ValueError
    turns[1]["tool_calls"][0]["function"]["arguments"] = ""
    assert llm.chat(turns, GREEDY, chat_template=template)[0].prompt == "<s>{}|{}"
    turns[1]["tool_calls"][0]["function"]["arguments"] = "{'a': 1}"
    with pytest.raises(ValueError, match=r"tool_calls\[0\]\.function\.arguments is not JSON"):
        llm.chat(turns, GREEDY, chat_template=template)


def test_beam_search_takes_vllms_arguments(llm):
    from deepserve import BeamSearchParams

    params = BeamSearchParams(beam_width=2, max_tokens=3)
    prompts = ["Once upon a time", {"prompt": "Lily"}]
    together = llm.beam_search(prompts, params)
    assert [[b.tokens for b in o.sequences] for o in llm.beam_search(prompts, params, concurrency_limit=1)] == \
        [[b.tokens for b in o.sequences] for o in together]
    with pytest.raises(ValueError, match="lora_request is not supported"):
        llm.beam_search(prompts, params, object())


def test_from_engine_args_and_a_cli_parser_as_vllms_example():
    """vLLM's examples/offline_inference/basic/generate.py: EngineArgs' flags on a parser, then
    LLM(**vars(args)) or LLM.from_engine_args."""
    import argparse

    from deepserve import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = vars(parser.parse_args(["--max-model-len", "48", "--max-num-seqs", "2"]))
    with LLM(**args) as llm:
        assert llm.llm_engine.max_model_len == 48
    with LLM.from_engine_args(EngineArgs(max_model_len=40)) as llm:
        assert llm.llm_engine.max_model_len == 40


def test_dtype_takes_vllms_names_and_seed_is_an_integer():
    import torch

    from deepserve import EngineArgs

    assert [EngineArgs(dtype=d).dtype for d in ("half", "float", torch.bfloat16, torch.float32)] == \
        ["float16", "float32", "bfloat16", "float32"]
    with pytest.raises(ValueError, match="seed must be an integer, got None"):
        EngineArgs(seed=None)
    with LLM(dtype=torch.float32, max_model_len=32) as llm:
        assert llm.generate("Once upon a time", GREEDY)[0].outputs[0].text


def test_vllm_config_arguments_are_taken_or_refused_by_name():
    with LLM(max_model_len=32, spec_method="ngram", spec_tokens=2, logprobs_mode="raw_logprobs",
             structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True}) as llm:
        assert llm.engine.config.speculative is not None
        assert llm.generate("Once upon a time", GREEDY)[0].outputs[0].text
    for bad, message in ((dict(structured_outputs_config={"backend": "outlines"}), "backend 'outlines'"),
                         (dict(structured_outputs_config={"disable_fallback": True}),
                          "structured_outputs_config disable_fallback is not supported"),
                         (dict(structured_outputs_config={"enable_in_reasoning": "yes"}),
                          "enable_in_reasoning must be true or false"),
                         (dict(reasoning_parser="deepseek_r1", structured_outputs_config={"reasoning_parser": "x"}),
                          "reasoning_parser 'x' is not supported"),
                         (dict(attention_config={"backend": "FLASHINFER"}), "attention_config="),
                         (dict(logprobs_mode="processed_logprobs"), "logprobs_mode='processed_logprobs'"),
                         (dict(spec_tokens=3, speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
                          "disagree")):
        with pytest.raises(ValueError, match=message):
            LLM(**bad)


def test_enqueue_then_wait_for_completion(llm):
    want = [o.outputs[0].text for o in llm.generate(["Once upon a time", "Lily"], GREEDY)]
    ids = llm.enqueue(["Once upon a time", "Lily"], [GREEDY, SamplingParams(temperature=0, max_tokens=4,
                                                                             detokenize=False)])
    assert len(ids) == 2
    # a generate() meanwhile runs the queued requests too, and returns only its own
    assert llm.generate("Once upon a time", GREEDY)[0].outputs[0].text == want[0]
    outs = llm.wait_for_completion()
    assert [o.request_id for o in outs] == ids
    assert [o.outputs[0].text for o in outs] == [want[0], ""] and outs[1].outputs[0].token_ids
    assert llm.wait_for_completion() == []


def test_logprobs_minus_one_is_the_whole_vocabulary(llm, monkeypatch):
    """vLLM's -1: every token's logprob, at each generated and each prompt position; counted
    as the vocabulary's size against max_logprobs."""
    import math

    with pytest.raises(ValueError, match="^Requested sample logprobs of 512, which is greater than max allowed: 20"):
        llm.generate("Once", SamplingParams(logprobs=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="^prompt_logprobs must be non-negative or -1, got -2.$"):
        SamplingParams(prompt_logprobs=-2)
    monkeypatch.setattr(llm, "max_logprobs", -1)
    out = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=2, logprobs=-1, prompt_logprobs=-1),
                       use_tqdm=False)[0]
    for entry in out.outputs[0].logprobs + out.prompt_logprobs[1:]:
        assert len(entry) == 512 and sorted(lp.rank for lp in entry.values()) == list(range(1, 513))
        assert math.isclose(sum(math.exp(lp.logprob) for lp in entry.values()), 1.0, rel_tol=1e-4)
    top = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=2, logprobs=3), use_tqdm=False)[0]
    assert {t: lp.logprob for t, lp in top.outputs[0].logprobs[1].items()} == pytest.approx(
        {t: lp.logprob for t, lp in out.outputs[0].logprobs[1].items() if lp.rank <= 3})
    engine = llm.engine   # vLLM's LLMEngine.add_request takes -1 too
    rid = engine.add_request(None, {"prompt_token_ids": [1, 403]}, SamplingParams(max_tokens=1, logprobs=-1))
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished and o.request_id == rid]
    assert len(done[0].outputs[0].logprobs[0]) == 512


def test_request_ids_count_from_zero_per_llm_as_vllms(llm):
    """vLLM's LLM numbers its requests "0", "1", ... (scripts sort outputs by int(request_id))."""
    first = [int(o.request_id) for o in llm.generate(["Once", "Lily", "Tom"], GREEDY, use_tqdm=False)]
    assert first == list(range(first[0], first[0] + 3))
    assert int(llm.generate("Once", GREEDY, use_tqdm=False)[0].request_id) == first[-1] + 1
    assert llm.enqueue("Once", GREEDY) == [str(first[-1] + 2)]
    assert [o.request_id for o in llm.wait_for_completion()] == [str(first[-1] + 2)]


def test_spaces_between_special_tokens_false_is_served(llm):
    """vLLM's fast detokenizer takes either value; its stream writes special tokens side by side."""
    params = dict(max_tokens=3, logit_bias={2: 100.0}, ignore_eos=True, skip_special_tokens=False)   # EOS thrice
    for flag in (True, False):
        out = llm.generate("Once", SamplingParams(**params, spaces_between_special_tokens=flag), use_tqdm=False)[0]
        assert (out.outputs[0].token_ids, out.outputs[0].text) == ([2, 2, 2], "</s></s></s>")


def test_logit_bias_beyond_100_is_applied_as_vllms_sampling_params(llm):
    """vLLM's SamplingParams takes any finite bias (only its API clips to [-100, 100]): +200
    wins over +100."""
    forced = llm.generate("Once", SamplingParams(temperature=0, max_tokens=3, logit_bias={5: 100.0, 6: 200.0}),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert forced == [6, 6, 6]
    with pytest.raises(ValueError, match="logit_bias must map token ids >= 0 to finite values, got 5: nan"):
        SamplingParams(logit_bias={5: float("nan")})
