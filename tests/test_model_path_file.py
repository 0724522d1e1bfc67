"""A model path that is a file (a config.json, a weights file) is named as such, with the folder
to give where it is the config (it said `.../config.json/config.json not found`)."""
from __future__ import annotations

import pytest

from deepserve.config import load_hf_config


def test_a_file_for_the_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"is a file: give the model's folder \({tmp_path}\)"):
        load_hf_config(str(tmp_path / "config.json"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors' is a file: give the model's folder$"):
        load_hf_config(str(tmp_path / "model.safetensors"))
