"""A bad sampling or retry value is refused in one line that names the flag to fix."""
import pytest

from deepserve.cli.main import main


# --max-tokens 0: argparse's one line (tests/evals/test_lm_eval_flags.py)
@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--top-p", "0"),
                                         ("--max-retries", "-1"), ("--retry-backoff", "-2"),
                                         ("--request-timeout", "0")])
def test_bad_value_names_its_flag(tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)
    argv = ["eval", "--base-url", "http://127.0.0.1:9", "--model", "m", "--max-tokens", "8",
            "--tasks", "gsm8k", "--data-path", str(tmp_path), "--no-progress", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} must be" in err[0], err
