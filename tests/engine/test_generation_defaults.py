"""Default sampling params from generation_config.json and --override-generation-config (vLLM's
get_diff_sampling_param): values that make no valid SamplingParams are one error at start, naming
where they came from, instead of failing every request that leaves the field out."""
import json
import re
import shutil

import pytest

from deepserve.config import DEMO_MODEL
from deepserve.engine.llm_inputs import generation_defaults
from deepserve.engine.sampling_params import SamplingParams


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95,
                                                               "max_new_tokens": 64, "do_sample": True}))
    return folder


def test_defaults_read_and_overridden(model):
    assert generation_defaults("auto", str(model)) == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 64}
    got = generation_defaults("auto", str(model), {"temperature": 0.0, "unknown_key": 1})
    assert got == {"temperature": 0.0, "top_p": 0.95, "max_tokens": 64}   # keys vLLM does not read: ignored
    SamplingParams(**got)


@pytest.mark.parametrize("overrides, message", [
    ({"temperature": "hot"}, "--override-generation-config: temperature must be a number, got 'hot'"),
    ({"top_k": True}, "--override-generation-config: top_k must be a number, got True"),
    ({"top_p": 1.5}, "--override-generation-config: top_p must be in (0, 1], got 1.5."),
    ({"max_new_tokens": 0}, "--override-generation-config: max_tokens must be at least 1, got 0. "
                            "(max_new_tokens is the default max_tokens)"),
])
def test_bad_override_is_refused_naming_the_flag(model, overrides, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        generation_defaults("auto", str(model), overrides, flag="--generation-config")


def test_bad_file_value_is_refused_naming_the_file(model):
    path = model / "generation_config.json"
    path.write_text(json.dumps({"temperature": 0.6, "repetition_penalty": 0}))
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}: repetition_penalty must be greater than zero")):
        generation_defaults("auto", str(model))
    assert generation_defaults("vllm", str(model)) == {}   # `vllm` reads no file
    # the offline LLM's spelling of the override
    with pytest.raises(ValueError, match="^override_generation_config: temperature must be a number"):
        generation_defaults("vllm", str(model), {"temperature": [1]})
