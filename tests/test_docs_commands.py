"""The README's and docs/GUIDES.md's commands as a newcomer runs them: what they name exists and
what they pass is accepted (the end-to-end runs are tests/cli/test_guides_e2e*.py)."""
from pathlib import Path

import pytest

from deepserve.config import DEMO_MODEL
from deepserve.engine.tokenizer import resolve_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tokenizer_of_the_demo_server():
    # `deepserve serve` (no model) serves "stories260k"; `deepserve bench serve --base-url ...`
    # against it takes that name from /v1/models and needs the demo's tokenizer for it
    tok = resolve_tokenizer(None, Path(DEMO_MODEL).name)
    assert tok.decode(tok.encode("Once upon a time", add_special_tokens=False)).strip() == "Once upon a time"


def test_bench_tokenizer_unknown_name_still_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="pass --tokenizer"):
        resolve_tokenizer(None, "some-served-name")


def test_serve_help_quantization_matches_readme(capsys):
    # README: DeepSeek's FP8 is "kept in e4m3 ... on every device", and GUIDES.md's
    # `--quantization ascend` is accepted: `deepserve serve --help` says the same
    from deepserve.cli.main import main
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--quantization QUANTIZATION Weight quantization")
    entry = text[start:text.index("--seed SEED", start)]
    assert "dequantized" not in entry
    assert "stay in that form" in entry and "ascend" in entry
