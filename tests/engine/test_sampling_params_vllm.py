"""SamplingParams as vLLM 0.26 builds it: its validation messages, the values __post_init__
settles (greedy filters off, the temperature floor), clone() and __repr__. No model needed."""
from __future__ import annotations

import logging

import pytest

from deepserve import SamplingParams
from deepserve.sampling_params import StructuredOutputsParams


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be at least 1, got 0."),
    (dict(n=16385), "n must be at most 16384, got 16385."),
    (dict(top_k=-2), "top_k must be 0 (disable), or at least 1, got -2."),
    (dict(stop=["a", ""]), "stop cannot contain an empty string."),
    (dict(stop=""), "stop cannot contain an empty string."),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
    (dict(min_tokens=-1), "min_tokens must be greater than or equal to 0, got -1."),
    (dict(min_tokens=20), "min_tokens must be less than or equal to max_tokens=16, got 20."),
    (dict(repetition_penalty=0.0), "repetition_penalty must be greater than zero, got 0.0."),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number, got inf."),
    (dict(temperature=-1.0), "temperature must be non-negative, got -1.0."),
    (dict(temperature=float("nan")), "temperature must be a finite number, got nan."),
    (dict(temperature=2.5), "temperature must be in [0, 2], got 2.5."),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5."),
    (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2], got 3.0."),
    (dict(frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2], got -3.0."),
    (dict(n=2, temperature=0.0), "n must be 1 when using greedy sampling, got 2."),
    (dict(n=None), "n must be an integer, got None"),   # vLLM: "n must be an int"
    (dict(min_tokens=None), "min_tokens must be an integer, got None"),
])
def test_refusals_in_vllms_words(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert str(err.value) == message


def test_greedy_turns_the_filters_off_and_a_tiny_temperature_is_raised(caplog):
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=3, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    assert (SamplingParams(top_p=0.5, top_k=3).top_p, SamplingParams(top_k=3).top_k) == (0.5, 3)
    with caplog.at_level(logging.WARNING, logger="deepserve"):
        assert SamplingParams(temperature=1e-6).temperature == 0.01
    assert "temperature 1e-06 is below 0.01" in caplog.text
    assert SamplingParams(temperature=0.01).temperature == 0.01


def test_repr_is_vllms():
    params = SamplingParams(temperature=0.5, stop="x", structured_outputs=StructuredOutputsParams(regex="a"))
    assert repr(SamplingParams()) == (
        "SamplingParams(n=1, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, temperature=1.0, "
        "top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[], stop_token_ids=[], bad_words=[], "
        "thinking_token_budget=None, include_stop_str_in_output=False, ignore_eos=False, max_tokens=16, "
        "min_tokens=0, logprobs=None, prompt_logprobs=None, skip_special_tokens=True, "
        "spaces_between_special_tokens=True, structured_outputs=None, extra_args=None)")
    assert "temperature=0.5, " in repr(params) and "stop=['x'], " in repr(params)
    assert f"structured_outputs={params.structured_outputs!r}, extra_args=None)" in repr(params)


def test_clone_is_deep_unless_skip_clone():
    params = SamplingParams(stop=["x"], extra_args={"k": [1]})
    copy = params.clone()
    assert copy == params and copy.extra_args is not params.extra_args
    shared = SamplingParams(stop=["x"], extra_args={"k": [1]}, skip_clone=True)
    copy = shared.clone()
    assert copy == shared and copy is not shared and copy.extra_args is shared.extra_args


def test_from_optional_sampling_type_and_num_logprobs():
    from deepserve.sampling_params import SamplingType

    params = SamplingParams.from_optional(n=None, temperature=None, top_p=None, presence_penalty=None,
                                          frequency_penalty=None, repetition_penalty=None, max_tokens=5,
                                          logit_bias={"5": 300.0, 7: -500.0, 9: 1.5})
    assert params == SamplingParams(max_tokens=5, logit_bias={5: 100.0, 7: -100.0, 9: 1.5})
    with pytest.raises(ValueError) as err:
        SamplingParams.from_optional(logit_bias={"x": 1.0, 3: 1.0, None: 2.0})
    assert str(err.value) == "logit_bias contains key(s) that cannot be converted to integer token IDs: ['x', None]"
    assert [SamplingParams(temperature=0).sampling_type, SamplingParams().sampling_type,
            SamplingParams(seed=3).sampling_type] == [SamplingType.GREEDY, SamplingType.RANDOM, SamplingType.RANDOM_SEED]
    assert (SamplingParams().num_logprobs, SamplingParams(logprobs=0).num_logprobs,
            SamplingParams(logprob_token_ids=[4, 5, 6]).num_logprobs) == (None, 0, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(grammar=""), "structured_outputs.grammar cannot be an empty string"),
    (dict(grammar="  \n"), "structured_outputs.grammar cannot be an empty string"),
    (dict(json=" "), "structured_outputs.json cannot be an empty string"),
])
def test_empty_grammar_or_schema_refused_as_vllm(kwargs, message):
    with pytest.raises(ValueError) as err:
        StructuredOutputsParams(**kwargs)
    assert str(err.value) == message


def test_top_k_minus_one_is_kept_as_vllm_keeps_it_and_samples_as_off():
    import torch

    from deepserve.ops.sampling import sampling_probs

    params = SamplingParams(top_k=-1)
    assert params.top_k == -1 and "top_k=-1, " in repr(params)
    assert SamplingParams(top_k=-1, temperature=0).top_k == 0   # greedy turns it off as vLLM's
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(2)
    off, minus_one = (sampling_probs(logits, ones, torch.full((2,), k), ones, torch.zeros(2)) for k in (0, -1))
    assert torch.equal(off, minus_one) and torch.allclose(off, logits.softmax(-1))


def test_every_vllm_field_is_taken():
    """Each field vLLM 0.26's SamplingParams takes as input is a keyword here: the prefix-cache
    switch, and routed_experts_prompt_start at its default (no routed experts are returned)."""
    assert SamplingParams(skip_reading_prefix_cache=True, routed_experts_prompt_start=0).skip_reading_prefix_cache
    with pytest.raises(ValueError, match="routed_experts_prompt_start=4 is not supported"):
        SamplingParams(routed_experts_prompt_start=4)
