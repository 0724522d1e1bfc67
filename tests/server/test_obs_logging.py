"""vLLM's logging options on `deepserve serve`: --enable-log-requests / --disable-log-requests,
--enable-log-outputs, --max-log-len, --disable-log-stats, --uvicorn-log-level (flags and YAML
keys), the request log lines and the periodic stats line."""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
import subprocess
import sys
import threading
import time

import openai
import pytest

from deepserve.server.args import ServerArgs
from deepserve.server.request_log import RequestLogger, StatsLogger, stats_interval
from tests.server.conftest import READY, REPO, server_env


def serve_args(*argv: str):
    from deepserve.cli.serve import register, resolve

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return resolve(parser.parse_args(["serve", *argv]))[1]


def test_logging_flags_and_yaml_keys(tmp_path):
    server = serve_args("some/model", "--enable-log-requests", "--enable-log-outputs", "--max-log-len", "40",
                        "--disable-log-stats", "--uvicorn-log-level", "trace", "--disable-uvicorn-access-log")
    assert (server.enable_log_requests, server.enable_log_outputs, server.max_log_len) == (True, True, 40)
    assert (server.disable_log_stats, server.uvicorn_log_level) == (True, "trace")
    assert serve_args("some/model", "--disable-log-requests").enable_log_requests is False
    # a deployment file's vLLM keys are read, not ignored
    path = tmp_path / "d.yaml"
    path.write_text("engine_args:\n  model: m\n  disable_log_stats: true\n  enable_log_requests: true\n"
                    "  uvicorn_log_level: warning\n")
    server = serve_args(str(path))
    assert (server.disable_log_stats, server.enable_log_requests, server.uvicorn_log_level) == (True, True, "warning")
    with pytest.raises(ValueError, match="--enable-log-outputs needs --enable-log-requests"):
        ServerArgs(enable_log_outputs=True)
    with pytest.raises(ValueError, match="contradict"):
        ServerArgs(enable_log_requests=True, disable_log_requests=True)
    with pytest.raises(ValueError, match="--uvicorn-log-level must be one of"):
        ServerArgs(uvicorn_log_level="loud")
    with pytest.raises(ValueError, match="max_log_len must be >= 0"):
        ServerArgs(max_log_len=-1)


class _Sample:
    def __init__(self, index, text, ids):
        self.index, self.text, self.token_ids, self.finish_reason = index, text, ids, "length"


class _Out:
    def __init__(self, samples):
        self.outputs = samples


def test_request_lines_cut_to_max_log_len_and_a_close_reaches_the_engine(caplog):
    closed = []

    async def outputs():
        try:
            yield _Out([_Sample(0, "abc", [1]), _Sample(1, "xyz", [2])])
            yield _Out([_Sample(0, "abcdefgh", [1, 2, 3, 4, 5]), _Sample(1, "xyzuvw", [2, 3])])
        finally:
            closed.append(True)

    log = RequestLogger(max_log_len=4, log_outputs=True)
    prompt = {"prompt": "Once upon a time", "prompt_token_ids": [1, 2, 3, 4, 5, 6]}

    async def main():
        async for _ in log.logged(outputs(), "r1", prompt, "PARAMS"):
            pass
        gen = log.logged(outputs(), "r2", prompt, "PARAMS")
        await gen.__anext__()
        await gen.aclose()   # the client left: AsyncLLM.generate's own close aborts the request

    with caplog.at_level(logging.DEBUG, logger="deepserve"):
        asyncio.run(main())
    text = caplog.text
    assert "Received request r1: params: PARAMS." in text
    assert "Request r1 details: prompt: 'Once', prompt_token_ids: [1, 2, 3, 4]." in text
    assert "Generated response r1 (sample 0): output: 'abcd', output_token_ids: [1, 2, 3, 4], finish_reason: length" in text
    assert "Generated response r1 (sample 1): output: 'xyzu'" in text
    assert "Generated response r2" not in text
    assert closed == [True, True]


def test_stats_line_throughput_and_idle_at_debug(caplog, monkeypatch):
    snap = {"prompt_tokens": 100, "generation_tokens": 50, "prefix_cache_queries": 0, "prefix_cache_hits": 0}
    stats = StatsLogger(lambda: snap, num_engines=1)
    t0 = stats.last_time
    snap.update(prompt_tokens=300, generation_tokens=90, num_requests_running=3, num_requests_waiting=1,
                kv_cache_usage=0.25, prefix_cache_queries=40, prefix_cache_hits=10, num_preemptions=2)
    with caplog.at_level(logging.DEBUG, logger="deepserve"):
        line = stats.log(now=t0 + 10)
        assert line == ("Engine 000: Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 4.0 tokens/s, "
                        "Running: 3 reqs, Waiting: 1 reqs, Preemptions: 2, GPU KV cache usage: 25.0%, "
                        "Prefix cache hit rate: 25.0%")
        assert caplog.records[-1].levelno == logging.INFO
        stats.log(now=t0 + 20)   # nothing new: INFO once more (the last interval worked), then DEBUG
        assert caplog.records[-1].levelno == logging.INFO and "Avg prompt throughput: 0.0" in caplog.records[-1].message
        stats.log(now=t0 + 30)
        assert caplog.records[-1].levelno == logging.DEBUG
    assert StatsLogger(lambda: {}, num_engines=2).log().startswith("2 Engines Aggregated: ")
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "2.5")
    assert stats_interval() == 2.5
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "0")
    assert stats_interval() == 10.0   # vLLM's reading: not above 0 is the default
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="VLLM_LOG_STATS_INTERVAL must be a number"):
        ServerArgs()   # before the model loads
    ServerArgs(disable_log_stats=True)


