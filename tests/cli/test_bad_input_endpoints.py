"""`bench serve`, `bench sweep` and `eval` against an endpoint nothing answers at: one line naming
the URL at once (exit code 2), instead of a run of failed requests (bench) or minutes of retries
(eval's 8 with doubling backoff)."""
from __future__ import annotations

import socket

import pytest

import deepserve.bench.sweep  # noqa: F401  (imported before run_serve is patched: it binds the real one)
from deepserve.cli.main import main
from tests.cli.conftest import REPO

STORIES = str(REPO / "deepserve/assets/stories260k")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.mark.parametrize("command", [["serve"], ["sweep", "--max-concurrency-list", "1"]])
def test_bench_names_the_url_nothing_answers_at(capsys, monkeypatch, command):
    def no_run(*a, **k):
        raise AssertionError("requests were sent")
    monkeypatch.setattr("deepserve.bench.serve.run_serve", no_run)
    monkeypatch.setattr("deepserve.bench.sweep.run_sweep", no_run)
    port = closed_port()
    err = _one_line(capsys, ["bench", *command, "--model", STORIES, "--num-prompts", "2",
                             "--base-url", f"http://127.0.0.1:{port}/v1", "--endpoint", "/v1/chat/completions"])
    assert err.startswith(f"deepserve bench: error: cannot reach http://127.0.0.1:{port}/v1/chat/completions: ")
    assert err.endswith("(is the server up there?)")


def test_eval_names_the_url_nothing_answers_at(capsys, monkeypatch, tmp_path):
    def no_run(opts):
        raise AssertionError("the eval started")
    monkeypatch.setattr("deepserve.evals.runner.run_eval", no_run)
    port = closed_port()
    err = _one_line(capsys, ["eval", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--tasks", "gsm8k",
                             "--data-path", str(tmp_path), "--max-retries", "8"])
    assert err.startswith(f"deepserve eval: error: cannot reach http://127.0.0.1:{port}/v1: ")


def test_a_host_that_does_not_resolve_is_named(capsys, monkeypatch):
    def no_address(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(socket, "create_connection", no_address)
    err = _one_line(capsys, ["eval", "--base-url", "http://gpu-node-7:8000", "--model", "m", "--tasks", "gsm8k",
                             "--data-path", "."])
    assert err == ("deepserve eval: error: cannot reach http://gpu-node-7:8000/v1: Name or service not known "
                   "(is the server up there?)")


def test_the_ready_check_waits_instead(monkeypatch):
    """--ready-check-timeout-sec asks to wait for a server that is starting: no check before it."""
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: pytest.fail("checked"))
    monkeypatch.setattr("deepserve.bench.serve.run_serve", lambda args: {"completed": 1})
    assert main(["bench", "serve", "--model", STORIES, "--port", str(closed_port()),
                 "--ready-check-timeout-sec", "5"]) == 0


@pytest.fixture
def html_server():
    """A web server that is not an OpenAI API: multi-line HTML error pages for every path."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_endpoint_that_is_not_an_api_is_one_line(capsys, html_server, tmp_path, monkeypatch):
    """httpx's status error ran on to a line of documentation links; an HTML error page came
    as it was, a dozen lines."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    err = _one_line(capsys, ["eval", "--base-url", html_server, "--tasks", "gsm8k", "--data-path", str(tmp_path)])
    assert err.endswith("/v1/models did not list the served models (HTTP 404 File not found)")
    err = _one_line(capsys, ["eval", "--base-url", html_server, "--model", "m", "--tasks", "gsm8k",
                             "--data-path", str(tmp_path), "--max-retries", "0", "--no-progress"])
    assert "answered HTTP 501: <!DOCTYPE HTML> <html" in err or "last: HTTP 501: <!DOCTYPE HTML> <html" in err


def test_a_dataset_path_that_is_no_dataset_is_named(capsys, monkeypatch, tmp_path):
    """A folder was said not to exist (after the model had loaded); a ShareGPT file that is not
    JSON came as the bare JSON error."""
    from deepserve.bench.datasets import sample_sharegpt

    monkeypatch.setattr("deepserve.engine.llm_engine.LLMEngine", lambda *a, **k: pytest.fail("the engine started"))
    err = _one_line(capsys, ["bench", "throughput", "--model", STORIES, "--dataset-name", "sharegpt",
                             "--dataset-path", str(tmp_path), "--num-prompts", "2"])
    assert err == f"deepserve bench: error: --dataset-path '{tmp_path}' is a folder; name the dataset file in it"
    (tmp_path / "sharegpt.json").write_text("{bad")
    with pytest.raises(ValueError, match=f"^sharegpt dataset '{tmp_path}/sharegpt.json' is not JSON "):
        sample_sharegpt(None, str(tmp_path / "sharegpt.json"), 2, None, 0)
