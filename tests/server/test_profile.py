"""`deepserve serve --profiler-config`: vLLM's POST /start_profile and /stop_profile, traces of every
rank (engine core and its TP peer) with vLLM's per-step annotations; the routes are absent
without a profiler, as in vLLM."""
from __future__ import annotations

import json
from types import SimpleNamespace

import httpx

from deepserve.server.metrics import ServerMetrics
from tests.engine.test_profiler import annotations
from tests.server.conftest import launch


def test_profile_routes_trace_every_rank(tmp_path):
    server = launch("-tp", "2", "--profiler-config",
                    json.dumps({"profiler": "torch", "torch_profiler_dir": str(tmp_path),
                                "torch_profiler_with_stack": False, "torch_profiler_dump_cuda_time_total": False}))
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
    finally:
        server.stop()
    assert sorted(name.split(".")[0] for name in traces) == ["dp0_pp0_tp0_rank0", "dp0_pp0_tp1_rank1"]
    for steps in traces.values():
        assert steps == ["execute_context_1(6)_generation_0(0)", "execute_context_0(0)_generation_1(1)",
                         "execute_context_0(0)_generation_1(1)",
                         "execute_context_1(3)_generation_0(0)", "execute_context_0(0)_generation_1(1)"]


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
