"""`deepserve serve --profiler-config`: vLLM's POST /start_profile and /stop_profile, traces of every
rank (engine core and its TP peer) with vLLM's per-step annotations and of the API server process;
the routes are absent without a profiler, as in vLLM."""
from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import httpx

from deepserve.server.metrics import ServerMetrics
from deepserve.cli.main import main
from deepserve.config import DEMO_MODEL
from tests.engine.test_profiler import annotations
from tests.server.conftest import launch


def test_profile_routes_trace_every_rank(tmp_path):
    server = launch("-tp", "2", "--profiler-config",
                    json.dumps({"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                                "torch_profiler_dump_cuda_time_total": False}))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post("/stop_profile").status_code == 200   # nothing started: harmless
            r = http.post("/start_profile")
            assert (r.status_code, r.content) == (200, b"")
            for prompt, max_tokens in ((list(range(5, 11)), 3), (list(range(30, 33)), 2)):
                r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                       "temperature": 0, "ignore_eos": True})
                assert r.json()["usage"]["completion_tokens"] == max_tokens, r.text
            assert not annotations(tmp_path)   # written by the stop, which returns once they are
            r = http.post("/stop_profile")
            assert (r.status_code, r.content) == (200, b"")
            traces = annotations(tmp_path)
        # vLLM bench serve's --profile, against the same server
        assert main(["bench", "serve", "--profile", "--base-url", server.url, "--num-prompts", "2", "--random-input-len",
                     "4", "--random-output-len", "2", "--max-concurrency", "1", "--ignore-eos", "--disable-tqdm",
                     "--tokenizer", DEMO_MODEL]) == 0
        bench_traces = {name: steps for name, steps in annotations(tmp_path).items() if name not in traces}
    finally:
        server.stop()
    frontend = [name for name in traces if ".async_llm." in name]   # vLLM's AsyncLLM trace: the API server's
    assert len(frontend) == 1 and traces.pop(frontend[0]) == []
    with gzip.open(tmp_path / frontend[0], "rt") as f:   # the requests' handling in the API server process
        calls = {e["name"] for e in json.load(f)["traceEvents"] if e.get("cat") == "python_function"}
    assert any("serving_completions.py" in name for name in calls), sorted(calls)[:20]
    assert sorted(name.split(".")[0] for name in traces) == ["dp0_pp0_tp0_rank0", "dp0_pp0_tp1_rank1"]
    for steps in traces.values():
        assert steps == ["execute_context_1(6)_generation_0(0)", "execute_context_0(0)_generation_1(1)",
                         "execute_context_0(0)_generation_1(1)",
                         "execute_context_1(3)_generation_0(0)", "execute_context_0(0)_generation_1(1)"]
    # the bench run: both ranks and the API server again; two requests of a prompt and a decode each
    assert len(bench_traces) == 3, bench_traces
    for name, steps in bench_traces.items():
        if ".async_llm." not in name:
            assert [s.split("(")[0] for s in steps] == ["execute_context_1", "execute_context_0"] * 2, steps


def test_profile_routes_absent_without_profiler():
    from starlette.testclient import TestClient

    from deepserve.server.app import build_app
    from deepserve.server.serving_common import ServerSettings, ServerState

    llm = SimpleNamespace(tokenizer=None, max_model_len=512, profiler_config=None)
    state = ServerState(llm=llm, settings=ServerSettings(served_model_names=["m"], model_path="m"),
                        metrics=ServerMetrics("m", dict))
    client = TestClient(build_app(state))   # outside `with`: no engine starts
    for route in ("/start_profile", "/stop_profile"):
        r = client.post(route)
        assert r.status_code == 404 and "this server answers" in r.json()["error"]["message"], r.text
