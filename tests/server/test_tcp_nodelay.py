"""Connections to the API's listening sockets stream without Nagle's algorithm: asyncio (the
server's loop, no uvloop) sets TCP_NODELAY only on sockets made with IPPROTO_TCP, and on a
keep-alive connection Nagle held each streamed token behind the client's delayed ACK (~40 ms:
a whole short reply arrived as one burst)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from deepserve.cli.serve import bind_listen
from deepserve.server.api_servers import listen_socket


async def _accepted_nodelay(sock: socket.socket) -> int:
    accepted = asyncio.get_running_loop().create_future()

    def on_connect(reader, writer):
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_connect, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(accepted, 10)
        writer.close()
    return value


@pytest.mark.parametrize("make", [lambda: bind_listen("127.0.0.1", 0), lambda: listen_socket("127.0.0.1", 0)],
                         ids=["serve", "api_server_count"])
def test_served_connections_have_tcp_nodelay(make):
    sock = make()
    sock.setblocking(False)
    try:
        assert asyncio.run(_accepted_nodelay(sock)) != 0
    finally:
        sock.close()
