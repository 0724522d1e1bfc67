"""vLLM's development endpoints (VLLM_SERVER_DEV_MODE=1 only, as vLLM 0.26 routes them):
POST /reset_prefix_cache, GET /is_sleeping, GET /server_info; absent (404 with OpenAI's error
JSON) otherwise."""
from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from deepserve.config import EngineArgs
from deepserve.engine.llm_engine import LLMEngine
from deepserve.server.api_server import build_state
from deepserve.server.app import build_app
from deepserve.server.args import ServerArgs
from deepserve.server.metrics import parse_metrics

PROMPT = [1] + [403, 407, 261, 378] * 8   # 33 tokens: two full 16-token blocks to cache


@pytest.fixture(scope="module")
def engine_args():
    return EngineArgs(num_gpu_blocks_override=64)


def client(engine_args) -> TestClient:
    return TestClient(build_app(build_state(engine_args, ServerArgs(), engine=LLMEngine(engine_args))))


def test_dev_endpoints_absent_by_default(engine_args, monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    with client(engine_args) as c:
        for method, path in (("post", "/reset_prefix_cache"), ("get", "/is_sleeping"), ("get", "/server_info")):
            r = getattr(c, method)(path)
            assert r.status_code == 404 and "this server answers" in r.json()["error"]["message"], path
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "yes")
    with pytest.raises(ValueError, match="VLLM_SERVER_DEV_MODE must be 0 or 1"):
        ServerArgs()


def test_dev_endpoints_with_dev_mode(engine_args, monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    with client(engine_args) as c:
        def hits() -> float:
            values = parse_metrics(c.get("/metrics").text)
            return next(v for k, v in values.items() if k.startswith("vllm:prefix_cache_hits_total"))

        def complete() -> None:
            r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
            assert r.status_code == 200, r.text

        complete()
        complete()
        assert hits() == 32   # the second request found both full blocks
        values = parse_metrics(c.get("/metrics").text)
        assert values['vllm:prompt_tokens_cached_total{model_name="stories260k",engine="0"}'] == 32
        assert values['vllm:prompt_tokens_by_source_total{model_name="stories260k",engine="0",source="local_cache_hit"}'] == 32
        assert values['vllm:prompt_tokens_by_source_total{model_name="stories260k",engine="0",source="local_compute"}'] == 33 + 1
        r = c.post("/reset_prefix_cache")
        assert r.status_code == 200 and r.json() == {"success": True}
        complete()
        assert hits() == 32   # nothing cached any more
        r = c.post("/reset_prefix_cache?reset_external=true")
        assert r.status_code == 400 and r.json()["error"]["param"] == "reset_external"
        assert c.post("/reset_prefix_cache?reset_running_requests=maybe").status_code == 400
        assert c.post("/reset_prefix_cache?reset_running_requests=true").json() == {"success": True}
        assert c.get("/is_sleeping").json() == {"is_sleeping": False}
        info = c.get("/server_info?config_format=json").json()
        assert info["vllm_config"]["cache"]["block_size"] == 16 and info["vllm_config"]["cache"]["num_blocks"] == 64
        assert info["vllm_config"]["model"]["hf_config"]["architectures"] == ["LlamaForCausalLM"]   # config.json
        assert info["vllm_env"]["VLLM_SERVER_DEV_MODE"] == "1" and info["system_env"]["device"] == "cpu"
        assert "block_size=16" in c.get("/server_info").json()["vllm_config"]
        assert c.get("/server_info?config_format=yaml").status_code == 400


def test_model_card_has_vllm_s_fields(engine_args, monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    with client(engine_args) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert {"id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"} <= set(card)
        (perm,) = card["permission"]
        assert perm["object"] == "model_permission" and perm["id"].startswith("modelperm-")
        assert (perm["allow_sampling"], perm["allow_logprobs"], perm["organization"]) == (True, True, "*")
        assert c.get(f"/v1/models/{card['id']}").json()["permission"][0]["object"] == "model_permission"


def test_http_metrics_as_vllm_s_instrumentator(engine_args, monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    with client(engine_args) as c:
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True}) as r:
            assert r.status_code == 200 and "[DONE]" in "".join(r.iter_text())
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0}).status_code == 400
        assert c.get("/v1/embeddings").status_code == 404
        for path in ("/health", "/ping", "/version", "/load"):
            assert c.get(path).status_code == 200
        text = c.get("/metrics").text
    values = parse_metrics(text)
    assert values['http_requests_total{handler="/v1/completions",method="POST",status="2xx"}'] == 2
    assert values['http_requests_total{handler="/v1/completions",method="POST",status="4xx"}'] == 1
    assert values['http_requests_total{handler="none",method="GET",status="4xx"}'] == 1
    assert not [k for k in values if k.startswith("http_") and any(p in k for p in ("/health", "/ping", "/metrics"))]
    assert values['http_request_duration_seconds_count{handler="/v1/completions",method="POST"}'] == 3
    assert values["http_request_duration_highr_seconds_count"] == 4
    assert values['http_request_size_bytes_count{handler="/v1/completions"}'] == 3
    assert values['http_request_size_bytes_sum{handler="/v1/completions"}'] > 3 * 4 * len(PROMPT)   # the JSON bodies
    assert not [k for k in values if k.startswith(("vllm:http_requests", "deepserve:http_requests"))]


def test_dev_endpoint_waiting_on_a_dead_engine_is_a_503(engine_args, monkeypatch, caplog):
    """/reset_prefix_cache asked while a rank dies: the engine's death as the generation routes
    answer it (503, the death named), not an unhandled error with a traceback in the log."""
    from deepserve.engine.async_llm import EngineDeadError
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    with client(engine_args) as c:
        async def dead(*args):
            raise EngineDeadError("rank 1 (pid 7) on host vm exited with code -9")
        monkeypatch.setattr(c.app.state.deepserve.llm, "reset_prefix_cache", dead)
        r = c.post("/reset_prefix_cache?reset_running_requests=true")
    assert r.status_code == 503 and r.json()["error"]["message"] == "rank 1 (pid 7) on host vm exited with code -9"
    assert "unhandled error" not in caplog.text
