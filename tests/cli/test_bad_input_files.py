"""A model folder missing a file, or holding one deepserve does not read, is one error line naming
the file and what to do (exit code 2), before the model loads: PyTorch pickle weights without
safetensors, no tokenizer.json for a text prompt, a tokenizer file that does not parse."""
import shutil
from pathlib import Path

import pytest

from deepserve.cli.main import main

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260k"


@pytest.fixture
def folder(tmp_path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(STORIES, dst)
    for p in [dst, *dst.iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_pickle_weights_only_are_named_and_refused(folder, tmp_path, capsys):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    for argv in (["generate", "--model", str(folder), "--prompt", "Once"],
                 ["convert", "quantize", str(folder), str(tmp_path / "out"), "--method", "fp8-block"]):
        err = _one_line(capsys, argv)
        assert "only PyTorch pickle (pytorch_model.bin), which deepserve does not load" in err
        assert "save_pretrained" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("keep_spm", [False, True])
def test_no_tokenizer_json_for_a_text_prompt(folder, capsys, monkeypatch, keep_spm):
    (folder / "tokenizer.json").unlink()
    if not keep_spm:
        (folder / "tokenizer.model").unlink()

    def no_engine(*a, **k):
        raise AssertionError("the engine started")
    monkeypatch.setattr("deepserve.engine.llm_engine.LLMEngine", no_engine)
    for argv, use in ((["generate", "--prompt", "Once"], "to encode the prompt"), (["chat"], "to chat with")):
        err = _one_line(capsys, argv + ["--model", str(folder)])
        assert f"model {folder} has no tokenizer.json" in err and use in err and "--tokenizer FOLDER" in err
        assert ("tokenizer.model alone is not read" in err) == keep_spm


@pytest.mark.parametrize("name, text, message", [
    ("tokenizer.json", "{bad", "tokenizer.json is not a tokenizer the tokenizers library reads"),
    ("tokenizer_config.json", "{bad", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json holds a JSON list, not an object"),
])
def test_unreadable_tokenizer_files_are_named(folder, capsys, name, text, message):
    (folder / name).write_text(text)
    err = _one_line(capsys, ["generate", "--model", str(folder), "--prompt", "Once", "--max-tokens", "1"])
    assert str(folder / name) in err and message in err


def test_an_integer_tensor_for_a_float_parameter_is_refused(folder, capsys):
    """A norm weight stored as int32 was turned into floats (0 and 1) and served without a word."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    err = _one_line(capsys, ["generate", "--model", str(folder), "--prompt", "Once", "--max-tokens", "1"])
    assert "checkpoint tensor model.norm.weight is torch.int32, not floating point" in err


def test_serve_without_tokenizer_json_says_it_takes_token_ids_only(folder, capsys, monkeypatch):
    """The server started without a word, and every text request got a 400."""
    (folder / "tokenizer.json").unlink()
    monkeypatch.setattr("deepserve.engine.fork_server.starts_early", lambda args: False)
    monkeypatch.setattr("deepserve.server.api_server.run_server", lambda *a, **k: 0)
    assert main(["serve", str(folder), "--port", "0"]) == 0
    assert (f"deepserve: no tokenizer.json in {folder}: the server takes token-id prompts only"
            in capsys.readouterr().err)
    assert main(["serve", str(folder), "--port", "0", "--tokenizer", str(STORIES)]) == 0
    assert "no tokenizer.json" not in capsys.readouterr().err


@pytest.mark.parametrize("method, tensor", [("fp8-block", "weight, F8_E4M3"), ("w8a8-int8", "weight, I8"),
                                            ("w4a16", "weight_packed, I32")])
def test_quantized_tensors_without_a_quantization_config_are_named(tmp_path, capsys, method, tensor):
    """They were refused at load one tensor at a time ("no matching model parameter", "not
    dequantized"), without saying that config.json had lost its quantization_config."""
    import json

    import transformers

    from tests.models.hf_reference import save_tiny

    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path / "m")
    extra = ["--algorithm", "rtn", "--group-size", "32"] if method == "w4a16" else []
    assert main(["convert", "quantize", str(tmp_path / "m"), str(tmp_path / "q"), "--method", method,
                 "--no-progress", *extra]) == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    err = _one_line(capsys, ["generate", "--model", str(tmp_path / "q"), "--tokenizer", str(STORIES),
                             "--prompt", "Once"])
    assert f"{tmp_path / 'q' / 'config.json'} has no quantization_config, but the checkpoint holds quantized" in err
    assert f".{tensor}, in model.safetensors): restore the quantization_config" in err
