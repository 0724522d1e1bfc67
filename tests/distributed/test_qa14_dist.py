"""Parallel layouts behind an engine core process, as `deepserve serve` runs them: what the
front end hears after a client goes away while the request's pipeline micro-batch is in flight,
and after a headless node's DP rank goes away (its requests fail naming it; none waits forever)."""
import os
import signal
import subprocess
import sys
import threading
import time

from deepserve import LLM, SamplingParams
from tests.conftest import DEMO_MODEL, REPO
from tests.engine.test_dp_multinode import free_ports


def test_pp2_abort_in_flight_reports_every_block_free(monkeypatch):
    """The abort frees the blocks at once, but the core still steps to drain the micro-batch;
    that step outputs nothing, so the core must send its gauges itself once it is idle."""
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), block_size=4, max_model_len=256, pipeline_parallel_size=2) as llm:
        engine = llm.engine
        engine.add_request("long", {"prompt": "Once upon a time"},
                           SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        deadline = time.monotonic() + 60
        while not any(o.outputs[0].token_ids for o in engine.step()):   # decoding: blocks held
            assert time.monotonic() < deadline
        assert engine.gauges()["num_free_blocks"] < engine.gauges()["num_blocks"]
        engine.abort_request("long")
        deadline = time.monotonic() + 10
        while engine.gauges()["num_free_blocks"] < engine.gauges()["num_blocks"] and time.monotonic() < deadline:
            engine.step()
        gauges = engine.gauges()
        assert gauges["num_free_blocks"] == gauges["num_blocks"]
        assert gauges["num_requests_running"] == 0


PEER = """
import sys, time, zmq
sock = zmq.Context().socket(zmq.PULL)
sock.connect(sys.argv[1])
print("connected", flush=True)
time.sleep(600)
"""


def _wait_lost(watch, limit_s: float):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        why = watch.lost()
        if why:
            return why
        time.sleep(0.05)
    return None


def test_remote_core_that_goes_away_is_named():
    """The front end's socket of a remote DP rank reports the peer's end (a process killed:
    its kernel closes the connection); a peer still connected is not reported."""
    import zmq

    from deepserve.distributed.peer_watch import RemoteCores
    ctx = zmq.Context()
    socks = {r: ctx.socket(zmq.PUSH) for r in (1, 2)}
    addrs = {}
    for r, sock in socks.items():
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        addrs[r] = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    watch = RemoteCores(socks, addrs)
    peers = {r: subprocess.Popen([sys.executable, "-c", PEER, addrs[r]], stdout=subprocess.PIPE, text=True)
             for r in socks}
    try:
        for p in peers.values():
            assert p.stdout.readline().strip() == "connected"
        assert _wait_lost(watch, 1.0) is None
        peers[2].kill()
        peers[2].wait()
        why = _wait_lost(watch, 20.0)
        assert why is not None and why.startswith("DP rank 2 ") and addrs[2] in why
        assert _wait_lost(watch, 0.5) is None                    # rank 1 is still there
    finally:
        for p in peers.values():
            p.kill()
            p.wait()
        watch.close()
        for sock in socks.values():
            sock.close()
        ctx.term()


def test_killed_headless_node_fails_requests_instead_of_hanging():
    """A headless node killed after joining: requests get an error naming the DP rank, where
    they waited forever for outputs of a core that was gone."""
    port = free_ports(4)
    headless = subprocess.Popen(
        [sys.executable, "-m", "deepserve", "serve", str(DEMO_MODEL), "--headless", "--data-parallel-size", "2",
         "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1", "--data-parallel-address",
         "127.0.0.1", "--data-parallel-rpc-port", str(port), "--block-size", "4", "--max-model-len", "64"],
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        with LLM(str(DEMO_MODEL), data_parallel_size=2, data_parallel_size_local=1, data_parallel_address="127.0.0.1",
                 data_parallel_rpc_port=port, block_size=4, max_model_len=64) as llm:
            os.killpg(headless.pid, signal.SIGKILL)   # the node: its API-less process and its core
            headless.wait()
            result = {}

            def generate():
                try:
                    llm.generate([{"prompt_token_ids": [1, 2 + i]} for i in range(4)],
                                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
                except RuntimeError as exc:
                    result["error"] = str(exc)
            thread = threading.Thread(target=generate, daemon=True)
            thread.start()
            thread.join(60)
            assert not thread.is_alive(), "requests on the dead node's DP rank never finished"
            assert "DP rank 1" in result.get("error", ""), result
    finally:
        if headless.poll() is None:
            os.killpg(headless.pid, signal.SIGKILL)
            headless.wait()


def _serve(*flags: str, env: dict = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepserve", "serve", str(DEMO_MODEL), "--block-size", "4",
                           "--max-model-len", "64", "-dp", "2", "--data-parallel-size-local", "1",
                           "--data-parallel-address", "127.0.0.1", *flags],
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})), capture_output=True,
                          text=True, timeout=120)


