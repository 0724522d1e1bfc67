"""`deepserve generate` prints the demo model's greedy text; `deepserve chat` streams replies
to lines read from stdin and leaves on `exit` (on the demo model with its own chat template).
The commands run in this process (`python -m deepserve` is what the server tests start)."""
from __future__ import annotations

import io
import json
import shutil
import sys

from deepserve.cli.main import main
from deepserve.config import DEMO_MODEL

GREEDY = ", there was a little girl named Lily. She loved to play outside in the park."


def run_cli(capsys, monkeypatch, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """`deepserve ARGS` with `stdin`: its exit code, stdout and stderr."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_greedy_text(capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "generate", "--prompt", "Once upon a time", "--max-tokens", "32",
                             "--temperature", "0", "--stop", " One day")
    assert code == 0, err
    assert out == GREEDY + "\n"


def test_bad_input_is_one_line(capsys, monkeypatch, tmp_path):
    assert main(["generate", "--prompt", "x", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "deepserve generate: error: temperature must be non-negative, got -1.0.\n"
    # a model whose tokenizer has no chat template
    bare = shutil.copytree(DEMO_MODEL, tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", str(bare), "--num-gpu-blocks-override", "16"]) == 2
    assert "pass --chat-template" in capsys.readouterr().err


def test_chat_repl_over_stdin(capsys, monkeypatch):
    code, out, err = run_cli(capsys, monkeypatch, "chat", "--max-tokens", "12",
                             stdin="Once upon a time\n\nexit\nnever read\n")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 and GREEDY.startswith(lines[0]) and len(lines[0]) > 20
    assert sys.stdin.read() == "never read\n"   # left at `exit`
