"""One streaming request to an OpenAI-compatible endpoint, timed token by token.

Timing follows vLLM's bench clients: TTFT is the time to the first chunk that carries text
(a chat stream's opening role-only chunk does not count; reasoning text does), ITL the gaps
between later text chunks, latency (E2EL) the time to the last text chunk. The output token
count comes from the server's `usage` (asked for with `stream_options.include_usage`) and
only when the server gives none from tokenizing the generated text. A request that fails
(HTTP error, broken stream, no text) is returned with `success=False` and its error, never
raised, so the caller can count it.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import httpx

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
    temperature: float = 0.0


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
    payload: dict = {"model": req.model, "temperature": req.temperature, "stream": True,
                     "stream_options": {"include_usage": True}}
    if req.chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
        payload["max_tokens"] = req.output_len
    if req.ignore_eos:
        payload["ignore_eos"] = True  # vLLM/SGLang extension; OpenAI itself ignores it
    return payload


def _chunk_text(data: dict, chat: bool) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if chat:
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choices[0].get("text") or ""


async def sse_lines(resp: httpx.Response):
    """The stream's lines, split at b"\\n" only. SSE ends lines with CR / LF, while httpx's
    aiter_lines() also splits text at U+0085, U+2028 and U+2029, which a server may send
    unescaped inside a JSON string (valid JSON; model output can hold them)."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace")
    if buf:
        yield buf.decode("utf-8", "replace")


async def send_request(client: httpx.AsyncClient, req: RequestInput) -> RequestOutput:
    """Send `req` streaming and time it; failures come back in the output, not as exceptions."""
    out = RequestOutput(prompt_len=req.prompt_len)
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    pieces: list[str] = []
    start = out.start_time = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", req.api_url, json=build_payload(req), headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                out.error = f"HTTP {resp.status_code}: {body[:300]}"
                return out
            async for line in sse_lines(resp):
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                body = line[len("data:"):].strip()
                if body == "[DONE]":
                    break
                data = json.loads(body)
                if "error" in data and not data.get("choices"):
                    out.error = f"error in stream: {json.dumps(data['error'])[:300]}"
                    return out
                now = time.perf_counter()
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
    except (httpx.HTTPError, OSError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.generated_text = "".join(pieces)
    if not pieces:
        out.error = "stream ended without any text chunk (no TTFT)"
        return out
    out.latency = last - start
    out.success = True
    return out
