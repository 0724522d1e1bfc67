"""One-command deployments: a FlagScale-style YAML file with CLI overrides, a full queue
answered with 503 + Retry-After, SIGTERM under load and Ctrl-C (once or twice) ending the
process cleanly."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import launch

from deepserve.server.metrics import parse_metrics

YAML = """\
- serve_id: demo
  engine: vllm
  engine_args:
    served_model_name: from-yaml
    max_num_seqs: 1
    max_waiting_requests: 1
    num_gpu_blocks_override: 256
    trust_remote_code: true
    api_key: yaml-key
  envs:
    DEEPSERVE_OPS: torch
"""


@pytest.fixture(scope="module")
def yaml_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "demo.yaml"
    path.write_text(YAML)
    server = launch(str(path), "--served-model-name", "from-cli")
    yield server
    server.stop()


def test_yaml_config_with_cli_override(yaml_server):
    headers = {"Authorization": "Bearer yaml-key"}
    models = httpx.get(yaml_server.v1 + "/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["from-cli"]               # the flag won
    assert httpx.get(yaml_server.v1 + "/models").status_code == 401        # api_key from the file
    metrics = parse_metrics(httpx.get(yaml_server.url + "/metrics").text)
    assert metrics['deepserve:num_kv_blocks{model_name="from-cli",engine="0"}'] == 256  # engine arg from the file
    assert metrics['deepserve:kv_cache_capacity_tokens{model_name="from-cli",engine="0"}'] == 256 * 16   # 16-token blocks


def test_queue_full_is_503_with_retry_after(yaml_server):
    # one running slot and one waiting slot: of 8 simultaneous long requests some must be refused
    body = {"model": "from-cli", "prompt": "Once upon a time", "max_tokens": 150, "ignore_eos": True}
    barrier = threading.Barrier(8)
    responses: list[httpx.Response] = []

    def send() -> None:
        barrier.wait()
        responses.append(httpx.post(yaml_server.v1 + "/completions", json=body, timeout=120,
                                    headers={"Authorization": "Bearer yaml-key"}))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(refused) == 8 and len(ok) >= 1 and len(refused) >= 1
    assert all(r.json()["usage"]["completion_tokens"] == 150 for r in ok)
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == 503 and "queue is full" in r.json()["error"]["message"]
    # and the server goes on serving
    again = httpx.post(yaml_server.v1 + "/completions", headers={"Authorization": "Bearer yaml-key"},
                       json={**body, "max_tokens": 3}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":   # session id (field 6 of stat), not a zombie
                members.append(int(entry))
    return members


def _no_member_left(sid: int) -> None:
    """No child process left behind (multiprocessing's resource tracker and fork server, which
    started the engine core, end on their own once the server has gone: give them a moment). A
    zombie has ended; it waits only for whoever adopted it (init, or a subreaper) to reap it."""
    deadline = time.monotonic() + 5
    while _session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session_members(sid) == []


def test_sigterm_under_load_exits_cleanly():
    server = launch("--num-gpu-blocks-override", "512")
    outcomes: list[str] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
                last = ""
                for i, line in enumerate(r.iter_lines()):
                    if i == 0:
                        started.release()
                    if line:
                        last = line
                outcomes.append("error" if '"error"' in last or last == "data: [DONE]" else "cut")
        except httpx.HTTPError:
            outcomes.append("closed")

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=60)
    pid = server.proc.pid
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=15)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(10)
    assert code == 0
    assert elapsed < 5, f"took {elapsed:.1f} s to exit"
    assert len(outcomes) == 8 and all(o in ("error", "closed") for o in outcomes), outcomes
    _no_member_left(pid)


def test_sigterm_to_the_process_group_stops_the_engine_gracefully():
    """`kill -- -PGID` (a systemd stop, a benchmark script's stop) also reaches the fork server
    and the engine-core process: they ignore it, and the front end's stop ends them, with no
    engine process reported lost."""
    server = launch("--log-level", "info")
    r = httpx.post(server.v1 + "/completions", json={"prompt": "Once upon a time", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200
    pid = server.proc.pid
    os.killpg(pid, signal.SIGTERM)
    code = server.proc.wait(timeout=30)
    log = "".join(server.lines)
    assert code == 0, log[-2000:]
    assert "exited with code" not in log and " ERROR " not in log, log[-2000:]
    _no_member_left(pid)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_exits_cleanly(presses):
    """Ctrl-C reaches the whole process group (the API server and its engine-core process).
    Pressed twice (or `timeout -s INT`, which signals the process and then its group), the
    second one lands while uvicorn drains, which made it skip the app's shutdown and print a
    lifespan CancelledError traceback."""
    server = launch()
    r = httpx.post(server.v1 + "/completions", json={"prompt": "Once upon a time", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200
    before = len(server.lines)
    t0 = time.monotonic()
    for i in range(presses):
        if i:
            time.sleep(0.05)
        os.killpg(server.proc.pid, signal.SIGINT)
    code = server.proc.wait(timeout=30)
    elapsed = time.monotonic() - t0
    time.sleep(0.2)  # the output reader thread catches up
    after = "".join(server.lines[before:])
    assert code == 0, after
    assert "Traceback" not in after and "CancelledError" not in after, after
    assert elapsed < 10, f"took {elapsed:.1f} s to exit"
    _no_member_left(server.proc.pid)


@pytest.mark.parametrize("second_signal", ["during_drain", "during_app_shutdown"])
def test_lifespan_shutdown_runs_once(monkeypatch, second_signal):
    """The app's lifespan shutdown (which stops the engine) runs exactly once: by deepserve
    when a second Ctrl-C during the drain made uvicorn skip it, by uvicorn when the signal
    came while uvicorn was running it."""
    import asyncio

    import uvicorn

    from deepserve.server.api_server import _Server

    class Lifespan:
        def __init__(self):
            self.shutdown_event, self.runs = asyncio.Event(), 0

        async def shutdown(self):
            self.runs += 1
            if second_signal == "during_app_shutdown":
                server.force_exit = True
            self.shutdown_event.set()

    async def uvicorn_shutdown(self, sockets=None):      # uvicorn's ending, connections aside
        if second_signal == "during_drain":
            self.force_exit = True
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def run():
        server.lifespan = Lifespan()
        await server.shutdown()
        return server.lifespan.runs

    monkeypatch.setattr(uvicorn.Server, "shutdown", uvicorn_shutdown)
    server = object.__new__(_Server)
    server.force_exit = False
    assert asyncio.run(run()) == 1
