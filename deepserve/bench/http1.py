"""A small HTTP/1.1 client for `bench serve`: keep-alive connections over asyncio's Protocol API.

Built for one job, streaming hundreds of SSE responses at once with as little client CPU per
read as possible: httpx over anyio spends more CPU per streamed token than the API server it
measures (docs/PERFORMANCE.md, "Served vs offline"). Here a socket read is one call into
`data_received`, which stamps the arrival time, takes off the chunked framing and hands the
body bytes to the waiting request in one list; nothing else runs per read.

Requests carry a Content-Length body; responses may be delimited by Content-Length, chunked
transfer encoding, or the connection's close. Plain http only (the bench falls back to httpx
for https), no proxies, no compression (none is asked for; a compressed response is an error).
A connection returns to its host's idle pool when its response has ended; a connection that
closed while idle is skipped, and a request whose reused connection closes before any response
byte is retried once on a new one (a server may close an idle keep-alive connection just as
the request goes out). A reader that stops at the stream's end ([DONE]) leaves the body's
last chunk unread: leaving the response waits for it (up to DRAIN_S), so that the connection
is idle again before the next request wants one. Errors are `HTTPError`s with httpx's class names (ConnectError,
ReadTimeout, RemoteProtocolError), so a bench's error strings read the same on either client.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Optional
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024   # bytes of status line + headers before the response counts as broken
DRAIN_S = 1.0          # how long a response left before its end (at [DONE]) may take to end

# response parser states
HEAD, LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILER, UNTIL_CLOSE, DONE = range(8)


class HTTPError(Exception):
    pass


class ConnectError(HTTPError):
    pass


class ReadTimeout(HTTPError):
    pass


class RemoteProtocolError(HTTPError):
    pass


def split_url(url: str) -> tuple[str, int, str]:
    """(host, port, request target) of an http:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the bench's HTTP/1.1 client takes http://host[:port]/path URLs, got {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, target


class _Connection(asyncio.Protocol):
    """One TCP connection and the response being read on it (no pipelining)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self.in_use = False
        self.buf = b""                       # bytes not parsed yet (head, chunk framing)
        self.state = DONE
        self.remaining = 0                   # body bytes left in the Content-Length body / chunk
        self.items: list[tuple[float, bytes]] = []   # (perf_counter at the read, body bytes)
        self.waiter: Optional[asyncio.Future] = None
        self.exc: Optional[HTTPError] = None
        self.last_read = 0.0
        self.received = 0                    # bytes received for the current response
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.timer: Optional[asyncio.TimerHandle] = None

    # asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        now = self.last_read = time.perf_counter()
        self.received += len(data)
        if not self.in_use:
            self._fail(RemoteProtocolError("data received on an idle connection"))
            return
        self.buf = self.buf + data if self.buf else data
        try:
            body = self._parse()
        except HTTPError as exc:
            self._fail(exc)
            return
        if body:
            self.items.append((now, body))
        self._wake()

    def eof_received(self):
        return False   # close the transport; connection_lost follows

    def connection_lost(self, exc):
        self.closed = True
        if self.in_use and self.state == UNTIL_CLOSE:
            self.state = DONE
        elif self.in_use and self.state != DONE and self.exc is None:
            self.exc = (RemoteProtocolError("server disconnected without sending a response")
                        if self.state == HEAD and not self.received else
                        RemoteProtocolError("peer closed connection without sending complete message body"))
        if self.timer is not None:
            self.timer.cancel()
        self._wake()

    # the response parser: moves self.buf through the states, returns the body bytes it found

    def _parse(self) -> bytes:
        pieces = []
        buf = self.buf
        while buf:
            state = self.state
            if state == HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise RemoteProtocolError(f"response head longer than {MAX_HEAD} bytes")
                    break
                head, buf = buf[:end], buf[end + 4:]
                self._read_head(head)
            elif state == LENGTH or state == CHUNK_DATA:
                n = min(self.remaining, len(buf))
                pieces.append(buf[:n] if n < len(buf) else buf)
                buf = buf[n:]
                self.remaining -= n
                if self.remaining == 0:
                    self.state = DONE if state == LENGTH else CHUNK_END
            elif state == CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise RemoteProtocolError("chunk size line too long")
                    break
                try:
                    size = int(buf[:end].split(b";", 1)[0], 16)
                except ValueError:
                    raise RemoteProtocolError(f"bad chunk size line {buf[:end][:40]!r}") from None
                buf = buf[end + 2:]
                self.state, self.remaining = (TRAILER, 0) if size == 0 else (CHUNK_DATA, size)
            elif state == CHUNK_END:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise RemoteProtocolError("chunk not followed by CRLF")
                buf = buf[2:]
                self.state = CHUNK_SIZE
            elif state == TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                buf = buf[end + 2:]
                if end == 0:
                    self.state = DONE
            elif state == UNTIL_CLOSE:
                pieces.append(buf)
                buf = b""
            else:   # DONE: bytes after the response's end
                raise RemoteProtocolError("data after the end of the response")
        self.buf = buf
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise RemoteProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise RemoteProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        if 100 <= status < 200:
            return   # an interim response (100 Continue): the real head follows
        self.status, self.headers = status, headers
        conn = headers.get("connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in conn
        if headers.get("content-encoding", "identity").lower() != "identity":
            raise RemoteProtocolError(f"unasked-for Content-Encoding {headers['content-encoding']!r}")
        if status in (204, 304):
            self.state = DONE
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = CHUNK_SIZE
        elif "content-length" in headers:
            try:
                self.remaining = int(headers["content-length"])
            except ValueError:
                raise RemoteProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
            self.state = LENGTH if self.remaining > 0 else DONE
        else:
            self.state, self.keep_alive = UNTIL_CLOSE, False

    # the request side

    def start(self, request: bytes) -> None:
        self.in_use, self.state, self.buf, self.items = True, HEAD, b"", []
        self.exc, self.received, self.status, self.headers = None, 0, 0, {}
        self.last_read = time.perf_counter()
        self.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._check_timeout)
        self.transport.write(request)

    def _check_timeout(self) -> None:
        """A read timeout without a timer reset per read: the timer fires, and re-arms for the
        rest of the time since the last read, or fails the response when there was none."""
        self.timer = None
        if not self.in_use or self.state == DONE or self.closed:
            return
        idle = time.perf_counter() - self.last_read
        if idle < self.timeout_s:
            self.timer = asyncio.get_running_loop().call_later(self.timeout_s - idle, self._check_timeout)
        else:
            self._fail(ReadTimeout(f"no data from the server for {self.timeout_s:g} s"))

    def _fail(self, exc: HTTPError) -> None:
        if self.exc is None:
            self.exc = exc
        self.keep_alive, self.closed = False, True
        self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        """Until something happens on this connection (data, the end, an error)."""
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter

    async def read_head(self) -> None:
        while self.state == HEAD:
            if self.exc is not None:
                raise self.exc
            if self.closed:
                raise RemoteProtocolError("server disconnected without sending a response")
            await self.wait()

    async def next_items(self) -> list[tuple[float, bytes]]:
        """The body bytes received since the last call, each with its read's time; [] at the end."""
        while not self.items:
            if self.exc is not None:
                raise self.exc
            if self.state == DONE:
                return []
            await self.wait()
        items, self.items = self.items, []
        return items

    async def drain(self) -> None:
        """Read the rest of the body, dropping it."""
        while await self.next_items():
            pass

    def finish(self) -> None:
        self.in_use, self.items = False, []
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.finish()
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.closed = True


