"""`deepserve eval` without --model (the README's line) evaluates the server's model when
/v1/models lists one, as vLLM's bench takes a server's model; it said "needs --model"."""
from __future__ import annotations

import pytest

from deepserve.cli.main import main


class Started(Exception):
    pass


@pytest.fixture
def run_eval(monkeypatch):
    def started(opts):
        raise Started(opts.settings.model)
    monkeypatch.setattr("deepserve.evals.runner.run_eval", started)
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)   # served() fakes the server


def served(monkeypatch, names):
    monkeypatch.setattr("deepserve.bench.serve.served_models", lambda args: (
        names if args.base_url == "http://127.0.0.1:8000" else pytest.fail(args.base_url)))


README = ["eval", "--base-url", "http://127.0.0.1:8000", "--tasks", "gsm8k,math500,aime24", "--data-path", "."]


def test_the_servers_only_model_is_evaluated(monkeypatch, capsys, run_eval):
    served(monkeypatch, ["stories260k"])
    with pytest.raises(Started, match="^stories260k$"):
        main(README)
    assert "eval: model 'stories260k' (the server's; --model chooses)" in capsys.readouterr().err
    monkeypatch.setattr("deepserve.bench.serve.served_models", lambda args: pytest.fail("the server was asked"))
    with pytest.raises(Started, match="^other$"):   # --model as given
        main(README + ["--model", "other"])


def test_a_server_of_several_models_needs_model(monkeypatch, capsys, run_eval):
    served(monkeypatch, ["deepseek_r1", "path/DeepSeek-R1-W8A8"])
    assert main(README) == 2
    assert capsys.readouterr().err.strip() == ("deepserve eval: error: the server serves deepseek_r1, "
                                               "path/DeepSeek-R1-W8A8: choose one with --model")
