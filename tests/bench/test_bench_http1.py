"""The bench's HTTP/1.1 client (deepserve/bench/http1.py) against scripted servers in the test's
own event loop: framing (Content-Length, chunked at any split, to close), keep-alive reuse and its
stale-connection retry, a server that closes mid-stream, read timeouts, and send_request giving
the same outputs and error strings as on httpx."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from deepserve.bench.client import RequestInput, send_request
from deepserve.bench.http1 import ConnectError, Http1Client, ReadTimeout, RemoteProtocolError, split_url


def sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


def chunked(*pieces: bytes, end=True) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return out + (b"0\r\n\r\n" if end else b"")


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
TEXTS = ["Once", " up\u2028on", " a\x85 time", "\u2029!"]
FRAMES = [sse({"choices": [{"text": t}]}) for t in TEXTS] + [
    sse({"choices": [], "usage": {"completion_tokens": 4}}), sse(b"[DONE]")]


class Scripted:
    """A server that answers each request with the next script: a list of byte strings written
    with a flush between them, or "close" to drop the connection there. Counts connections and
    keeps the requests' heads and bodies."""

    def __init__(self, *scripts, pause=0.0):
        self.scripts, self.pause = list(scripts), pause
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.writers = []
        self.handlers = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        for w in self.writers:
            w.close()
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def _handle(self, reader, writer):
        self.handlers.append(asyncio.current_task())
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                for piece in self.scripts.pop(0):
                    if piece == "close":
                        writer.close()
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(self.pause)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def request(url, chat=False):
    return RequestInput(prompt="p", prompt_len=1, output_len=4, model="m", api_url=url + "/v1/completions",
                        chat=chat)


async def both(server: Scripted, script_for_each):
    """send_request on the HTTP/1.1 client and on httpx, the server answering `script_for_each` to each."""
    server.scripts = [script_for_each, script_for_each]
    async with Http1Client(5.0) as client:
        mine = await send_request(client, request(server.url))
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        theirs = await send_request(client, request(server.url))
    return mine, theirs


def same(mine, theirs):
    assert (mine.success, mine.generated_text, mine.output_tokens, len(mine.itl), mine.error) == \
        (theirs.success, theirs.generated_text, theirs.output_tokens, len(theirs.itl), theirs.error)


@pytest.mark.parametrize("split", [1, 3, 7, 4096])
def test_chunked_sse_split_anywhere_matches_httpx(split):
    """Chunk framing and SSE lines cut at every byte offset (inside multi-byte characters and
    the CRLFs too); raw U+2028 / U+0085 / U+2029 inside a JSON string stay in one line."""
    wire = SSE_HEAD + chunked(*FRAMES)
    pieces = [wire[i:i + split] for i in range(0, len(wire), split)]

    async def go():
        async with Scripted(pause=0.0) as srv:
            return await both(srv, pieces)
    mine, theirs = asyncio.run(go())
    assert mine.success and mine.generated_text == "".join(TEXTS) and mine.output_tokens == 4
    assert len(mine.itl) == 3
    same(mine, theirs)


