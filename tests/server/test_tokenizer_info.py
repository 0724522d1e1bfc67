"""GET /tokenizer_info (vLLM's, with --enable-tokenizer-info-endpoint): what lm-evaluation-harness's
remote tokenizer reads (eos_token, bos_token, chat_template) from the tokenizer folders as served."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from deepserve.config import DEMO_MODEL
from deepserve.engine.tokenizer import Tokenizer
from deepserve.server.app import build_app
from deepserve.server.metrics import ServerMetrics
from deepserve.server.serving_common import ServerSettings, ServerState
from tests.server.conftest import SHARED


def client_of(tok: Tokenizer, enabled: bool) -> TestClient:
    llm = SimpleNamespace(tokenizer=tok, max_model_len=512)   # the route needs no engine
    settings = ServerSettings(served_model_names=["m"], model_path="m", enable_tokenizer_info_endpoint=enabled)
    return TestClient(build_app(ServerState(llm=llm, settings=settings, metrics=ServerMetrics("m", dict))))


def test_tokenizer_info_is_served_only_with_its_flag():
    tok = Tokenizer(DEMO_MODEL)
    assert client_of(tok, False).get("/tokenizer_info").status_code == 404   # vLLM's default
    info = client_of(tok, True).get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["add_bos_token"]) == ("<s>", "</s>", True)
    assert info["chat_template"] == tok.chat_template


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-r1-distill-qwen-7b"])
def test_tokenizer_info_gives_special_tokens_as_text_and_the_served_template(name):
    folder = SHARED / "tokenizers" / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    tok = Tokenizer(folder)
    info = client_of(tok, True).get("/tokenizer_info").json()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert isinstance(cfg["eos_token"], dict)   # an AddedToken object in the file: its text here
    assert info["eos_token"] == cfg["eos_token"]["content"] == tok.id_to_token(tok.eos_token_id)
    assert info["bos_token"] == tok.id_to_token(tok.bos_token_id)
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"] == cfg["tokenizer_class"]
    # a --chat-template replaces the folder's, here as there
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert client_of(Tokenizer(folder, chat_template=template), True).get("/tokenizer_info").json()[
        "chat_template"] == template


def test_tokenizer_info_names_an_eos_the_config_leaves_out(tmp_path):
    """lm-eval takes the endpoint only when it names eos_token: one from generation_config.json;
    no file path, and no chat_template where the folder has none."""
    (tmp_path / "tokenizer.json").write_bytes((Path(DEMO_MODEL) / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"vocab_file": "/somewhere/tokenizer.model"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    info = client_of(Tokenizer(tmp_path), True).get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and "vocab_file" not in info and "chat_template" not in info
