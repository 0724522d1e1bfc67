"""A config.json that lacks a field the model reads, or holds it with the wrong type, is one
error line naming the file, the field and the value (exit code 2), from `generate`, `plan` and
the offline LLM: never a traceback from inside a layer's constructor."""
import json
import shutil
from pathlib import Path

import pytest

from deepserve.cli.main import main

STORIES = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "stories260k"

BAD = [
    (lambda c: c.pop("hidden_size"), "has no 'hidden_size'"),
    (lambda c: c.update(hidden_size="64"), "hidden_size must be an integer > 0, got '64'"),
    (lambda c: c.update(vocab_size=-1), "vocab_size must be an integer > 0, got -1"),
    (lambda c: c.pop("rms_norm_eps"), "has no 'rms_norm_eps'"),
    (lambda c: c.update(rope_theta="big"), "rope_theta must be a number > 0, got 'big'"),
    (lambda c: c.update(rope_scaling="yarn"), "rope_scaling must be an object"),
    (lambda c: c.update(architectures="LlamaForCausalLM"), "architectures must be a list of class names"),
]


def _folder(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(STORIES, folder)
    folder.chmod(0o755)
    cfg = json.loads((STORIES / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").chmod(0o644)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("edit, message", BAD)
def test_generate_names_the_field(tmp_path, capsys, edit, message):
    folder = _folder(tmp_path, edit)
    assert main(["generate", "--model", str(folder), "--prompt", "Once", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepserve generate: error: ") and "\n" not in err
    assert str(folder / "config.json") in err and message in err


def test_plan_names_the_field(tmp_path, capsys):
    folder = _folder(tmp_path, lambda c: c.pop("num_hidden_layers"))
    assert main(["plan", str(folder), "--gpus", "1", "--gpu-memory", "80GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{folder / 'config.json'} has no 'num_hidden_layers'" in err


def test_offline_llm_names_the_field(tmp_path):
    from deepserve import LLM

    folder = _folder(tmp_path, lambda c: c.update(intermediate_size=None))
    with pytest.raises(ValueError, match="has no 'intermediate_size', which LlamaForCausalLM needs"):
        LLM(str(folder))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("kv_lora_rank"), "has no 'kv_lora_rank', which DeepseekV2ForCausalLM needs"),
    (lambda c: c.pop("moe_intermediate_size"), "has no 'moe_intermediate_size'"),
    (lambda c: c.update(n_routed_experts="4"), "n_routed_experts must be an integer >= 0, got '4'"),
])
def test_deepseek_fields(tmp_path, capsys, edit, message):
    cfg = json.loads((Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "presets"
                      / "deepseek-v2-lite.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", str(tmp_path), "--gpus", "1", "--gpu-memory", "80GiB"]) == 2
    assert message in capsys.readouterr().err