def test_stats_line_with_several_api_servers():
    """One of the API server processes writes the stats line (each sees every core's counters)."""
    env = {**server_env(), "VLLM_LOG_STATS_INTERVAL": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "deepserve", "serve", "--port", "0", "--api-server-count", "2",
                             "--num-gpu-blocks-override", "64"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(READY.search(line) for line in lines):
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        url = next(READY.search(line).group(1) for line in lines if READY.search(line))
        openai.OpenAI(base_url=url + "/v1", api_key="x").completions.create(
            model="stories260k", prompt="Once upon a time", max_tokens=8)
        deadline = time.monotonic() + 30
        stats = []
        while time.monotonic() < deadline and not stats:
            stats = [line for line in lines if re.search(r"Engine 000: Avg prompt throughput: [1-9]", line)]
            time.sleep(0.1)
        assert stats, "".join(lines)[-3000:]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_start_up_log_gives_vllm_s_kv_cache_size(caplog, kv_dtype):
    from deepserve.config import EngineArgs
    from deepserve.engine.llm_engine import LLMEngine

    with caplog.at_level(logging.INFO, logger="deepserve"):
        engine = LLMEngine(EngineArgs(dtype="bfloat16", kv_cache_dtype=kv_dtype, kv_cache_memory_bytes=1 << 22))
    blocks, size, max_len = engine.runner.num_blocks, engine.runner.block_size, engine.max_model_len
    engine.shutdown()
    assert max_len % size == 0   # whole blocks: vLLM's size is then the pool's tokens
    assert f"GPU KV cache size: {blocks * size:,} tokens" in caplog.text
    assert f"Maximum concurrency for {max_len:,} tokens per request: {blocks * size / max_len:.2f}x" in caplog.text
    assert f"{blocks} KV blocks of {size} tokens ({blocks * size} tokens in" in caplog.text


def test_kv_cache_size_lines_once_an_engine_with_tensor_parallel():
    """vLLM's engine core writes its two KV cache lines once; the TP ranks' pools are one size,
    so a TP=2 engine writes them once too (not once a rank)."""
    env = {**server_env(), "DEEPSERVE_LOG_LEVEL": "INFO"}
    out = subprocess.run([sys.executable, "-m", "deepserve", "generate", "--tensor-parallel-size", "2",
                          "--num-gpu-blocks-override", "64", "--prompt", "Once", "--max-tokens", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.count("GPU KV cache size: 1,024 tokens") == 1, out.stderr[-2000:]
    assert out.stderr.count("Maximum concurrency for 512 tokens per request: 2.00x") == 1
    assert out.stderr.count("64 KV blocks of 16 tokens") == 2   # the per-rank line stays one a rank


def _serve_at_info(*flags: str):
    proc = subprocess.Popen([sys.executable, "-m", "deepserve", "serve", "--port", "0", "--num-gpu-blocks-override",
                             "64", *flags], cwd=REPO, env=server_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def test_uvicorn_access_log_as_vllm():
    """An access line per HTTP request on stdout (uvicorn's, as vLLM's server writes it) unless
    --disable-uvicorn-access-log; --disable-access-log-for-endpoints leaves out those paths."""
    import httpx

    servers = [_serve_at_info("--disable-access-log-for-endpoints", "/health, /metrics"),
               _serve_at_info("--disable-uvicorn-access-log")]
    try:
        urls = []
        for proc, lines in servers:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(READY.search(line) for line in lines):
                assert proc.poll() is None, "".join(lines)
                time.sleep(0.1)
            urls.append(next(READY.search(line).group(1) for line in lines if READY.search(line)))
        for url in urls:
            assert httpx.get(url + "/v1/models").status_code == 200
            assert httpx.get(url + "/health?probe=1").status_code == 200
            assert httpx.get(url + "/metrics").status_code == 200
            assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "a"}).status_code == 404
        time.sleep(0.5)
        (_, logged), (_, quiet) = servers
        access = [line for line in logged if " HTTP/1.1" in line]
        assert any(re.match(r'INFO: +127\.0\.0\.1:\d+ - "GET /v1/models HTTP/1\.1" 200 OK$', line) for line in access)
        assert any('"POST /v1/completions HTTP/1.1" 404 Not Found' in line for line in access), access
        assert not any("/health" in line or "/metrics" in line for line in access), access
        assert not [line for line in quiet if " HTTP/1.1" in line]
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(30)


def test_access_log_filter_matches_paths_without_query():
    from deepserve.server.api_server import AccessLogFilter

    f = AccessLogFilter("/health, /metrics,")

    def record(path):
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:1", "GET", path, "1.1", 200), None)

    assert not f.filter(record("/health")) and not f.filter(record("/metrics?x=1"))
    assert f.filter(record("/v1/models")) and f.filter(record("/healthz"))
    assert AccessLogFilter("").filter(record("/health"))
