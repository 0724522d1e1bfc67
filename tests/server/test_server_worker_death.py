"""A server with worker processes (TP=2 on CPU): killing a worker turns /health to 503 and
the server exits with a message naming the rank, within the bound."""
import os
import signal
import subprocess
import time

import httpx

from tests.server.conftest import launch


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _started(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(") ", 1)[1].split()[19])   # starttime, in clock ticks since boot


def spawned_children(server) -> list[int]:
    """The processes the server started, oldest first: its python children, where its fork
    server stands for the processes forked from it (multiprocessing's resource tracker left out)."""
    found = []
    for p in _children(server.proc.pid):
        cmdline = open(f"/proc/{p}/cmdline").read()
        if "multiprocessing.forkserver" in cmdline:
            found += _children(p)
        elif "resource_tracker" not in cmdline:
            found.append(p)
    return sorted(found, key=_started)


def kill_and_see_it_named(server, pid: int, name: str, limit_s: float = 30.0) -> None:
    """SIGKILL `pid`: /health turns 503, the server exits 1 within `limit_s` and its log names
    `name` and the signal."""
    os.kill(pid, signal.SIGKILL)
    start, saw_503 = time.monotonic(), False
    while server.proc.poll() is None and time.monotonic() - start < limit_s:
        try:
            saw_503 |= httpx.get(server.url + "/health", timeout=2).status_code == 503
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    assert server.proc.wait(timeout=limit_s) == 1
    assert time.monotonic() - start < limit_s
    log = "".join(server.lines)
    assert name in log and "exited with code -9" in log
    assert saw_503


def test_dead_worker_fails_health_and_exits():
    server = launch("--tensor-parallel-size", "2", "--block-size", "4", timeout=180)
    try:
        model = httpx.get(server.v1 + "/models").json()["data"][0]["id"]
        r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": [1], "max_tokens": 12,
                                                         "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"].startswith("Once upon a time")  # TP=2 serves correctly
        assert httpx.get(server.url + "/health").status_code == 200
        ranks = spawned_children(server)   # rank 0 too: the engine core runs apart from the API server
        assert len(ranks) == 2, ranks
        kill_and_see_it_named(server, ranks[-1], "rank 1 (pid")   # rank 1 started last
    finally:
        server.stop()
