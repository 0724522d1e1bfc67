"""EngineArgs: CLI flags generated from the fields, with vLLM's names and docstrings."""
import argparse
import re

import pytest

from deepserve.config import EngineArgs, HFConfig, field_docs


def _parse(argv):
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    return EngineArgs.from_cli_args(parser.parse_args(argv))


def test_flags_have_vllm_names_and_docs():
    args = _parse(["--max-num-seqs", "8", "--no-enable-prefix-caching", "--hf-overrides",
                   '{"num_hidden_layers": 2}', "--cuda-graph-sizes", "1", "2", "--enforce-eager",
                   "--tensor-parallel-size", "1", "--max-model-len", "128"])
    assert args.max_num_seqs == 8 and args.enable_prefix_caching is False and args.enforce_eager
    assert args.hf_overrides == {"num_hidden_layers": 2} and args.cuda_graph_sizes == [1, 2]
    assert args.block_size is None  # untouched flags keep the dataclass default
    docs = field_docs(EngineArgs)
    assert all(docs.get(f) for f in ("model", "max_num_seqs", "gpu_memory_utilization", "ops"))


@pytest.mark.parametrize("model, flags, want", [
    ("deepseek-v2-lite", [], 64),                          # MLA: one page per 64-key decode tile
    ("deepseek-v2-lite", ["--block-size", "16"], 16),      # a given size wins
    (None, [], 16),                                        # the demo Llama
])
def test_block_size_defaults_by_attention_kind(model, flags, want):
    args = _parse((["--model", model] if model else []) + flags)
    assert args.create_engine_config().cache.block_size == want


def test_bad_flag_values_name_the_value():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        _parse(["--max-num-seqs", "0"])
    with pytest.raises(SystemExit):
        _parse(["--hf-overrides", "{not json"])


def test_bad_all2all_backend_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"all2all_backend must be one of .*'alltoall'.*got 'naive'"):
        _parse(["--all2all-backend", "naive"])
    assert _parse(["--all2all-backend", "alltoall"]).create_engine_config().parallel.all2all_backend == "alltoall"


