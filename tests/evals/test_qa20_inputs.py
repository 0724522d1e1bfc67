"""The user's own inputs are checked before the server is asked anything: a mistyped task or
data path is named in one line even while the server is down."""
import pytest

from deepserve.cli.main import main


@pytest.mark.parametrize("extra, expected", [
    (["--tasks", "gsm9k", "--data-path", "."], "unknown task(s) gsm9k; known: gsm8k"),
    (["--tasks", "gsm8k", "--data-path", "/nonexistent/qa20"], "--data-path /nonexistent/qa20 is not a directory"),
])
def test_local_inputs_before_the_server(capsys, extra, expected):
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepserve eval: error: ") and expected in err[0], err
