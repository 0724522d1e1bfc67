"""One streaming request to an OpenAI-compatible endpoint, timed token by token.

Timing follows vLLM's bench clients: TTFT is the time to the first chunk that carries text
(a chat stream's opening role-only chunk does not count; reasoning text does), ITL the gaps
between later text chunks, latency (E2EL) the time to the last text chunk. The prompt and output
token counts come from the server's `usage` (asked for with `stream_options.include_usage`),
as vLLM's bench takes them; without one, from the request set's prompt length and from
tokenizing the generated text. A request that fails
(HTTP error, broken stream, no text) is returned with `success=False` and its error, never
raised, so the caller can count it.

Requests go out on the bench's own HTTP/1.1 client (http1.py: a fraction of httpx's CPU per
streamed token, so that the client does not cap what it measures at high concurrency) or on
httpx (https URLs, or DEEPSERVE_BENCH_CLIENT=httpx); both give the same outputs and error strings.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

from deepserve.bench.http1 import HTTPError

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class RequestInput:
    prompt: str
    prompt_len: int
    output_len: int
    model: str
    api_url: str
    chat: bool
    ignore_eos: bool = False
    temperature: Optional[float] = 0.0   # None: not sent (the server's default applies)
    extra_body: dict = field(default_factory=dict)  # sampling parameters and --extra-body, merged last
    headers: dict = field(default_factory=dict)     # --header and x-request-id


@dataclass
class RequestOutput:
    prompt_len: int = 0
    success: bool = False
    generated_text: str = ""
    output_tokens: Optional[int] = None  # from the server's usage, when it sent one
    ttft: float = 0.0                    # seconds
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0                 # seconds, request sent -> last text chunk
    start_time: float = 0.0              # perf_counter at send
    error: str = ""


def api_url(base_url: str, endpoint: str) -> str:
    """`endpoint` under `base_url`, which may be the server root or its `/v1`."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {base_url!r}")
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + endpoint


def build_payload(req: RequestInput) -> dict:
    payload: dict = {"model": req.model, "stream": True, "stream_options": {"include_usage": True}}
    if req.temperature is not None:
        payload["temperature"] = req.temperature
    if req.chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    if req.ignore_eos:
        payload["ignore_eos"] = True  # vLLM/SGLang extension; OpenAI itself ignores it
    payload.update(req.extra_body)
    return payload


def _chunk_text(data: dict, chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choices[0].get("text") or ""


class _HttpxStream:
    """An httpx streaming response seen as the bench's HTTP/1.1 client's `Response`: `status_code`,
    `read()`, and `chunks()` stamped with the time each chunk reaches the reader."""

    def __init__(self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict):
        self._cm = client.stream("POST", url, content=body, headers=headers)

    async def __aenter__(self) -> "_HttpxStream":
        self._resp = await self._cm.__aenter__()
        self.status_code = self._resp.status_code
        return self

    async def __aexit__(self, *exc) -> None:
        await self._cm.__aexit__(*exc)

    async def read(self) -> bytes:
        return await self._resp.aread()

    async def chunks(self):
        async for chunk in self._resp.aiter_bytes():
            yield time.perf_counter(), chunk


async def sse_lines(chunks):
    """(read time, line) of a stream of (read time, bytes), lines split at b"\\n" only. SSE ends
    lines with CR / LF, while httpx's aiter_lines() also splits text at U+0085, U+2028 and
    U+2029, which a server may send unescaped inside a JSON string (valid JSON; model output can
    hold them). Lines stay bytes: "data:" and "[DONE]" are ASCII, and only a data line's JSON is
    decoded."""
    buf = b""
    async for now, chunk in chunks:
        buf = buf + chunk if buf else chunk
        if b"\n" not in chunk:
            continue
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield now, line
    if buf:
        yield time.perf_counter(), buf


async def open_stream(client, url: str, body: bytes, headers: dict):
    """POST `body` to `url` on either client: the bench's HTTP/1.1 one, or httpx (https)."""
    if isinstance(client, httpx.AsyncClient):
        return _HttpxStream(client, url, body, headers)
    return await client.request("POST", url, body, headers)


ERRORS = (HTTPError, httpx.HTTPError, OSError, asyncio.TimeoutError, ValueError, KeyError, TypeError)


async def send_request(client, req: RequestInput) -> RequestOutput:
    """Send `req` streaming on `client` (an `Http1Client` or an httpx.AsyncClient) and time it;
    failures come back in the output, not as exceptions. A chunk's time is when the client read
    it from the socket (the HTTP/1.1 client stamps each read as it arrives; httpx when its
    iterator hands the chunk over)."""
    out = RequestOutput(prompt_len=req.prompt_len)
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    headers.update(req.headers)
    body = json.dumps(build_payload(req)).encode()
    pieces: list[str] = []
    start = out.start_time = time.perf_counter()
    last = start
    try:
        async with await open_stream(client, req.api_url, body, headers) as resp:
            if resp.status_code != 200:
                text = (await resp.read()).decode("utf-8", "replace")
                out.error = f"HTTP {resp.status_code}: {' '.join(text.split())[:300]}"   # an HTML page: one line
                return out
            async for now, line in sse_lines(resp.chunks()):
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                data = json.loads(data.decode("utf-8", "replace"))
                if "error" in data and not data.get("choices"):
                    out.error = f"error in stream: {json.dumps(data['error'])[:300]}"
                    return out
                text = _chunk_text(data, req.chat)
                if text:
                    if not pieces:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    pieces.append(text)
                usage = data.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    out.output_tokens = int(usage["completion_tokens"])
                if usage and usage.get("prompt_tokens") is not None:
                    out.prompt_len = int(usage["prompt_tokens"])   # vLLM reports the server's count
    except ERRORS as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.generated_text = "".join(pieces)
    if not pieces:
        out.error = "stream ended without any text chunk (no TTFT)"
        return out
    out.latency = last - start
    out.success = True
    return out
