"""`deepserve chat --url` / `deepserve complete`: vLLM's client commands against a fake
OpenAI-compatible server (one thread, http.server) that checks the key and the model name as
vLLM's server does, streams each word of its answer as one chunk and records each request."""
from __future__ import annotations

import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepserve.cli.main import main

ANSWER = ["Once", " upon", " a", " time"]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        srv = self.server
        srv.keys.append(self.headers.get("Authorization"))
        if srv.api_key and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
            self._json(401, {"error": "Unauthorized"})    # vLLM's --api-key answer
            return False
        return True

    def do_GET(self):
        if self._authorized() and self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": m} for m in self.server.models]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        self.server.bodies.append((self.path, body))
        if body["model"] not in self.server.models:
            return self._json(404, {"error": {"message": f"The model `{body['model']}` does not exist.",
                                              "type": "NotFoundError", "code": 404}})
        chat = self.path == "/v1/chat/completions"
        if body["model"] == "dies":   # one chunk of a chunked stream, then the connection drops
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            event = f"data: {json.dumps({'choices': [{'index': 0, 'text': 'Once'}]})}\n\n".encode()
            self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n5\r\nda")
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for word in ANSWER:
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 3, "completion_tokens": len(ANSWER), "total_tokens": 3 + len(ANSWER)}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.models, srv.api_key, srv.bodies, srv.keys = ["first-model", "second-model", "dies"], None, [], []
    srv.url = f"http://127.0.0.1:{srv.server_port}/v1"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_quick_streams_the_answer_with_the_first_model(server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    assert main(["chat", "--url", server.url, "--system-prompt", "be brief", "-q", "hi"]) == 0
    assert capsys.readouterr().out == "Using model: first-model\nOnce upon a time\n"
    path, body = server.bodies[0]
    assert path == "/v1/chat/completions" and body["model"] == "first-model" and body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert "max_tokens" not in body     # the server's default, as vLLM's client
    assert set(server.keys) == {"Bearer env-key"}


def test_chat_interactive_keeps_the_conversation_until_eof(server, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nmore\n"))
    assert main(["chat", "--url", server.url, "--model-name", "second-model", "--max-tokens", "7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Using model: second-model\nPlease enter a message for the chat model:\n")
    assert out.count("Once upon a time\n") == 2
    assert [p for p, _ in server.bodies] == ["/v1/chat/completions"] * 2   # the blank line is not sent
    last = server.bodies[1][1]
    assert last["model"] == "second-model" and last["max_tokens"] == 7
    assert last["messages"] == [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "Once upon a time"},
                                {"role": "user", "content": "more"}]


def test_complete_quick_and_stats(server, capsys):
    assert main(["complete", "--url", server.url, "-q", "Once", "--max-tokens", "4", "--stats"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["Using model: first-model", "Once upon a time"]
    assert lines[2].startswith("TTFT: ") and lines[3].startswith("TPS: ") and "(4 tokens in" in lines[3]
    path, body = server.bodies[0]
    assert path == "/v1/completions" and body["prompt"] == "Once" and body["max_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True}


def test_complete_interactive_each_line_a_prompt(server, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    assert main(["complete", "--url", server.url]) == 0
    assert [b["prompt"] for _, b in server.bodies] == ["a", "b"]
    assert "Please enter prompt to complete:" in capsys.readouterr().out


def test_api_key_flag_over_the_environment_and_a_401(server, capsys, monkeypatch):
    server.api_key = "right"
    monkeypatch.setenv("OPENAI_API_KEY", "right")
    assert main(["chat", "--url", server.url, "-q", "hi"]) == 0
    capsys.readouterr()
    assert main(["chat", "--url", server.url, "--api-key", "wrong", "-q", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == f"deepserve chat: error: GET {server.url}/models: 401 Unauthorized\n"


def test_an_unknown_model_is_one_line(server, capsys):
    assert main(["complete", "--url", server.url, "--model-name", "nope", "-q", "x"]) == 1
    err = capsys.readouterr().err
    assert err == (f"deepserve complete: error: POST {server.url}/completions: 404 "
                   "The model `nope` does not exist.\n")


def test_no_server_is_one_line(capsys):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    assert main(["chat", "--url", url, "-q", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"deepserve chat: error: cannot reach {url}/models: ") and err.count("\n") == 1
    assert "is the server up there?" in err


def test_model_name_alone_asks_vllms_default_url(monkeypatch, capsys):
    """--model-name without --url is the client form, at http://localhost:8000/v1 as in vLLM."""
    seen = {}

    def fake_run_chat(args):
        seen["url"] = args.url
        return 0

    monkeypatch.setattr("deepserve.cli.chat.run_chat", fake_run_chat)
    assert main(["chat", "--model-name", "m", "-q", "hi"]) == 0
    assert seen["url"] == "http://localhost:8000/v1"


def test_ctrl_c_ends_the_chat_with_exit_0(server, capsys, monkeypatch):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["chat", "--url", server.url]) == 0
    assert capsys.readouterr().err == ""


def test_a_url_without_a_scheme_is_one_line(capsys):
    assert main(["complete", "--url", "localhost:8000/v1", "-q", "x"]) == 1
    assert capsys.readouterr().err == ("deepserve complete: error: --url must start with http:// or https://, "
                                       "got 'localhost:8000/v1'\n")


def test_a_stream_that_breaks_off_is_one_line(server, capsys):
    assert main(["complete", "--url", server.url, "--model-name", "dies", "-q", "x"]) == 1
    out, err = capsys.readouterr()
    assert out == "Using model: dies\nOnce"
    assert err.startswith(f"deepserve complete: error: {server.url}/completions: the stream broke off: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("flag, value", [("--model", "some/folder"), ("--max-model-len", "128")])
def test_local_model_flags_with_url_are_one_line(server, capsys, flag, value):
    """A local model's flag beside --url is refused naming it; nothing is sent to the server."""
    sent = len(server.keys)
    assert main(["chat", "--url", server.url, flag, value, "-q", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deepserve chat: error: {flag} sets up a local model")
    assert len(server.keys) == sent
