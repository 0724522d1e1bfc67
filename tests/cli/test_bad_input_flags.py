"""Engine flags with a value deepserve cannot serve are one line naming the flag and the value
(exit code 2) before anything starts."""
from __future__ import annotations

import pytest

from deepserve.cli.main import main


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("names", [[""], [" ", ""]])
def test_an_empty_served_model_name_is_refused(capsys, names):
    """`--served-model-name "$NAME"` with NAME unset served the model under its path instead."""
    err = _one_line(capsys, ["serve", "--dry-run", "--port", "0", "--served-model-name", *names])
    assert "served_model_name must hold a name (or several, comma-separated)" in err


def test_a_served_model_name_is_still_taken(capsys):
    assert main(["serve", "--dry-run", "--port", "0", "--served-model-name", "a", "b"]) == 0


@pytest.mark.parametrize("env", [None, "1"])
def test_max_model_len_past_the_model_says_how_to_raise_it(capsys, monkeypatch, env):
    if env is None:
        monkeypatch.delenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", raising=False)
    else:
        monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", env)
    err = _one_line(capsys, ["generate", "--prompt", "Once", "--max-model-len", "1024"])
    assert ("max_model_len 1024 exceeds the model's max_position_embeddings 512; for a model that holds longer "
            "contexts pass --hf-overrides '{\"max_position_embeddings\": 1024}'") in err
    assert ("VLLM_ALLOW_LONG_MAX_MODEL_LEN is not read" in err) == (env is not None)


@pytest.mark.parametrize("argv, message", [
    (["--top", "5"], "--top applies to --profile MODEL only"),
    (["--max-model-len", "64", "--hf-overrides", "{}"], "--hf-overrides, --max-model-len apply to --profile MODEL only"),
    (["--profile", "MODEL", "--top", "0"], "--top must be >= 1, got 0"),
    (["--profile", "MODEL", "--hf-overrides", "{bad"], "--hf-overrides is not valid JSON: '{bad'"),
])
def test_ops_flags_of_profile(capsys, monkeypatch, argv, message):
    """`deepserve ops` printed its table and ignored the --profile flags given without it."""
    monkeypatch.setattr("deepserve.LLM", lambda *a, **k: pytest.fail("the model started"))
    assert message in _one_line(capsys, ["ops", *argv])


def test_hf_overrides_text_that_is_not_json_names_the_field(tmp_path, capsys):
    """From a config.yaml (or LLM(hf_overrides="...")) the JSON error came without the field's name."""
    from deepserve.config import EngineArgs

    with pytest.raises(ValueError, match=r"^hf_overrides is not valid JSON: '\{bad' \("):
        EngineArgs(hf_overrides="{bad")
    (tmp_path / "c.yaml").write_text("engine_args:\n  hf_overrides: '{bad'\n")
    err = _one_line(capsys, ["serve", str(tmp_path / "c.yaml"), "--dry-run"])
    assert "hf_overrides is not valid JSON: '{bad'" in err


@pytest.mark.parametrize("command", [["generate"], ["bench", "latency"], ["bench", "throughput"]])
def test_a_model_folder_given_as_a_positional_says_to_pass_it_as_model(capsys, command):
    # `deepserve serve MODEL` takes it so; these commands take --model (as vLLM's bench does)
    from deepserve.config import DEMO_MODEL

    with pytest.raises(SystemExit) as exc:
        main([*command, str(DEMO_MODEL), "--max-model-len", "64"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"deepserve {' '.join(command)}: error: unrecognized arguments: {DEMO_MODEL} "
                                       f"(a model folder: pass it as --model {DEMO_MODEL})\n")
