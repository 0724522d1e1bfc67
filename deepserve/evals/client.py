"""An OpenAI chat-completions client for evaluation, with retries for transient failures.

Plain HTTP (httpx), so it measures any OpenAI-compatible server, not only ours. Connection
errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter (honouring a
Retry-After header); any other 4xx is the caller's mistake and fails at once with the
server's own message, since retrying cannot fix it.
"""
from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass

import httpx


class RequestFailed(RuntimeError):
    """A request failed for good: a non-retryable status (`status`), or retries were exhausted
    (`status` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def per_request(self) -> bool:
        """A refusal of this one request (400, 413, 422, ...: its prompt or body), not of the
        whole run (bad key, unknown model or route, which every request would meet)."""
        return self.status is not None and 400 <= self.status < 500 and self.status not in (401, 403, 404, 405)


@dataclass(frozen=True)
class SamplingSettings:
    """What is sent with every request; part of the cache key."""
    model: str
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int | None = 32768   # None: not sent (the server's context bounds a reply)
    seed: int | None = None

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model must name the served model, got an empty string")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")


def server_url(base_url: str) -> str:
    """--base-url without a trailing chat / completions endpoint a user pasted with it."""
    return re.sub(r"/(?:chat/)?completions$", "", base_url.strip().rstrip("/"))


def api_root(base_url: str) -> str:
    """"http://h:8000", "http://h:8000/", "http://h:8000/v1/" and the endpoint itself,
    "http://h:8000/v1/chat/completions" -> "http://h:8000/v1"."""
    url = server_url(base_url)
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {base_url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def _is_transient(status: int) -> bool:
    return status == 429 or status == 408 or status >= 500


class ChatClient:
    """POST /v1/chat/completions with retries; one instance per run (shares connections)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 3600.0,
                 max_retries: int = 8, backoff: float = 1.0, max_backoff: float = 60.0,
                 max_connections: int = 64):
        if max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {max_retries}")
        if backoff < 0:
            raise ValueError(f"--retry-backoff must be >= 0 seconds, got {backoff}")
        self.url = api_root(base_url) + "/chat/completions"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout),
                                       limits=limits)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.retries_done = 0

    async def close(self) -> None:
        await self._http.aclose()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass  # an HTTP-date Retry-After: fall back to our own schedule
        base = min(self.backoff * (2 ** attempt), self.max_backoff)
        return base * (0.5 + random.random() / 2)  # jitter so retries do not arrive in waves

    async def chat(self, messages: list[dict], settings: SamplingSettings) -> dict:
        """One completion: {content, reasoning_content, finish_reason, usage}."""
        body = {"model": settings.model, "messages": messages, "temperature": settings.temperature,
                "top_p": settings.top_p, "stream": False}
        if settings.max_tokens is not None:
            body["max_tokens"] = settings.max_tokens
        if settings.seed is not None:
            body["seed"] = settings.seed
        last_error = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = await self._http.post(self.url, json=body)
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return _parse_reply(resp)
                last_error = f"HTTP {resp.status_code}: {' '.join(resp.text.split())[:300]}"   # an HTML page: one line
                if not _is_transient(resp.status_code):
                    raise RequestFailed(f"{self.url} answered {last_error}", resp.status_code)
                retry_after = resp.headers.get("retry-after")
            if attempt < self.max_retries:
                self.retries_done += 1
                await asyncio.sleep(self._delay(attempt, retry_after))
        raise RequestFailed(f"{self.url} failed {self.max_retries + 1} times; last: {last_error}")


def _parse_reply(resp: httpx.Response) -> dict:
    try:
        data = resp.json()
        choice = data["choices"][0]
        message = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RequestFailed(f"malformed chat completion ({exc!r}): {' '.join(resp.text.split())[:300]}") from None
    # vLLM/SGLang put split reasoning in `reasoning_content`; some servers call it `reasoning`.
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return {"content": message.get("content") or "", "reasoning_content": reasoning,
            "finish_reason": choice.get("finish_reason"), "usage": data.get("usage")}