def test_content_length_and_close_delimited_bodies():
    body = b"".join(FRAMES)
    by_length = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body[:50], body[50:]]
    to_close = [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", body[:50], body[50:], "close"]

    async def go():
        async with Scripted(by_length, to_close) as srv:
            async with Http1Client(5.0) as client:
                a = await send_request(client, request(srv.url))
                b = await send_request(client, request(srv.url))
            return a, b, srv.connections
    a, b, connections = asyncio.run(go())
    for out in (a, b):
        assert out.success and out.generated_text == "".join(TEXTS) and out.output_tokens == 4, out.error
    assert connections == 1   # the Content-Length response left the connection reusable


def test_error_json_response_matches_httpx():
    err = json.dumps({"error": {"message": "max_tokens must be >= 1", "code": 400}}).encode()
    script = [b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(err) + err]

    async def go():
        async with Scripted() as srv:
            return await both(srv, script)
    mine, theirs = asyncio.run(go())
    assert not mine.success and mine.error == f"HTTP 400: {err.decode()}"
    same(mine, theirs)


def test_error_event_in_stream_matches_httpx():
    script = [SSE_HEAD + chunked(FRAMES[0], sse({"error": {"message": "engine died", "code": 500}}))]

    async def go():
        async with Scripted() as srv:
            return await both(srv, script)
    mine, theirs = asyncio.run(go())
    assert not mine.success and mine.error.startswith('error in stream: {"message": "engine died"')
    same(mine, theirs)


def test_server_closing_mid_stream_is_a_failure():
    script = [SSE_HEAD + chunked(*FRAMES[:2], end=False), "close"]

    async def go():
        async with Scripted() as srv:
            return await both(srv, script)
    mine, theirs = asyncio.run(go())
    assert not mine.success and not theirs.success
    assert mine.error.startswith("RemoteProtocolError: peer closed connection without sending complete")
    assert theirs.error.startswith("RemoteProtocolError: peer closed connection without sending complete")


def test_keep_alive_reuse_and_stale_connection_retry():
    """Sequential requests share one connection, also when the body's last chunk (after
    [DONE]) arrives after the reader stopped; a reused connection that the server closes on
    the next request without an answer (its keep-alive ran out) is retried on a new one."""
    wire = SSE_HEAD + chunked(*FRAMES, end=False)
    late_end = [wire, b"0\r\n\r\n"]

    async def go():
        async with Scripted(late_end, late_end, late_end, ["close"], late_end, pause=0.02) as srv:
            async with Http1Client(5.0) as client:
                outs = [await send_request(client, request(srv.url)) for _ in range(3)]
                first = srv.connections
                outs.append(await send_request(client, request(srv.url)))
            return outs, first, srv.connections, srv.requests
    outs, first, connections, requests = asyncio.run(go())
    assert all(o.success and o.generated_text == "".join(TEXTS) for o in outs), [o.error for o in outs]
    assert first == 1 and connections == 2 and len(requests) == 5
    head, body = requests[0]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and b"Content-Length: %d" % len(body) in head
    assert json.loads(body)["stream"] is True


def test_read_timeout_and_connect_error():
    stalled = [SSE_HEAD + chunked(FRAMES[0], end=False)]   # then nothing

    async def go():
        async with Scripted(stalled) as srv:
            async with Http1Client(0.3) as client:
                slow = await send_request(client, request(srv.url))
        async with Http1Client(1.0) as client:
            refused = await send_request(client, request("http://127.0.0.1:9"))
        return slow, refused
    slow, refused = asyncio.run(go())
    assert not slow.success and slow.error == "ReadTimeout: no data from the server for 0.3 s"
    assert not refused.success and refused.error.startswith("ConnectError: ")
    assert issubclass(ReadTimeout, Exception) and issubclass(ConnectError, Exception)


@pytest.mark.parametrize("head, message", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size line"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc", "Content-Encoding"),
    (b"SPDY/3 200 OK\r\n\r\n", "bad status line"),
])
def test_malformed_responses_are_protocol_errors(head, message):
    async def go():
        async with Scripted([head]) as srv:
            async with Http1Client(2.0) as client:
                with pytest.raises(RemoteProtocolError, match=message):
                    async with await client.request("POST", srv.url + "/x", b"{}") as resp:
                        await resp.read()
    asyncio.run(go())


def test_split_url():
    assert split_url("http://h:81/v1/completions?x=1") == ("h", 81, "/v1/completions?x=1")
    assert split_url("http://h") == ("h", 80, "/")
    with pytest.raises(ValueError, match="https://h/v1"):
        split_url("https://h/v1")


def test_open_client_choice(monkeypatch):
    from deepserve.bench.serve import open_client

    async def kinds():
        out = []
        for url in ("http://h/v1/completions", "https://h/v1/completions"):
            async with open_client(url, 1.0) as client:
                out.append(type(client).__name__)
        return out
    monkeypatch.delenv("DEEPSERVE_BENCH_CLIENT", raising=False)
    assert asyncio.run(kinds()) == ["Http1Client", "AsyncClient"]
    monkeypatch.setenv("DEEPSERVE_BENCH_CLIENT", "httpx")
    assert asyncio.run(kinds()) == ["AsyncClient", "AsyncClient"]
    monkeypatch.setenv("DEEPSERVE_BENCH_CLIENT", "aiohttp")
    with pytest.raises(ValueError, match="DEEPSERVE_BENCH_CLIENT must be one of auto, httpx, got 'aiohttp'"):
        open_client("http://h/v1/completions", 1.0)