class Response:
    """A response whose head has arrived; its body is read with `read()` or `chunks()`."""

    def __init__(self, client: "Http1Client", key: tuple[str, int], conn: _Connection):
        self._client, self._key, self._conn = client, key, conn
        self.status_code = conn.status
        self.headers = conn.headers

    async def chunks(self) -> AsyncIterator[tuple[float, bytes]]:
        """(perf_counter at the socket read, body bytes) as they arrive."""
        conn = self._conn
        while items := await conn.next_items():
            for item in items:
                yield item

    async def read(self) -> bytes:
        pieces = []
        while items := await self._conn.next_items():
            pieces += [data for _, data in items]
        return b"".join(pieces)

    async def __aenter__(self) -> "Response":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        conn = self._conn
        try:
            if exc_type is None and conn.state != DONE and conn.exc is None and conn.keep_alive:
                # the reader stopped at [DONE]: the body's last chunk is normally on its way
                await asyncio.wait_for(conn.drain(), DRAIN_S)
        except (HTTPError, asyncio.TimeoutError):
            pass
        finally:
            self._client._release(self._key, conn)


class Http1Client:
    """`async with Http1Client(timeout_s) as client:` then `async with await client.request(...)`.

    `timeout_s` bounds the connect and every wait for data (as httpx.Timeout(timeout_s) does)."""

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: Optional[dict[str, str]] = None) -> Response:
        host, port, target = split_url(url)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}", "Accept: */*"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        key = (host, port)
        for attempt in range(2):
            conn, reused = await self._acquire(key)
            conn.start(request)
            try:
                await conn.read_head()
            except HTTPError as exc:
                conn.close()
                if reused and not conn.received and isinstance(exc, RemoteProtocolError) and attempt == 0:
                    continue   # a stale keep-alive connection: once more on a new one
                raise
            except BaseException:
                conn.close()
                raise
            return Response(self, key, conn)
        raise AssertionError("unreachable")

    async def get(self, url: str) -> tuple[int, bytes]:
        """(status, body) of a GET."""
        async with await self.request("GET", url) as resp:
            return resp.status_code, await resp.read()

    async def _acquire(self, key: tuple[str, int]) -> tuple[_Connection, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
            self._all.discard(conn)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self.timeout_s), *key), self.timeout_s)
        except asyncio.TimeoutError:
            raise ConnectError(f"connecting to {key[0]}:{key[1]} took over {self.timeout_s:g} s") from None
        except OSError as exc:
            raise ConnectError(str(exc)) from None
        self._all.add(conn)
        return conn, False

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        """Back to the idle pool when its response has ended and it may be kept; else closed."""
        if conn.closed or not conn.keep_alive or conn.exc is not None or conn.state != DONE:
            conn.close()
            self._all.discard(conn)
        else:
            conn.finish()
            self._idle.setdefault(key, []).append(conn)

    async def aclose(self) -> None:
        for conn in self._all:
            conn.close()
        self._all.clear()
        self._idle.clear()

    async def __aenter__(self) -> "Http1Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
