"""A fake OpenAI streaming endpoint with known timing, run as its own process by the tests.

`python fake_openai.py --ttft 0.1 --itl 0.02 [--status 500] [--no-usage] [--spec-metrics] [--root PATH]
[--char-tokenizer] [--fail-after N]` prints its port,
then serves: after a completion request it waits `ttft` seconds, sends the first text chunk,
then one chunk every `itl` seconds (scheduled against absolute times, so sleep overhead does
not accumulate), then a usage chunk (the prompt's word count as its prompt_tokens) and `[DONE]`. Each chunk's text is " hello", one token
of the Llama tokenizer. GET /_stats returns what it received (bodies, headers, arrival times, most
requests in flight). A plain asyncio HTTP/1.1 server, in its own process so that its timing
does not share a GIL with the client under test.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


class FakeOpenAI:
    def __init__(self, ttft=0.1, itl=0.02, status=200, usage=True, role_chunk=True, spec_metrics=False,
                 root=None, char_tokenizer=False, fail_after=None):
        self.ttft, self.itl, self.status, self.root = ttft, itl, status, root
        self.fail_after = fail_after   # completion requests answered before the rest get 503s
        self.char_tokenizer = char_tokenizer
        self.tokenize_headers: list[dict] = []   # the headers of each /tokenize and /detokenize call
        self.usage, self.role_chunk, self.spec_metrics = usage, role_chunk, spec_metrics
        self.requests: list[dict] = []
        self.headers: list[dict] = []   # each request's headers, names lower-cased
        self.in_flight = self.max_in_flight = 0
        self.arrivals: list[float] = []

    async def serve(self):
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await server.serve_forever()

    async def _handle(self, reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self._respond(method, path, body, writer, headers)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _send_json(self, writer, status, obj):
        data = json.dumps(obj).encode()
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()

    def _spec_metrics(self) -> str:
        """vLLM's speculative-decoding counters, as if each request so far drafted twice, 2 tokens a
        draft, with 3 of its 4 tokens accepted (2 at position 0, 1 at position 1)."""
        n, label = len(self.requests), 'model_name="fake-model"'
        return "".join([
            "# TYPE vllm:spec_decode_num_drafts counter\n",
            f"vllm:spec_decode_num_drafts_total{{{label}}} {2.0 * n}\n",
            f"vllm:spec_decode_num_draft_tokens_total{{{label}}} {4.0 * n}\n",
            f"vllm:spec_decode_num_accepted_tokens_total{{{label}}} {3.0 * n}\n",
            f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{label},position="0"}} {2.0 * n}\n',
            f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{label},position="1"}} {1.0 * n}\n',
            f"vllm:spec_decode_num_drafts_created {{{label}}} 1.7e9\n"])

    async def _send_text(self, writer, text):
        data = text.encode()
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                     + data)
        await writer.drain()

    async def _chunk(self, writer, obj):
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    async def _respond(self, method, path, body, writer, headers):
        if method == "GET" and path == "/v1/models":
            card = {"id": "fake-model", **({"root": self.root} if self.root else {})}
            return await self._send_json(writer, 200, {"object": "list", "data": [card]})
        if method == "GET" and path == "/metrics":
            if not self.spec_metrics:
                return await self._send_json(writer, 404, {"detail": "Not Found"})
            return await self._send_text(writer, self._spec_metrics())
        if path in ("/tokenize", "/detokenize"):   # vLLM's, with one token a character
            if not self.char_tokenizer:
                return await self._send_json(writer, 404, {"detail": "Not Found"})
            self.tokenize_headers.append(headers)
            if path == "/tokenize":
                return await self._send_json(writer, 200, {"tokens": [ord(c) for c in body["prompt"]]})
            return await self._send_json(writer, 200, {"prompt": "".join(map(chr, body["tokens"]))})
        if method == "GET" and path == "/_stats":
            return await self._send_json(writer, 200, {"requests": self.requests, "headers": self.headers, "arrivals": self.arrivals,
                                                       "tokenize_headers": self.tokenize_headers,
                                                       "max_in_flight": self.max_in_flight})
        self.arrivals.append(time.perf_counter())
        self.requests.append(body)
        self.headers.append(headers)
        if self.status != 200:
            return await self._send_json(writer, self.status, {"error": {"message": "boom", "code": self.status}})
        if self.fail_after is not None and len(self.requests) > self.fail_after:
            return await self._send_json(writer, 503, {"error": {"message": "shutting down", "code": 503}})
        chat = path.endswith("/chat/completions")
        n = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        loop = asyncio.get_running_loop()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        t0 = loop.time()
        if chat and self.role_chunk:
            await self._chunk(writer, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + self.ttft + i * self.itl - loop.time()))
            choice = {"index": 0, "delta": {"content": " hello"}} if chat else {"index": 0, "text": " hello"}
            await self._chunk(writer, {"choices": [choice]})
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            # the prompt's words stand for the server's token count (not the bench tokenizer's)
            text = body.get("prompt") or (body.get("messages") or [{}])[0].get("content") or ""
            words = len(str(text).split())
            await self._chunk(writer, {"choices": [], "usage": {"prompt_tokens": words, "completion_tokens": n,
                                                                 "total_tokens": n + words}})
        await self._chunk(writer, b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self.in_flight -= 1


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--ttft", type=float, default=0.1)
    p.add_argument("--itl", type=float, default=0.02)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--no-usage", action="store_true")
    p.add_argument("--spec-metrics", action="store_true", help="serve vLLM's spec_decode counters at /metrics")
    p.add_argument("--root", default=None, help="the model's root (path) in /v1/models, as vLLM lists it")
    p.add_argument("--char-tokenizer", action="store_true", help="serve /tokenize and /detokenize, one token "
                   "a character (else they are 404s)")
    p.add_argument("--fail-after", type=int, default=None, help="answer this many completion requests, "
                   "then 503 (a server going away mid-run)")
    a = p.parse_args(argv)
    asyncio.run(FakeOpenAI(a.ttft, a.itl, a.status, usage=not a.no_usage, spec_metrics=a.spec_metrics,
                           root=a.root, char_tokenizer=a.char_tokenizer, fail_after=a.fail_after).serve())


if __name__ == "__main__":
    sys.exit(main())
