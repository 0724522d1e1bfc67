"""`deepserve plan FOLDER --quantization X` and `deepserve serve FOLDER --quantization X` judge a
folder's quantization_config alike (models/loader.linear_method): a combination serve refuses is
refused by the plan with serve's own line, before any engine process starts; the plan names a
folder's 4-bit scheme as the folder stores it. The folders hold config.json alone: both checks
read nothing else."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepserve.cli.main import main
from tests.quant.int4_formats import quantization_config

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 128,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
         "tie_word_embeddings": False}
BROKEN = quantization_config("compressed-tensors", 32, True, False)
BROKEN["config_groups"]["group_0"]["weights"]["num_bits"] = 3
FOLDERS = {"awq": quantization_config("awq", 32, False, False),
           "gptq": quantization_config("gptq", 32, True, False),
           "w4a16": quantization_config("compressed-tensors", 32, True, False),
           "w4a8": quantization_config("compressed-tensors", 32, True, False, activations=True),
           "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
           "broken": BROKEN, "bf16": None}
# plan --quantization -> the serve flag that asks for the same weights
SERVE_FLAG = {"w4a16": "compressed-tensors", "w4a8": "compressed-tensors"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plan_quant")
    out = {}
    for name, qc in FOLDERS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(dict(LLAMA, **({"quantization_config": qc} if qc else {}))))
        out[name] = root / name
    return out


@pytest.fixture
def no_server(monkeypatch):
    """`deepserve serve` stops where it would start the engine: its error must come first."""
    def started(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr("deepserve.engine.fork_server.starts_early", lambda args: False)
    monkeypatch.setattr("deepserve.server.api_server.run_server", started)


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    prefix = f"deepserve {argv[0]}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):]


def _plan(folder: Path, *flags: str) -> list[str]:
    return ["plan", str(folder), "--gpus", "1", "--gpu-memory", "80GiB", *flags]


CONFLICTS = [("awq", "fp8"), ("awq", "compressed-tensors"), ("w4a16", "fp8"), ("w4a8", "w8a8-int8"), ("gptq", "awq"), ("awq", "w4a16"),
             ("fp8", "gptq"), ("broken", None)]


@pytest.mark.parametrize("folder,flag", CONFLICTS, ids=[f"{f}-{q}" for f, q in CONFLICTS])
def test_the_plan_refuses_what_serve_refuses_with_serves_line(folders, capsys, no_server, folder, flag):
    """`plan --quantization fp8` of a 4-bit folder printed an fp8 plan that serve would not run
    (serve failed in its engine process, after the start)."""
    quant = ["--quantization", flag] if flag else []
    planned = _error(capsys, _plan(folders[folder], *quant))
    serve_quant = ["--quantization", SERVE_FLAG.get(flag, flag)] if flag else []
    served = _error(capsys, ["serve", str(folders[folder]), *serve_quant])
    assert planned == served
    expected = {"broken": "3-bit weights are not supported",
                "fp8": "--quantization gptq loads GPTQ checkpoints and this one is fp8 (leave --quantization out, "
                       "or pass fp8 or w8a8-int8)"}
    assert expected.get(folder, "cannot serve this") in planned


def test_none_on_a_quantized_folder_is_refused(folders, capsys):
    """serve has no flag that loads a quantized folder in the model dtype: a plan of it counted
    weights serve never allocates."""
    err = _error(capsys, _plan(folders["awq"], "--quantization", "none"))
    assert "serve runs this folder's weights as stored (awq); leave --quantization out" in err


@pytest.mark.parametrize("folder,flag,scheme", [
    ("w4a8", None, "w4a8 4-bit (groups of 32)"),
    ("w4a8", "w4a16", "w4a8 4-bit (groups of 32)"),          # serve's compressed-tensors runs it as W4A8
    ("w4a8", "compressed-tensors", "w4a8 4-bit (groups of 32)"),   # serve's own flag name
    ("bf16", "compressed-tensors", "w4a16 4-bit (groups of 128)"),
    ("w4a16", None, "w4a16 4-bit (groups of 32)"),
    ("fp8", "w8a8-int8", "int8 (per-row scales)"),           # serve requantizes fp8 weights at load
    ("bf16", "awq", "awq 4-bit (groups of 128)"),            # what a conversion would write
    ("bf16", "w4a8", "w4a8 4-bit (groups of 128)"),
    ("awq", "awq_marlin", "awq 4-bit (groups of 32)"),        # vLLM's names serve takes for the folders
    ("gptq", "gptq_marlin", "gptq 4-bit (groups of 32)"),
    ("awq", "moe_wna16", "awq 4-bit (groups of 32)"),
    ("bf16", "gptq_marlin", "gptq 4-bit (groups of 128)"),
])
def test_the_plan_names_the_scheme_serve_runs(folders, capsys, folder, flag, scheme):
    """A W4A8 compressed-tensors folder was labelled "w4a16 4-bit" (its bytes were right)."""
    assert main(_plan(folders[folder], *(["--quantization", flag] if flag else []))) == 0
    weights = capsys.readouterr().out.splitlines()[2]
    assert weights.startswith(f"weights    {scheme} ") and "w4a16" not in weights.replace(scheme, ""), weights



@pytest.mark.parametrize("flags,message", [
    (["--max-model-len", "100000"], "max_model_len 100000 exceeds the model's max_position_embeddings 256; for a "
                                    "model that holds longer contexts pass --hf-overrides "
                                    "'{\"max_position_embeddings\": 100000}'"),
    (["--max-model-len", "0"], "max_model_len must be >= 1, or -1 to fit it to the KV cache, got 0"),
])
def test_the_plan_refuses_a_max_model_len_serve_refuses(folders, capsys, no_server, flags, message):
    """A plan for a context the model cannot take (or 0, which planned the default) was printed."""
    assert _error(capsys, _plan(folders["bf16"], *flags)) == message
    assert _error(capsys, ["serve", str(folders["bf16"]), *flags]) == message


def test_include_mtp_on_a_model_without_mtp_is_refused(folders, capsys):
    """It was ignored without a word."""
    err = _error(capsys, _plan(folders["bf16"], "--include-mtp"))
    assert err == "--include-mtp needs a model with an MTP layer, but ['LlamaForCausalLM'] has num_nextn_predict_layers=None"


@pytest.mark.parametrize("text,message", [('{"architectures": ["LlamaForCausalLM"], ', "is not valid JSON: Expecting"),
                                          ("[1, 2]", "holds a JSON list, not the object of a model config")])
def test_a_config_json_that_does_not_parse_is_named(tmp_path, capsys, no_server, text, message):
    """The error was json's own ("Expecting property name ...: line 2 column 1"), naming no file."""
    (tmp_path / "config.json").write_text(text)
    for argv in (_plan(tmp_path), ["serve", str(tmp_path)]):
        err = _error(capsys, argv)
        assert err.startswith(f"{tmp_path / 'config.json'} ") and message in err, err
