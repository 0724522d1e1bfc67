"""vLLM bench's --profile: `bench latency` records one batch after the warm-up, `bench serve` posts
the server's /start_profile and /stop_profile around the run (tests/server/test_profile.py runs it
against a server with a profiler); without a profiler both say so in one line."""
from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from deepserve.bench.serve import post_profile
from deepserve.cli.main import main
from tests.engine.test_profiler import annotations


def test_bench_latency_profiles_one_batch(tmp_path, capsys):
    config = ('{"profiler": "torch", "torch_profiler_dir": "%s", "torch_profiler_dump_cuda_time_total": false}'
              % tmp_path)
    assert main(["bench", "latency", "--profile", "--profiler-config", config, "--batch-size", "2", "--input-len", "4",
                 "--output-len", "2", "--num-iters-warmup", "1", "--disable-tqdm"]) == 0
    assert "Avg latency" not in capsys.readouterr().out   # profiled, not timed (vLLM's)
    (steps,) = annotations(tmp_path).values()
    assert steps == ["execute_context_2(8)_generation_0(0)", "execute_context_0(0)_generation_2(2)"]


def test_bench_profile_without_profiler_is_one_line(capsys):
    assert main(["bench", "throughput", "--profile", "--num-prompts", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("deepserve bench: error: --profile needs --profiler-config, e.g. "
                   "'{\"profiler\": \"torch\", \"torch_profiler_dir\": \"/abs/dir\"}'")


def test_post_profile_names_a_server_without_profiler():
    class NotFound(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/start_profile"
    try:
        with pytest.raises(ValueError, match="--profile needs a server started with --profiler-config"):
            asyncio.run(post_profile(url, 10.0))
    finally:
        server.shutdown()
        server.server_close()
