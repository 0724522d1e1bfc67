"""Imported by the engine's fork server alone (first in fork_server.FORK_SERVER_PRELOAD): the fork
server, and every engine-core and worker process it forks, ignore SIGTERM.

A SIGTERM sent to a server's whole process group (`kill -- -PGID`, a systemd stop, a benchmark
script stopping the server) then reaches only the front end, which stops the engine the
graceful way (in-flight requests get their error, workers their stop message). Without this the
fork server died of it at once, and its children with it (their parent-death signal), so the
front end saw engine processes gone with no exit status. They still end with the front end
however it ends: on its stop message, or when the fork server exits (its keep-alive pipe from the
front end closes, then the children's parent-death signal).
"""
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
