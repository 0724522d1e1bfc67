"""A real local Ray cluster for tests: `ray start --head` as the guides run it, stopped by
ending only the processes it started.

`ray stop` would end every Ray process of the user on the machine (another test's or
another user's cluster too). `ray start` makes itself a process-group leader and its
daemons (GCS, raylet, agents) and the raylet's worker processes stay in the session the
test opens for it, so the cluster is ended by that session id, read from /proc.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:   # ended meanwhile
            continue
        # fields after "(comm)": state ppid pgrp session ...
        if int(stat.rsplit(")", 1)[1].split()[3]) == sid:
            pids.append(int(entry.name))
    return pids


def process_titles(sid: int) -> list[str]:
    """The command lines of a session's processes (Ray names actor processes ray::Class)."""
    titles = []
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            titles.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
    return titles


def _end_session(sid: int, grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL what is left after `grace_s`: the cluster is the test's own, with
    nothing to save, and Ray's GCS server and log monitor take over 15 s to exit on SIGTERM."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return


class RayHead:
    """A started head: `sid` is its session (for `process_titles`), `address` host:port."""

    def __init__(self, sid: int, address: str):
        self.sid, self.address = sid, address

    def actors(self, name: str) -> list[str]:
        return [t for t in process_titles(self.sid) if t.startswith(f"ray::{name}")]


@contextlib.contextmanager
def local_ray_head(env: dict, num_cpus: int = 4, extra: Optional[list[str]] = None) -> Iterator[RayHead]:
    """`ray start --head --port=0` with `env` (the shell the guide exports into). Skips the test
    only when the `ray` package is absent; a head that does not start fails it."""
    pytest.importorskip("ray", reason="the Ray guide tests need the ray package (in the test extra)")
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    if ray_cli is None:
        pytest.skip("the ray package is installed but its `ray` command is not on PATH")
    env = dict(env, RAY_USAGE_STATS_ENABLED="0")
    # the guides' `ray start --head --port=6333`, on a free port; CPUs for every actor (one each)
    argv = [ray_cli, "start", "--head", "--port=0", f"--num-cpus={num_cpus}", "--include-dashboard=false",
            "--disable-usage-stats", *(extra or [])]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sid = proc.pid
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        _end_session(sid)
        raise
    if proc.returncode != 0:
        _end_session(sid)
        pytest.fail(f"ray start failed (exit {proc.returncode}): {out.strip()[-1000:]}", pytrace=False)
    address = next(line.split("'")[1] for line in out.splitlines() if "ray start --address=" in line)
    try:
        yield RayHead(sid, address)
    finally:
        _end_session(sid)
