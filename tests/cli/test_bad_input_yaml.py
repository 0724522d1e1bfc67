"""A serve YAML file that is not YAML, not text, or whose envs are not a mapping: one line naming
the file (and the line, for a YAML error), no traceback."""
from __future__ import annotations

import pytest

from deepserve.cli.main import main
from deepserve.server.config_file import load_serve_config


def test_invalid_yaml_is_one_line_with_its_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("engine_args:\n  model: x\n  tensor_parallel_size: [1\n")
    with pytest.raises(ValueError) as err:
        load_serve_config(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "line " in message


def test_binary_file_names_the_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81engine_args")
    with pytest.raises(ValueError, match="not a text file"):
        load_serve_config(path)


@pytest.mark.parametrize("text, where", [
    ("envs: [1]\nengine_args:\n  model: x\n", "envs"),
    ("experiment:\n  envs: oops\nserve:\n  - serve_id: a\n    engine_args:\n      model: x\n", "experiment.envs"),
])
def test_envs_that_are_not_a_mapping(tmp_path, text, where):
    path = tmp_path / "envs.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{where} must be a mapping"):
        load_serve_config(path)


@pytest.mark.parametrize("entry, message", [
    # `envs` are exported here and by each host's shell (`export NAME=VALUE`). Were: an OSError
    # traceback (the empty name), "illegal environment variable name" naming neither file nor
    # variable, and a mapping exported as its Python repr
    ('envs: {"": 1}', "envs: '' is not an environment variable name"),
    ('envs: {"GLOO SOCKET": eth0}', "envs: 'GLOO SOCKET' is not an environment variable name"),
    ("envs: {1: x}", "envs: 1 is not an environment variable name"),
    ("envs: {USE_FLAGGEMS: {enabled: 1}}", "envs.USE_FLAGGEMS must be a single value, got {'enabled': 1}"),
    # a list or mapping where a string goes: one line naming the key
    ("engine_args: {model: [a]}", "engine_args.model must be a string, got ['a']"),
    ("engine_args: {model: {path: a}}", "engine_args.model must be a string, got {'path': 'a'}"),
    ("engine_args: {model: stories260k, host: [0.0.0.0]}", "engine_args.host must be a string, got ['0.0.0.0']"),
    ("engine_args: {model: stories260k, served_model_name: {a: 1}}",
     "engine_args.served_model_name must be a string, got {'a': 1}"),
])
def test_bad_entry_values_are_one_line(capsys, tmp_path, entry, message):
    path = tmp_path / "serve.yaml"
    engine_args = "" if entry.startswith("engine_args") else "  engine_args: {model: stories260k}\n"
    path.write_text(f"- serve_id: a\n{engine_args}  {entry}\n")
    assert main(["serve", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"deepserve serve: error: {path}: {message}") and len(err.splitlines()) == 1, err


def test_served_model_names_as_a_list_still_serve_each(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("- serve_id: a\n  engine_args: {model: stories260k, served_model_name: [deepseek_r1, r1]}\n")
    assert load_serve_config(path).engine_args["served_model_name"] == "deepseek_r1,r1"


def test_an_empty_hostfile_flag_is_refused(capsys):
    """`--hostfile "$HOSTFILE"` with the variable unset served on this machine alone, without a word."""
    assert main(["serve", "--hostfile", "", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip() == ("deepserve serve: error: --hostfile is empty (an unset shell "
                                               "variable?): give the hostfile's path, or leave the flag out to "
                                               "serve on this machine")


@pytest.mark.parametrize("argv", [["serve", ""], ["serve", "--model", ""], ["serve", "YAML"]])
def test_an_empty_model_is_refused(capsys, tmp_path, argv):
    """`deepserve serve "$MODEL_PATH"` with the variable unset served the built-in demo model
    without a word (vLLM fails on an empty model); `--model ""` and `model: ""` said "config.json
    not found"."""
    path = tmp_path / "serve.yaml"
    path.write_text('- serve_id: a\n  engine_args: {model: ""}\n')
    assert main([str(path) if a == "YAML" else a for a in argv] + ["--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deepserve serve: error: the model given is empty (an unset shell variable?): give the model's folder"


@pytest.mark.parametrize("line, message", [
    ("    foo_bar: 1", "unknown engine_args key 'foo_bar'"),
    ("    max_model_len: abc", "engine_args.max_model_len: expected an integer"),
])
def test_an_experiment_names_its_serve_file_in_engine_args_errors(capsys, tmp_path, monkeypatch, line, message):
    """The FlagOS layout: engine_args live in conf/serve/deepseek_r1.yaml, which the experiment's
    `defaults: [serve: deepseek_r1]` loads; an error in them names that file, not the experiment."""
    conf = tmp_path / "examples" / "deepseek_r1" / "conf"
    (conf / "serve").mkdir(parents=True)
    (conf / "config_deepseek_r1.yaml").write_text(
        "defaults:\n  - _self_\n  - serve: deepseek_r1\nexperiment:\n  task:\n    type: serve\n")
    (conf / "serve" / "deepseek_r1.yaml").write_text(
        "- serve_id: vllm_model\n  engine: vllm\n  engine_args:\n    model: stories260k\n" + line + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "deepseek_r1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepserve serve: error: examples/deepseek_r1/conf/serve/deepseek_r1.yaml: ") \
        and message in err and len(err.splitlines()) == 1, err
