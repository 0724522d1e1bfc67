"""The client forms of `deepserve chat --url URL` and `deepserve complete`, as vLLM's `vllm chat` /
`vllm complete` (vllm/entrypoints/cli/openai.py): talk to a running OpenAI-compatible server
over HTTP and stream its answers to the terminal.

Plain httpx, as bench/ and evals/, so the openai package is not needed. The model is
--model-name or the server's first listed one; the key --api-key or $OPENAI_API_KEY. A server
that is not there, a refused key or an unknown model is one line and exit code 1; EOF and Ctrl-C
end the session with exit code 0, as vLLM's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from deepserve.cli.generate import utf8_text

DEFAULT_URL = "http://localhost:8000/v1"


class ClientError(Exception):
    """A request the server did not answer with a completion: the line printed before exit 1."""


def add_query_args(p: argparse.ArgumentParser, url_default: str | None) -> None:
    """vLLM's --url / --model-name / --api-key and --stats; -q/--quick is added by each command."""
    p.add_argument("--url", default=url_default,
                   help=f"URL of a running OpenAI-compatible server ({DEFAULT_URL} as vLLM writes it).")
    p.add_argument("--model-name", default=None, help="Model to ask (default: the server's first listed model).")
    p.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY).")
    p.add_argument("--stats", action="store_true", help="Print TTFT and TPS after each answer.")


class Remote:
    """One server: its /v1 root, the Authorization header and the model name."""

    def __init__(self, url: str, api_key: str | None, model_name: str | None):
        import httpx

        from deepserve.evals.client import api_root

        if not url.startswith(("http://", "https://")):
            raise ClientError(f"--url must start with http:// or https://, got {url!r}")
        self.root = api_root(url)
        key = api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        self.http = httpx.Client(headers={"Authorization": f"Bearer {key}"},
                                 timeout=httpx.Timeout(600.0, connect=10.0))
        self.model = model_name or self._first_model()

    def _request(self, method: str, path: str, body: dict | None = None):
        """The open streamed response of a 200; anything else a ClientError naming the URL."""
        import httpx

        url = f"{self.root}{path}"
        try:
            resp = self.http.send(self.http.build_request(method, url, json=body), stream=True)
        except httpx.TransportError as exc:
            raise ClientError(f"cannot reach {url}: {exc or type(exc).__name__} (is the server up there?)") from None
        if resp.status_code != 200:
            resp.read()
            resp.close()
            raise ClientError(f"{method} {url}: {resp.status_code} {_error_message(resp)}")
        return resp

    def _first_model(self) -> str:
        resp = self._request("GET", "/models")
        resp.read()
        try:
            return resp.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ClientError(f"GET {self.root}/models lists no model: {_clip(resp.text)}") from None

    def stream(self, path: str, body: dict, stats: bool, out=None) -> str:
        """POST a streamed request; write each text delta to `out` as it comes, then a newline
        (and the stats); return the whole text."""
        out = sys.stdout if out is None else out
        body = {"model": self.model, "stream": True, **body}
        if stats:
            body["stream_options"] = {"include_usage": True}
        start = time.perf_counter()
        ttft, tokens, text = None, 0, ""
        resp = self._request("POST", path, body)
        try:
            for chunk in _events(resp, f"{self.root}{path}"):
                if "error" in chunk:    # an error the server met after the stream began
                    raise ClientError(f"POST {self.root}{path}: {_message_of(chunk, '')}")
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", 0)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                    if delta:
                        ttft = time.perf_counter() - start if ttft is None else ttft
                        text += delta
                        out.write(delta)
                        out.flush()
        finally:
            resp.close()
        out.write("\n")
        total = time.perf_counter() - start
        if stats and ttft is not None and total > 0:
            out.write(f"TTFT: {ttft * 1000:.2f} ms\nTPS:  {tokens / total:.2f} tokens/s "
                      f"({tokens} tokens in {total:.2f}s)\n")
        out.flush()
        return text


def _events(resp, url: str):
    """The JSON objects of a server-sent-event stream, up to `data: [DONE]`."""
    import httpx

    try:
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                yield json.loads(data)
            except ValueError:
                raise ClientError(f"{url} sent a stream line that is not JSON: {_clip(data)}") from None
    except httpx.TransportError as exc:    # the server went away, or sent nothing for the read timeout
        raise ClientError(f"{url}: the stream broke off: {exc or type(exc).__name__}") from None


def _clip(text: str) -> str:
    return " ".join(text.split())[:300]


def _message_of(obj, fallback: str) -> str:
    """An OpenAI error object's message ({"error": {"message": ...}}, or FastAPI's {"detail": ...})."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(obj.get("detail"), str):
            return obj["detail"]
    return fallback


def _error_message(resp) -> str:
    try:
        return _message_of(resp.json(), _clip(resp.text))
    except ValueError:
        return _clip(resp.text) or resp.reason_phrase


def _prompts(banner: str):
    """vLLM's interactive loop: the banner, then each line typed after "> " until EOF. Lines
    that are blank are skipped (an empty prompt is no question)."""
    print(banner, flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip():
            yield utf8_text(line, "stdin")


def _run(args: argparse.Namespace, session) -> int:
    """`session(remote, quick)` with ClientError as one line (exit 1) and Ctrl-C as a clean end
    (exit 0). Text that is not UTF-8 is main's one line (exit 2), as other bad input."""
    quick = utf8_text(args.quick, "-q") if args.quick is not None else None
    try:
        remote = Remote(args.url, args.api_key, args.model_name)
        print(f"Using model: {remote.model}", flush=True)
        session(remote, quick)
    except ClientError as exc:
        print(f"deepserve {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print()
        return 0
    return 0


def run_chat(args: argparse.Namespace) -> int:
    system = args.system_prompt
    conversation = [{"role": "system", "content": utf8_text(system, "--system-prompt")}] if system is not None else []
    extra = {} if args.max_tokens is None else {"max_tokens": args.max_tokens}

    def ask(remote: Remote, message: str) -> None:
        conversation.append({"role": "user", "content": message})
        reply = remote.stream("/chat/completions", {"messages": conversation, **extra}, args.stats)
        conversation.append({"role": "assistant", "content": reply})

    def session(remote: Remote, quick: str | None) -> None:
        if quick is not None:
            return ask(remote, quick)
        for message in _prompts("Please enter a message for the chat model:"):
            ask(remote, message)

    return _run(args, session)


def run_complete(args: argparse.Namespace) -> int:
    extra = {"max_tokens": args.max_tokens} if args.max_tokens else {}

    def session(remote: Remote, quick: str | None) -> None:
        if quick is not None:
            remote.stream("/completions", {"prompt": quick, **extra}, args.stats)
            return
        for prompt in _prompts("Please enter prompt to complete:"):
            remote.stream("/completions", {"prompt": prompt, **extra}, args.stats)

    return _run(args, session)
