"""`deepserve serve --api-server-count 2`: two API server processes on one port in front of
one engine-core process. Many concurrent requests through the official `openai` client get
the greedy text of the engine itself (what --api-server-count 1 serves), both API servers
serve some, /metrics counts every request whichever process answers the scrape, and Ctrl-C
(SIGINT to the process group) ends every process."""
import asyncio
import os
import signal
import subprocess
import time

import httpx
import openai
import pytest

from deepserve import LLM, SamplingParams
from deepserve.config import EngineArgs
from deepserve.engine.llm_engine import engine_core_apart
from deepserve.server.metrics import parse_metrics
from tests.conftest import DEMO_MODEL
from tests.server.conftest import launch

PROMPTS = ["Once upon a time", "The little dog", "Tom saw a big", "Lily went to the park", "One day, a cat",
           "The sun was"]
NUM_REQUESTS, MAX_TOKENS = 32, 16


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for c in map(int, out) for d in [c, *_descendants(c)]]


def _alive(pids: list[int]) -> list[str]:
    alive = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().split(") ")[1][0] != "Z":
                    alive.append(open(f"/proc/{p}/cmdline").read())
        except FileNotFoundError:
            pass
    return alive


async def _complete_all(base_url: str, model: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    try:
        rs = await asyncio.gather(*[
            client.completions.create(model=model, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=MAX_TOKENS,
                                      temperature=0) for i in range(NUM_REQUESTS)])
    finally:
        await client.close()
    return [r.choices[0].text for r in rs]


def test_two_api_servers_answer_like_one_engine_and_share_the_requests():
    with LLM(str(DEMO_MODEL), block_size=4) as llm:
        want = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))]
    server = launch("--api-server-count", "2", "--block-size", "4", timeout=240)
    try:
        assert "2 API server processes" in "".join(server.lines)

        def served(m) -> list:
            return [m.get(f'deepserve:api_server_requests_total{{model_name="stories260k",api_server="{i}"}}', 0)
                    for i in (1, 2)]

        # the kernel hands the shared socket's connections to whichever API server accepts first:
        # on a loaded machine one burst can go to one of them, so bursts go on (at most 4) until
        # both have served
        sent = 0
        for _ in range(4):
            got = asyncio.run(_complete_all(server.v1, "stories260k"))
            assert got == [want[i % len(PROMPTS)] for i in range(NUM_REQUESTS)]
            sent += NUM_REQUESTS
            if all(n > 0 for n in served(parse_metrics(httpx.get(server.url + "/metrics").text))):
                break
        # the core's counters reach an API server with its own requests' outputs and, once the core
        # goes idle, every API server (engine_core.EngineCore): the other one may read its last step
        # a moment after the last response
        tokens = 'deepserve:generation_tokens_total{model_name="stories260k",engine="0"}'
        deadline = time.monotonic() + 5
        while (any(parse_metrics(httpx.get(server.url + "/metrics").text)[tokens] != sent * MAX_TOKENS
                   for _ in range(4)) and time.monotonic() < deadline):
            time.sleep(0.05)
        for _ in range(4):  # whichever API server answers, the request metrics cover both
            m = parse_metrics(httpx.get(server.url + "/metrics").text)
            assert all(n > 0 for n in served(m)) and sum(served(m)) == sent, served(m)
            assert m['vllm:request_success_total{model_name="stories260k",engine="0",finished_reason="length"}'] == sent
            assert m['deepserve:generation_tokens_total{model_name="stories260k",engine="0"}'] == sent * MAX_TOKENS
            assert m['deepserve:num_requests_running{model_name="stories260k",engine="0"}'] == 0
            assert httpx.get(server.url + "/health").status_code == 200
        procs = _descendants(server.proc.pid)
        assert len(procs) >= 3     # the engine core and the two API servers (and multiprocessing's tracker)
        start = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGINT)   # Ctrl-C in a terminal: every process of the group
        assert server.proc.wait(timeout=60) == 0
        assert time.monotonic() - start < 30
        deadline = time.monotonic() + 10
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(procs) == []
    finally:
        server.stop()


def test_api_server_count_is_checked_and_moves_the_core_out(monkeypatch):
    with pytest.raises(ValueError, match=r"--api-server-count \(api_server_count\) must be >= 1, got 0"):
        EngineArgs(api_server_count=0)
    with pytest.raises(ValueError, match="Ray backend"):
        EngineArgs(api_server_count=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="option of `deepserve serve`"):
        LLM(str(DEMO_MODEL), api_server_count=2)
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "0")   # asks for the engine in-process...
    assert engine_core_apart(EngineArgs(api_server_count=2), default=False)   # ...but N > 1 fronts a core
    assert not engine_core_apart(EngineArgs(), default=True)
    monkeypatch.delenv("DEEPSERVE_ENGINE_CORE_PROCESS")
    assert engine_core_apart(EngineArgs(), default=True) and not engine_core_apart(EngineArgs(), default=False)
    assert not engine_core_apart(EngineArgs(distributed_executor_backend="ray"), default=True)
    # DP over Ray: each DP rank's engine core in a Ray actor, behind a front end here
    assert engine_core_apart(EngineArgs(data_parallel_size=2, distributed_executor_backend="ray"), default=False)
    with pytest.raises(ValueError, match="Ray places every DP rank"):
        EngineArgs(data_parallel_size=2, data_parallel_size_local=1, data_parallel_address="10.0.0.1",
                   distributed_executor_backend="ray")


def test_engine_cores_behind_several_api_servers_log_at_the_server_level(monkeypatch):
    """The engine cores that --api-server-count N starts get DEEPSERVE_LOG_LEVEL (deepserve/log.py)
    as under one API server, so their start-up lines (weights, KV pool, --ops-profile) show."""
    from deepserve.log import ENV
    from deepserve.server import api_servers
    from deepserve.server.args import ServerArgs

    seen = {}

    class Cores:
        def __init__(self, args):
            seen["level"] = os.environ.get(ENV)
            raise RuntimeError("cores not started in this test")

    monkeypatch.setattr(api_servers, "DataParallelEngine", Cores)
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(RuntimeError, match="cores not started"):
        api_servers.run_api_servers(EngineArgs(api_server_count=2), ServerArgs(port=0, log_level="debug"))
    assert seen == {"level": "debug"} and ENV not in os.environ
