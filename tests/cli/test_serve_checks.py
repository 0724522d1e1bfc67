"""What `deepserve serve` (and `chat`) can tell from their options alone fails in one line
before the engine starts, and `serve --dry-run` reports it too: the model's load (minutes for
R1) is not spent on an option that was wrong from the start."""
from __future__ import annotations

import pytest

from deepserve.cli.main import main


@pytest.fixture
def no_engine(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the engine was started")

    monkeypatch.setattr("deepserve.engine.fork_server.starts_early", lambda args: False)
    for target in ("deepserve.server.api_server.LLMEngine", "deepserve.engine.dp_engine.DataParallelEngine",
                   "deepserve.server.api_servers.run_api_servers", "deepserve.cli.chat.engine_from_args"):
        monkeypatch.setattr(target, started)


@pytest.mark.parametrize("flags, message", [
    (["--chat-template", "examples/tool_chat_template_deepseekr1.jinja"],
     "chat template file examples/tool_chat_template_deepseekr1.jinja not found"),
    (["--enable-responses-api-store", "--api-server-count", "2"],
     "keeps responses in one API server process's memory: it needs --api-server-count 1, got 2"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_server_options_fail_before_the_engine_starts(capsys, no_engine, tmp_path, monkeypatch, flags, message,
                                                      dry_run):
    monkeypatch.chdir(tmp_path)   # no examples/ folder here
    assert main(["serve", "--port", "0", *flags, *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_chat_template_of_chat_fails_before_the_engine_starts(capsys, no_engine, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["chat", "--chat-template", "tool_chat_template.jinja"]) == 2
    assert capsys.readouterr().err.strip() == ("deepserve chat: error: chat template file tool_chat_template.jinja "
                                               "not found")
