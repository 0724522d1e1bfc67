"""Liveness of engine cores on other nodes, seen from the sockets the front end binds.

With vLLM's multi-node data parallel without Ray (`--headless` nodes) the front end starts only
its own node's ranks, so no process monitor sees the others. Each of their cores connects over
tcp to a socket the front end binds for that DP rank's requests. When the core's process ends,
its node's kernel closes the connection; when the node or the network goes away, ZeroMQ's
heartbeats (ZMTP 3.1 PING/PONG, answered by the peer's I/O thread even while its Python thread
runs a long step) stop coming back. Either way the socket's monitor reports a disconnect, which
names the DP rank, so the front end fails its requests instead of waiting for outputs that
never come. The other way round, a headless node's core watches its connection to the front end
that started it the same way, and ends (its node with it) when that front end is gone.
"""
from __future__ import annotations

from typing import Optional

HEARTBEAT_IVL_MS = 1000       # a PING every second on each remote core's connection
HEARTBEAT_TIMEOUT_MS = 15000  # no traffic back for this long: the connection is dropped


def watch(sock):
    """Heartbeats on `sock`'s connections from now on, and a monitor socket that receives one
    message each time one of them ends."""
    import zmq
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)


class RemoteCores:
    """Watches the front end's per-DP-rank request sockets of the ranks other nodes run.

    `sockets` maps a DP rank to its bound socket (before the core connects: heartbeats apply
    to connections made after the options are set); `lost()` is polled by the front end's
    own thread, so the monitor sockets need no locking."""

    def __init__(self, sockets: dict[int, object], addresses: dict[int, str]):
        self.addresses = addresses
        self._watched = []
        for rank, sock in sockets.items():
            self._watched.append((rank, sock, watch(sock)))

    def lost(self) -> Optional[str]:
        """Why a remote DP rank can no longer serve (its connection ended), or None."""
        import zmq
        for rank, _, monitor in self._watched:
            try:
                monitor.recv_multipart(zmq.NOBLOCK)   # only disconnects are subscribed
            except zmq.Again:
                continue
            return (f"DP rank {rank} (on another node, connected to {self.addresses[rank]}) disconnected: "
                    f"its engine core or its node went away")
        return None

    def close(self) -> None:
        for _, sock, monitor in self._watched:
            sock.disable_monitor()
            monitor.close(linger=0)
        self._watched = []
