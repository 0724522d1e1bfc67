"""`deepserve generate` prints the demo model's greedy text; `deepserve chat` streams replies
to lines read from stdin and leaves on `exit` (on the demo model with its own chat template)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

from conftest import REPO, server_env

from deepserve.config import DEMO_MODEL

GREEDY = ", there was a little girl named Lily. She loved to play outside in the park."


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepserve", *args], input=stdin, text=True,
                          capture_output=True, cwd=REPO, env=server_env(), timeout=120)


def test_generate_prints_greedy_text():
    r = run_cli("generate", "--prompt", "Once upon a time", "--max-tokens", "32", "--temperature", "0",
                "--stop", " One day")
    assert r.returncode == 0, r.stderr
    assert r.stdout == GREEDY + "\n"


def test_bad_input_is_one_line(capsys, monkeypatch, tmp_path):
    from deepserve.cli.main import main

    assert main(["generate", "--prompt", "x", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "deepserve generate: error: temperature must be >= 0, got -1.0\n"
    # a model whose tokenizer has no chat template
    bare = shutil.copytree(DEMO_MODEL, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(bare), "--num-gpu-blocks-override", "16"]) == 2
    assert "pass --chat-template" in capsys.readouterr().err


def test_chat_repl_over_stdin():
    r = run_cli("chat", "--max-tokens", "12", stdin="Once upon a time\n\nexit\nnever read\n")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and GREEDY.startswith(lines[0]) and len(lines[0]) > 20