def test_hf_config_reads_both_spellings():
    old = HFConfig({"architectures": ["X"], "rope_theta": 5.0, "torch_dtype": "bfloat16",
                    "rope_scaling": {"type": "yarn", "factor": 40}})
    new = HFConfig({"architectures": ["X"], "dtype": "bfloat16",
                    "rope_parameters": {"rope_type": "yarn", "factor": 40, "rope_theta": 5.0}})
    for c in (old, new):
        assert c.rope_theta == 5.0 and c.torch_dtype == "bfloat16"
        assert c.rope_scaling["rope_type"] == "yarn" and c.rope_scaling["factor"] == 40
    plain = HFConfig({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6


@pytest.mark.parametrize("written", [
    {"rope_theta": 5.0, "rope_scaling": {"type": "yarn", "factor": 40}, "torch_dtype": "bfloat16"},
    {"rope_parameters": {"rope_type": "yarn", "factor": 40, "rope_theta": 5.0}, "dtype": "bfloat16"}],
    ids=["hub", "transformers5"])
def test_hf_overrides_rope_parameters_replace_the_files_rope(tmp_path, written):
    """hf_overrides in transformers 5's spelling replace config.json's RoPE whichever spelling
    the file uses, as vLLM's config.update does; a rope_theta the override leaves out stays the
    file's; dtype likewise. They were dropped when the file wrote the other spelling."""
    import json

    from deepserve.config import load_hf_config
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"], **written}))
    theta = load_hf_config(str(tmp_path), {"rope_parameters": {"rope_type": "default", "rope_theta": 50.0}})
    assert theta.rope_theta == 50.0 and theta.rope_scaling is None
    linear = load_hf_config(str(tmp_path), {"rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    assert linear.rope_theta == 5.0 and linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # the Hub spelling as an override still wins over either spelling in the file
    hub = load_hf_config(str(tmp_path), {"rope_theta": 7.0, "rope_scaling": None})
    assert hub.rope_theta == 7.0 and hub.rope_scaling is None
    assert load_hf_config(str(tmp_path), {"dtype": "float16"}).torch_dtype == "float16"
    assert load_hf_config(str(tmp_path), {"torch_dtype": "float16"}).torch_dtype == "float16"


def test_ops_backend_from_flag_and_env(monkeypatch):
    monkeypatch.delenv("DEEPSERVE_OPS", raising=False)
    monkeypatch.delenv("USE_FLAGGEMS", raising=False)
    assert EngineArgs().ops == "auto"
    monkeypatch.setenv("DEEPSERVE_OPS", "torch")
    assert EngineArgs().ops == "torch"
    assert EngineArgs(ops="triton").ops == "triton"  # the flag wins over the environment
    monkeypatch.setenv("USE_FLAGGEMS", "1")
    assert EngineArgs().ops == "flaggems"             # as FlagScale honours it
    with pytest.raises(ValueError, match="ops must be auto, torch, triton, triton-all or flaggems, got 'cuda'"):
        EngineArgs(ops="cuda")
    monkeypatch.delenv("USE_FLAGGEMS")
    monkeypatch.setenv("DEEPSERVE_OPS", "triton-all")
    assert EngineArgs().ops == "triton-all"


def test_flaggems_missing_is_a_clear_error():
    import importlib.util

    from deepserve.ops import OpTable
    if importlib.util.find_spec("flag_gems") is not None:
        pytest.skip("flag_gems is installed here")
    with pytest.raises(RuntimeError, match=r"--ops flaggems needs FlagGems: pip install 'deepserve\[flaggems\]'"):
        OpTable("flaggems")


def test_async_scheduling_flags_force_it_and_unset_is_auto():
    assert _parse([]).async_scheduling is None
    assert _parse(["--async-scheduling"]).async_scheduling is True
    assert _parse(["--no-async-scheduling"]).async_scheduling is False
    with pytest.raises(ValueError, match="async_scheduling must be true, false or unset .*got 'yes'"):
        EngineArgs(async_scheduling="yes")


@pytest.mark.parametrize("flags, device, on, why", [
    ([], "cuda", True, "on \\(the default"),
    ([], "npu", True, "on \\(the default"),
    ([], "cpu", False, "off: on the CPU"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], "cuda", False,
     "off: speculative decoding \\(ngram\\)"),
    (["--pipeline-parallel-size", "2"], "cuda", False, "off: pipeline parallel keeps one micro-batch"),
    (["--async-scheduling"], "cpu", True, "on \\(--async-scheduling\\)$"),
    (["--async-scheduling", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], "cuda",
     True, "on \\(--async-scheduling\\); speculative decoding \\(ngram\\) runs the steps that draft synchronously"),
    (["--async-scheduling", "--pipeline-parallel-size", "2"], "cuda", True, "one micro-batch in flight per stage"),
    (["--no-async-scheduling"], "cuda", False, "off \\(--no-async-scheduling\\)"),
])
def test_async_scheduling_plan(flags, device, on, why):
    """Unset: on where steps can overlap (vLLM's default), off naming why; a flag given wins."""
    from deepserve.config import async_scheduling_plan
    got, line = async_scheduling_plan(_parse(flags).create_engine_config(), device)
    assert got is on
    assert re.search(why, line), line


def test_token_counts_take_vllms_human_readable_form():
    """--max-model-len / --max-num-batched-tokens as vLLM reads them: 32k = 32,000, 32K = 32,768,
    25.6k = 25,600, plain integers; a fraction of K or of a token is refused."""
    import argparse

    from deepserve.config import EngineArgs
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = parser.parse_args(["--max-model-len", "32k", "--max-num-batched-tokens", "16K"])
    assert (args.max_model_len, args.max_num_batched_tokens) == (32000, 16384)
    assert parser.parse_args(["--max-model-len", "25.6k"]).max_model_len == 25600
    assert parser.parse_args(["--max-model-len", "4096"]).max_model_len == 4096
    for bad in ("1.5K", "32q", "0.0001k"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--max-model-len", bad])
    # vLLM's human_readable_int_or_auto, for max_model_len alone: auto and -1 fit it to the KV cache
    assert parser.parse_args(["--max-model-len", "auto"]).max_model_len == -1
    assert parser.parse_args(["--max-model-len", "-1"]).max_model_len == -1
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-num-batched-tokens", "auto"])


def test_step_budget_without_chunked_prefill():
    """Without chunked prefill a given --max-num-batched-tokens below max_model_len is refused, as
    vLLM's SchedulerConfig refuses it (it was raised to max_model_len without a word); the default
    budget is raised to hold a whole prompt."""
    flags = ["--max-model-len", "512", "--no-enable-chunked-prefill"]
    with pytest.raises(ValueError, match=re.escape("max_num_batched_tokens (100) is smaller than max_model_len (512) "
                                                   "without chunked prefill")):
        _parse(flags + ["--max-num-batched-tokens", "100"]).create_engine_config()
    assert _parse(flags + ["--max-num-batched-tokens", "512"]).create_engine_config().scheduler.max_num_batched_tokens == 512
    assert _parse(["--max-model-len", "512", "--max-num-batched-tokens", "100"]).create_engine_config() \
        .scheduler.max_num_batched_tokens == 100


@pytest.mark.parametrize("flags, want", [
    (["--max-num-batched-tokens", "4", "--max-num-seqs", "8"], (4, 8)),
    (["--max-num-seqs", "9000"], (8192, 9000)),              # the default budget is below it too
])
def test_step_budget_below_max_num_seqs_refused(flags, want):
    """A step budget below max_num_seqs is refused at start with vLLM's SchedulerConfig message
    (it ran: a full decode batch never fit one step)."""
    with pytest.raises(ValueError, match=re.escape(f"max_num_batched_tokens ({want[0]}) must be greater than or "
                                                   f"equal to max_num_seqs ({want[1]}).")):
        _parse(["--max-model-len", "64"] + flags).create_engine_config()


@pytest.mark.parametrize("flags, want", [
    ([], (8192, 256)),
    (["--max-num-batched-tokens", "32"], (32, 32)),           # vLLM: min(default max_num_seqs, budget)
    (["--max-num-batched-tokens", "8", "--max-num-seqs", "8"], (8, 8)),
    (["--max-num-seqs", "1000"], (8192, 1000)),
])
def test_max_num_seqs_default_fits_step_budget(flags, want):
    sc = _parse(["--max-model-len", "64"] + flags).create_engine_config().scheduler
    assert (sc.max_num_batched_tokens, sc.max_num_seqs) == want
