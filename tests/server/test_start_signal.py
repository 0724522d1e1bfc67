"""SIGTERM while `deepserve serve` is still starting (its ranks loading): every rank ends at
once, without waiting for the fork server they came from to exit (its exit ends them through
their parent-death signal, seconds later on a busy host; they ignore SIGTERM)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import DEMO_MODEL
from tests.server.conftest import REPO, server_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _fork_server_and_ranks(server: int, limit_s: float = 120.0) -> tuple[int, list[int]]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for child in _children(server):
            try:
                cmdline = open(f"/proc/{child}/cmdline").read()
            except FileNotFoundError:
                continue
            if "multiprocessing.forkserver" in cmdline and len(_children(child)) == 2:
                return child, _children(child)
        time.sleep(0.02)
    raise AssertionError("the server's two ranks did not start")


def test_sigterm_while_ranks_start_ends_every_rank(tmp_path):
    # the fork server and the ranks are held stopped, so that the start cannot finish and the
    # fork server cannot end them: only the server's own handling of the signal can
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deepserve", "serve", str(DEMO_MODEL), "--port", "0",
                                 "--tensor-parallel-size", "2", "--device", "cpu"], cwd=REPO, env=server_env(),
                                stdout=subprocess.DEVNULL, stderr=out, start_new_session=True)
    held: list[int] = []
    try:
        fork_server, ranks = _fork_server_and_ranks(proc.pid)
        held = [fork_server, *ranks]
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM, log.read_text()
        deadline = time.monotonic() + 20
        while any(map(_running, ranks)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, ranks)), f"ranks {ranks} outlived the server"
    finally:
        for pid in held:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
