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


def test_dead_worker_fails_health_and_exits():
    server = launch("--tensor-parallel-size", "2", "--block-size", "4", timeout=180)
    try:
        model = httpx.get(server.v1 + "/models").json()["data"][0]["id"]
        r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": [1], "max_tokens": 12,
                                                         "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"].startswith("Once upon a time")  # TP=2 serves correctly
        assert httpx.get(server.url + "/health").status_code == 200
        # the worker is the spawned python child that is not multiprocessing's resource tracker
        workers = [p for p in _children(server.proc.pid)
                   if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
        assert workers, "no worker process found"
        os.kill(workers[0], signal.SIGKILL)
        start = time.monotonic()
        saw_503 = False
        while server.proc.poll() is None and time.monotonic() - start < 30:
            try:
                saw_503 |= httpx.get(server.url + "/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert server.proc.wait(timeout=30) == 1
        assert time.monotonic() - start < 30
        log = "".join(server.lines)
        assert "worker rank 1" in log and "exited with code -9" in log
        assert saw_503
    finally:
        server.stop()

