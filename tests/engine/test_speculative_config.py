"""--speculative-config: vLLM's JSON keys parsed into SpeculativeConfig, vLLM's defaults, bad
input named in one line, and the refusal while the engine step does not run drafts."""
from __future__ import annotations

import json

import pytest

from deepserve.cli.main import main
from deepserve.config import DEMO_MODEL, EngineArgs, SpeculativeConfig, load_hf_config


def test_vllm_keys_and_defaults():
    mtp = SpeculativeConfig.from_json('{"num_speculative_tokens": 3, "method": "mtp"}')
    assert (mtp.method, mtp.num_speculative_tokens) == ("mtp", 3)
    assert SpeculativeConfig.from_json({"method": "deepseek_mtp", "num_speculative_tokens": 1}).method == "mtp"
    # ngram: vLLM's lookup window defaults (5/5, or the one given for both)
    ng = SpeculativeConfig.from_json({"method": "ngram", "num_speculative_tokens": 4})
    assert (ng.prompt_lookup_min, ng.prompt_lookup_max) == (5, 5)
    ng = SpeculativeConfig.from_json({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    assert (ng.prompt_lookup_min, ng.prompt_lookup_max) == (3, 3)
    ng = SpeculativeConfig.from_json({"method": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_min": 2,
                                      "prompt_lookup_max": 4})
    assert (ng.method, ng.prompt_lookup_min, ng.prompt_lookup_max) == ("ngram", 2, 4)


def test_settled_against_the_model():
    r1 = load_hf_config("deepseek-r1")
    # no method, no k on a model with an MTP layer: mtp with k = num_nextn_predict_layers (vLLM)
    spec = SpeculativeConfig.from_json({}).for_model(r1)
    assert (spec.method, spec.num_speculative_tokens) == ("mtp", 1)
    assert SpeculativeConfig(method="mtp", num_speculative_tokens=3).for_model(r1).num_speculative_tokens == 3
    demo = load_hf_config(DEMO_MODEL)
    with pytest.raises(ValueError, match=r"method mtp needs a model with an MTP layer.*LlamaForCausalLM.*ngram"):
        SpeculativeConfig(method="mtp", num_speculative_tokens=1).for_model(demo)
    with pytest.raises(ValueError, match="needs a method"):
        SpeculativeConfig(num_speculative_tokens=1).for_model(demo)
    ng = SpeculativeConfig(method="ngram", num_speculative_tokens=2).for_model(demo)
    assert (ng.method, ng.num_speculative_tokens) == ("ngram", 2)


@pytest.mark.parametrize("value, message", [
    ({"method": "eagle", "num_speculative_tokens": 1}, "method must be one of mtp, deepseek_mtp, ngram, got 'eagle'"),
    ({"method": "mtp", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1, got 0"),
    ({"method": "mtp", "num_speculative_tokens": "3"}, "num_speculative_tokens must be an integer >= 1, got '3'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min 4 exceeds prompt_lookup_max 2"),
    ({"method": "ngram"}, "method ngram needs num_speculative_tokens"),
    ({"method": "mtp", "num_speculative_tokens": 1, "draft_model": "x"},
     "unknown key\\(s\\) 'draft_model'; known keys: method, num_speculative_tokens"),
    ('{"method": mtp}', "not valid JSON"),
    ("[1]", "must be a JSON object, got \\[1\\]"),
])
def test_bad_input_is_named(value, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_json(value)


def test_engine_args_check_then_refuse_what_does_not_run_yet():
    with pytest.raises(ValueError, match="method must be one of mtp, deepseek_mtp, ngram, got 'medusa'"):
        EngineArgs(model=DEMO_MODEL, speculative_config='{"method": "medusa", "num_speculative_tokens": 1}')
    with pytest.raises(ValueError, match="method mtp needs a model with an MTP layer"):
        EngineArgs(model=DEMO_MODEL, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    spec = EngineArgs(model=DEMO_MODEL, speculative_config=json.dumps(ngram)).speculative_config
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_min) == ("ngram", 2, 5)
    assert EngineArgs(model=DEMO_MODEL, speculative_config=ngram).create_engine_config().speculative == spec
    assert EngineArgs(model=DEMO_MODEL, speculative_config=ngram, async_scheduling=True).speculative_config == spec
    assert EngineArgs(model=DEMO_MODEL, speculative_config=ngram, data_parallel_size=2).speculative_config == spec
    assert EngineArgs(model=DEMO_MODEL, speculative_config=ngram, data_parallel_size=2,
                      distributed_executor_backend="ray").speculative_config == spec
    assert EngineArgs(model=DEMO_MODEL, speculative_config=ngram, pipeline_parallel_size=2).speculative_config == spec
    with pytest.raises(ValueError, match="not supported yet with pipeline parallelism for method mtp.*"
                                         "'num_speculative_tokens': 3"):
        EngineArgs(model="deepseek-r1", speculative_config={"method": "mtp", "num_speculative_tokens": 3},
                   pipeline_parallel_size=2)
    mtp = EngineArgs(model="deepseek-r1", speculative_config={"method": "mtp"}, hf_overrides={"num_hidden_layers": 2})
    config = mtp.create_engine_config()
    assert config.model.load_mtp and config.speculative.num_speculative_tokens == 1
    assert EngineArgs(model=DEMO_MODEL, speculative_config={}).speculative_config is None


def test_cli_errors_in_one_line(capsys):
    for flags, text in ((["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": 0})], "got 0"),
                        (["--speculative-config", "[1, 2]"], "speculative_config must be a JSON object, got [1, 2]"),
                        (["--speculative-config", "3"], "speculative_config must be a JSON object, got 3"),
                        (["--hf-overrides", "[1]"], "hf_overrides must be a JSON object, got [1]"),
                        (["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": 1})],
                         "needs a model with an MTP layer")):
        assert main(["generate", "--model", DEMO_MODEL, *flags, "--prompt", "Once"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err
