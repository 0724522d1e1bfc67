"""The engine core in a process of its own (DEEPSERVE_ENGINE_CORE_PROCESS=1, always so for
data parallel): the front end sends requests over ZeroMQ and rebuilds each request's output
from the core's deltas. Outputs equal the in-process engine's (text, tokens, n > 1, stop
strings, logprobs); behind the API server, killing the core turns /health to 503 and the
server exits naming it."""
import os
import signal
import time

import httpx

from deepserve import LLM, SamplingParams
from deepserve.engine.dp_engine import DataParallelEngine
from tests.conftest import DEMO_MODEL
from tests.server.conftest import launch
from tests.server.test_server_worker_death import _children

PARAMS = [SamplingParams(temperature=0, max_tokens=20, stop=[" Lily"]),
          SamplingParams(temperature=0.8, seed=5, max_tokens=12, n=2),
          SamplingParams(temperature=0, max_tokens=6, logprobs=2)]


def _outputs(llm):
    prompts = ["Once upon a time", "The little dog", "Tom saw a big"]
    return [[(c.text, c.token_ids, c.finish_reason, c.stop_reason,
              [sorted(d) for d in c.logprobs] if c.logprobs else None) for c in o.outputs]
            for o in llm.generate(prompts, PARAMS)]


def test_core_process_outputs_equal_in_process(monkeypatch):
    with LLM(str(DEMO_MODEL), block_size=4) as here:
        want = _outputs(here)
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), block_size=4) as apart:
        assert isinstance(apart.engine, DataParallelEngine) and apart.engine.dp_size == 1
        assert _outputs(apart) == want
        assert apart.engine.gauges()["num_free_blocks"] == apart.engine.gauges()["num_blocks"]
    assert any(c[2] == "stop" for o in want for c in o)


def test_server_with_core_process_fails_health_when_the_core_dies(monkeypatch):
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    server = launch("--block-size", "4", timeout=180)
    try:
        model = httpx.get(server.v1 + "/models").json()["data"][0]["id"]
        r = httpx.post(server.v1 + "/completions", json={"model": model, "prompt": [1], "max_tokens": 12,
                                                         "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["text"].startswith("Once upon a time")
        assert httpx.get(server.url + "/health").status_code == 200
        cores = [p for p in _children(server.proc.pid)
                 if "resource_tracker" not in open(f"/proc/{p}/cmdline").read()]
        assert len(cores) == 1, cores                 # the one engine core (TP=1: no other rank)
        os.kill(cores[0], signal.SIGKILL)
        start, saw_503 = time.monotonic(), False
        while server.proc.poll() is None and time.monotonic() - start < 30:
            try:
                saw_503 |= httpx.get(server.url + "/health", timeout=2).status_code == 503
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert server.proc.wait(timeout=30) == 1 and saw_503
        log = "".join(server.lines)
        assert "rank 0" in log and "exited with code -9" in log
    finally:
        server.stop()
