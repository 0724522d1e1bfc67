"""`deepserve plan` answers a user's odd inputs with the reason: a memory size without a unit (one
line), every layout refused before memory is counted, and a model whose weights fit but whose KV
cache does not hold max-model-len (the longest --max-model-len that does is named)."""
from __future__ import annotations

import json
import re

import pytest

from deepserve.cli.main import main

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 128,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}


def _error(capsys, argv) -> str:
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepserve plan: error: "), err
    return err


@pytest.mark.parametrize("flags, named", [
    (["--gpu-memory", "80"], "--gpu-memory 80 has no unit; write e.g. 80GiB or 80GB"),
    (["--gpu-memory", "80GiB", "--activation-reserve", "2"], "--activation-reserve 2 has no unit"),
])
def test_a_memory_size_without_unit_is_refused(capsys, flags, named):
    assert named in _error(capsys, ["r1-distill-qwen-7b", "--gpus", "1", *flags])


def test_a_memory_size_with_unit_still_plans(capsys):
    assert main(["plan", "r1-distill-qwen-7b", "--gpus", "1", "--gpu-memory", "80 GiB",
                 "--activation-reserve", "2GiB"]) == 0
    assert "80.0 GiB x 0.90 - 2.0 GiB activation reserve" in capsys.readouterr().out


@pytest.mark.parametrize("reserve", ["0", "0GiB"])
def test_no_activation_reserve_is_taken(capsys, reserve):
    # memory left nothing past the reserve: "pass a smaller --activation-reserve", and 0 is a reserve
    # (no "memory size '0' must be positive"), which stays the answer to --gpu-memory 0
    argv = ["plan", "r1-distill-qwen-1.5b", "--gpus", "1", "--gpu-memory", "2GiB"]
    assert main(argv) == 2 and "pass a smaller --activation-reserve" in capsys.readouterr().err
    assert main([*argv, "--activation-reserve", reserve]) == 1     # 3.3 GiB of weights > 1.8 GiB
    assert "2.0 GiB x 0.90 - 0.0 GiB activation reserve = 1.8 GiB per GPU" in capsys.readouterr().out
    assert "memory size '0' must be positive" in _error(capsys, [*argv[1:-1], "0"])   # a GPU of no memory


def test_every_layout_refused_before_counting_names_the_refusal(tmp_path, capsys):
    """A 4-bit plan for a model whose 64 input features no group of 128 divides: the headline is
    that reason, not a memory comparison."""
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, hidden_size=64)))
    assert main(["plan", str(tmp_path), "--gpus", "2", "--gpu-memory", "80GiB", "--quantization", "w4a16"]) == 1
    headline = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("NO LAYOUT FITS"))
    assert "group size 128 does not divide the 64 input features" in headline, headline
    assert "weights alone" not in headline, headline


def test_kv_short_of_max_model_len_names_the_longest_that_fits(capsys):
    argv = ["plan", "r1-distill-llama-8b", "--gpus", "1", "--gpu-memory", "16GiB", "--quantization", "fp8",
            "--kv-cache-dtype", "fp8"]
    assert main(argv) == 1
    headline = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("NO LAYOUT FITS"))
    longest = int(re.search(r"--max-model-len (\d+) or less", headline)[1])
    assert main([*argv, "--max-model-len", str(longest)]) == 0
    capsys.readouterr()
    assert main([*argv, "--max-model-len", str(longest + 10_000)]) == 1


@pytest.mark.parametrize("flags, line", [
    (["--gpus", "8", "--gpu-memory", "80GiB", "--quantization", "int3"],
     "deepserve plan: error: argument --quantization: invalid choice: 'int3' (choose from 'fp8', 'w8a8-int8', "
     "'w4a16', 'w4a8', 'awq', 'gptq', 'compressed-tensors', 'awq_marlin', 'gptq_marlin', 'moe_wna16', 'none')\n"),
    (["--gpus", "eight", "--gpu-memory", "80GiB"], "deepserve plan: error: argument --gpus: invalid int value: "
                                                   "'eight'\n"),
    (["--gpus", "8", "--gpu-memory", "80GiB", "--tp", "8"], "deepserve plan: error: unrecognized arguments: --tp 8\n"),
])
def test_a_bad_flag_is_one_line(capsys, flags, line):
    # argparse printed plan's whole usage (or the top-level usage line) above it
    with pytest.raises(SystemExit) as exc:
        main(["plan", "r1-distill-qwen-7b", *flags])
    assert exc.value.code == 2 and capsys.readouterr().err == line


def test_nodes_below_one_is_named(capsys):
    assert _error(capsys, ["r1-distill-qwen-7b", "--gpus", "8", "--nodes", "0", "--gpu-memory", "80GiB"]) == \
        "deepserve plan: error: --nodes must be >= 1, got 0\n"


@pytest.mark.parametrize("text, tokens", [("32k", 32000), ("32K", 32768), ("32768", 32768)])
def test_max_model_len_as_serve_takes_it(capsys, text, tokens):
    assert main(["plan", "r1-distill-qwen-7b", "--gpus", "1", "--gpu-memory", "80GiB", "--max-model-len", text]) == 0
    assert f"max-model-len {tokens:,}\n" in capsys.readouterr().out


@pytest.mark.parametrize("alias, dtype", [("half", "float16"), ("float", "float32"), ("torch.bfloat16", "bfloat16")])
def test_dtype_as_serve_takes_it(capsys, alias, dtype):
    # vLLM's aliases (the vastai guide's fp16 runs pass --dtype half) plan as the dtype they name
    argv = ["plan", "r1-distill-qwen-7b", "--gpus", "1", "--gpu-memory", "80GiB"]
    assert main([*argv, "--dtype", dtype]) == 0
    named = capsys.readouterr().out
    assert main([*argv, "--dtype", alias]) == 0
    assert capsys.readouterr().out == named and f"weights    {dtype}; KV cache {dtype}\n" in named


def test_a_serve_yaml_plans_its_model(tmp_path, capsys):
    # `deepserve plan config.yaml`: the model and the KV settings the serve file gives, flags over them
    path = tmp_path / "serve.yaml"
    path.write_text("engine_args:\n  model: r1-distill-qwen-7b\n  max_model_len: 8192\n  kv_cache_dtype: fp8\n"
                    "  gpu_memory_utilization: 0.8\n")
    assert main(["plan", str(path), "--gpus", "1", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("model      r1-distill-qwen-7b (Qwen2ForCausalLM") and "max-model-len 8,192\n" in out
    assert "KV cache fp8 (e4m3)" in out and "80.0 GiB x 0.80 - " in out
    assert main(["plan", str(path), "--gpus", "1", "--gpu-memory", "80GiB", "--max-model-len", "4096",
                 "--kv-cache-dtype", "auto", "--gpu-memory-utilization", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "max-model-len 4,096\n" in out and "KV cache bfloat16" in out and "80.0 GiB x 0.90 - " in out
    path.write_text("engine_args:\n  port: 8000\n")
    assert _error(capsys, [str(path), "--gpus", "1", "--gpu-memory", "80GiB"]) == \
        f"deepserve plan: error: {path} names no engine_args.model to plan for\n"
