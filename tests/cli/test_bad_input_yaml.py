"""A serve YAML file that is not YAML, not text, or whose envs are not a mapping: one line naming
the file (and the line, for a YAML error), no traceback."""
from __future__ import annotations

import pytest

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
