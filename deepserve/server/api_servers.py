"""`deepserve serve --api-server-count N` (N > 1): N API server processes in front of the same
engine cores, as vLLM's multi-API-server mode.

The launcher (the `deepserve serve` process) binds the listening socket, starts the engine
cores (engine/engine_core.py; it is their front end 0, which only sees them ready and stops
them) and starts N API server processes that inherit the socket, forked from the fork server
that started the cores (engine/executor.py: torch and the engine modules already imported, so
each API server imports only the HTTP side). The kernel hands each new
connection to whichever process accepts it first, so a busy process takes fewer. Each API
server is a whole OpenAI server (HTTP, tokenization, streaming, its own requests' placement
over the DP ranks) whose engine is a `DataParallelEngine` attached to the cores as front end
i (1..N): the cores send each request's outputs back to the API server that sent it.

/metrics: request counters and histograms summed over the API servers (prometheus_client's
multiprocess files, in a folder the launcher makes and removes; server/metrics.py), plus
`api_server_requests{api_server}`; the engine gauges are the cores' own. /health: 503 once
the cores are lost. The launcher watches the cores and the API servers: a core that dies is
told to every API server (their /health turns 503, they end their requests and exit), an API
server that dies stops the others; either way the launcher stops everything and exits 1
naming what died. SIGINT / SIGTERM end every API server gracefully (in-flight requests get an
error), then the cores, and exit 0.
"""
from __future__ import annotations

import logging
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Optional

from deepserve.config import EngineArgs, served_names
from deepserve.engine.dp_engine import DataParallelEngine
from deepserve.engine.engine_core import DPLayout
from deepserve.engine.executor import _in_environment, die_with_parent
from deepserve.engine.fork_server import process_context
from deepserve.log import for_spawned_processes
from deepserve.server.api_server import build_state, serve_app, set_up_logging
from deepserve.server.args import ServerArgs
from deepserve.server.stopping import stop_interruptibly

logger = logging.getLogger("deepserve")

STOP_GRACE_S = 15.0   # how long an API server may take to end its requests and exit


def listen_socket(host: str, port: int) -> socket.socket:
    """The socket every API server accepts on (bound and listening before any starts, so
    early connections wait in its backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)   # TCP_NODELAY: see bind_listen
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    return sock


def _api_server_main(index: int, sock: socket.socket, engine_args: EngineArgs, server: ServerArgs,
                     layout: DPLayout, gauges: list[dict], conn) -> None:
    """API server `index`: attach to the cores, serve on the inherited socket until a signal,
    a dead core (the launcher says so over `conn`) or a lost launcher."""
    die_with_parent()
    set_up_logging(server.log_level)
    try:
        engine = DataParallelEngine.attach(engine_args, layout, index, gauges)
        state = build_state(engine_args, server, engine=engine, api_server=index)
    except Exception as exc:  # noqa: BLE001 - reported to the launcher, which names this server
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)

    def watch_launcher() -> None:
        try:
            kind, reason = conn.recv()
        except (EOFError, OSError):
            kind, reason = "fatal", "the launcher exited"
        if kind == "fatal":
            engine.executor.failure = reason  # AsyncLLM.fatal_error: /health 503, then exit 1

    threading.Thread(target=watch_launcher, daemon=True, name="deepserve-launcher-watch").start()
    sys.exit(serve_app(state, server, sock=sock, on_ready=lambda url: conn.send(("ready", url)), log_stats=index == 1))


class _Stop(Exception):
    """SIGINT / SIGTERM reached the launcher."""


def run_api_servers(engine_args: EngineArgs, server: ServerArgs) -> int:
    """Serve with --api-server-count processes until a signal (0) or a failure (1)."""
    count = engine_args.api_server_count
    set_up_logging(server.log_level)
    sock = listen_socket(server.host, int(server.port))
    metrics_dir = tempfile.mkdtemp(prefix="deepserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by the API servers as they start
    servers: list = []
    conns: list = []
    cores: Optional[DataParallelEngine] = None

    def on_signal(signum, frame):
        raise _Stop()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failure = None
    try:
        with for_spawned_processes(server.log_level):  # the engine core processes log at this level too
            cores = DataParallelEngine(engine_args)
        cores.executor.log_failure = False   # _supervise returns a dead core's failure, printed below
        ctx = process_context()
        for i in range(1, count + 1):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_in_environment, name=f"deepserve-api-server{i}", daemon=True,
                            args=(dict(os.environ), _api_server_main, i, sock, engine_args, server, cores.layout,
                                  cores._gauges, there))
            p.start()
            there.close()
            servers.append(p)
            conns.append(here)
        failure = _supervise(cores, servers, conns, engine_args, count)
    except _Stop:
        pass
    finally:
        def stop() -> None:
            _stop_servers(servers, conns, failure, float(server.shutdown_timeout))
            if cores is not None:
                cores.shutdown()
        stop_interruptibly(stop)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failure:
        print(f"deepserve serve: error: {failure}; shut down", file=sys.stderr, flush=True)
        return 1
    return 0


def _supervise(cores: DataParallelEngine, servers: list, conns: list, engine_args: EngineArgs,
               count: int) -> Optional[str]:
    """Until a signal: announce the server once every API server listens, keep reading the
    cores' gauge messages (their queue to front end 0 must not fill), and return why serving
    must end when a core or an API server dies."""
    ready: dict[int, str] = {}
    while True:
        multiprocessing.connection.wait(conns + [p.sentinel for p in servers], timeout=0.2)
        if cores.executor.failure:
            return cores.executor.failure
        try:
            while cores._next(timeout_s=0.0) is not None:
                pass
        except RuntimeError as exc:
            return str(exc)
        for i, (p, conn) in enumerate(zip(servers, conns), start=1):
            error = None
            try:
                while conn.poll():
                    kind, value = conn.recv()
                    if kind == "ready":
                        ready[i] = value
                        if len(ready) == count:
                            print(f"deepserve: serving {', '.join(served_names(engine_args))} at {value}/v1 "
                                  f"({count} API server processes; Ctrl-C to stop)", flush=True)
                    elif kind == "error":
                        error = value
            except (EOFError, OSError):
                pass
            if error or p.exitcode is not None:
                why = error or f"exited with code {p.exitcode}"
                return f"API server {i} (pid {p.pid}) {'failed: ' if error else ''}{why}"


def _stop_servers(servers: list, conns: list, failure: Optional[str], drain: float = 0.0) -> None:
    """End every API server: told the cores are lost (`failure`), or SIGTERM (a graceful stop:
    in-flight requests get an error, after up to `drain` seconds to finish, --shutdown-timeout);
    killed if still running STOP_GRACE_S after that."""
    for p, conn in zip(servers, conns):
        if p.exitcode is not None:
            continue
        if failure:
            try:
                conn.send(("fatal", failure))
            except OSError:
                p.terminate()
        else:
            p.terminate()
    grace = STOP_GRACE_S + (0.0 if failure else drain)
    deadline = time.monotonic() + grace
    for p in servers:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            logger.warning("API server %s did not stop within %.0f s: killed", p.name, grace)
            p.kill()
            p.join(timeout=5)
    for conn in conns:
        conn.close()