def test_rpc_port_range_in_use_is_one_line():
    """Node 0 listens on --data-parallel-rpc-port and the ports after it: one of them in use
    (here the API's own --port) is a one-line error naming the flag, before the engine starts."""
    for _ in range(3):   # another test may take a port of the range between the probe and the serve
        port = free_ports(6)
        out = _serve("--port", str(port + 2), "--data-parallel-rpc-port", str(port))
        assert out.returncode == 2, out.stderr[-2000:]
        lines = out.stderr.strip().splitlines()
        assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-2000:]
        assert f"--data-parallel-rpc-port {port}" in lines[0], lines[0]
        if f"127.0.0.1:{port + 2}" in lines[0]:
            return
    raise AssertionError(f"the error never named the API port: {lines[0]}")


def test_headless_node_without_a_front_end_fails_in_one_line():
    """No front end at the address within the join timeout: the node exits non-zero, its last
    line naming the address flags and the timeout's variable, no Python traceback."""
    port = free_ports(4)
    out = _serve("--headless", "--data-parallel-start-rank", "1", "--data-parallel-rpc-port", str(port),
                 env={"DEEPSERVE_DIST_TIMEOUT": "2"})
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("deepserve serve: error: "), out.stderr[-2000:]
    assert "DEEPSERVE_DIST_TIMEOUT" in last and f"--data-parallel-rpc-port {port}" in last, last
    assert "Traceback" not in out.stderr


FRONT_END = r"""
import sys
from deepserve import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(sys.argv[1], data_parallel_size=2, data_parallel_size_local=1, data_parallel_address="127.0.0.1",
              data_parallel_rpc_port=int(sys.argv[2]), block_size=4, max_model_len=64)
    llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=2))
    print("ready", flush=True)
    sys.stdin.read()
"""


def test_headless_node_ends_when_the_front_end_is_killed(tmp_path):
    """Node 0 killed (no stop sent): the headless node's core sees its connection end and the
    node exits non-zero in one line, where it stayed up for ever."""
    port = free_ports(4)
    (tmp_path / "front.py").write_text(FRONT_END)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    headless = subprocess.Popen(
        [sys.executable, "-m", "deepserve", "serve", str(DEMO_MODEL), "--headless", "--data-parallel-size", "2",
         "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1", "--data-parallel-address",
         "127.0.0.1", "--data-parallel-rpc-port", str(port), "--block-size", "4", "--max-model-len", "64"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    front = subprocess.Popen([sys.executable, str(tmp_path / "front.py"), str(DEMO_MODEL), str(port)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert front.stdout.readline().strip() == "ready"
        os.killpg(front.pid, signal.SIGKILL)   # its core and the fork server with it
        front.wait()
        assert headless.wait(timeout=60) == 2
        last = headless.stderr.read().strip().splitlines()[-1]
        assert "the front end at" in last and "went away" in last and "Traceback" not in last, last
    finally:
        for proc in (front, headless):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_requests_after_a_rank_died_get_the_engine_dead_error():
    """Between a rank's death and the server's exit, a new request is refused as the engine's
    death (a 503 naming the rank), not as the RuntimeError of the send to the dead rank (a 500)."""
    import asyncio

    import pytest

    from deepserve.config import EngineArgs
    from deepserve.engine.async_llm import AsyncLLM, EngineDeadError
    from deepserve.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineArgs(model=str(DEMO_MODEL), block_size=4, max_model_len=64))
    dead = "rank 1 (pid 4242) on host vm exited with code -9"

    def send_to_dead_rank(*args, **kwargs):
        engine.executor.failure = dead   # the process monitor saw it while the add was sent
        raise RuntimeError(dead)

    async def run(params):
        llm = AsyncLLM(engine)
        llm.start()
        try:
            async for _ in llm.generate({"prompt_token_ids": [1, 2]}, params, "r"):
                pass
        finally:
            llm.shutdown()

    engine.add_request = send_to_dead_rank
    with pytest.raises(EngineDeadError, match="exited with code -9"):
        asyncio.run(run(SamplingParams(max_tokens=2)))
    with pytest.raises(EngineDeadError, match="exited with code -9"):   # the failure known before the add
        asyncio.run(run(SamplingParams(max_tokens=2)))
