"""Fixtures for the bench tests: the fake OpenAI endpoint (fake_openai.py) in a subprocess,
the bench sub-command parser, and benchmarks/ scripts imported as modules."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "deepseek-r1-distill-llama-8b"
SERVING = SHARED / "datasets" / "serving"
FAKE_SERVER = Path(__file__).resolve().parent / "fake_openai.py"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# the result JSON fields `vllm bench serve --save-result` writes with its default flags
EXPECTED_KEYS = {"date", "endpoint_type", "backend", "label", "model_id", "tokenizer_id", "num_prompts",
                 "request_rate", "burstiness", "max_concurrency", "duration", "completed", "failed",
                 "total_input_tokens", "total_output_tokens", "request_throughput", "request_goodput",
                 "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
                 "max_concurrent_requests", "rtfx", "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms",
                 "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                 "median_itl_ms", "std_itl_ms", "p99_itl_ms"}
# and with --save-detailed besides
DETAILED_KEYS = {"input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors"}


class FakeServer:
    """`with FakeServer(ttft=0.1, itl=0.02) as srv:` runs fake_openai.py; srv.url, srv.stats()."""

    def __init__(self, ttft=0.1, itl=0.02, status=200, usage=True, spec_metrics=False, root=None,
                 char_tokenizer=False, fail_after=None):
        self.argv = [sys.executable, str(FAKE_SERVER), "--ttft", str(ttft), "--itl", str(itl),
                     "--status", str(status)] + ([] if usage else ["--no-usage"]) + \
            (["--spec-metrics"] if spec_metrics else []) + (["--root", str(root)] if root else []) + \
            (["--char-tokenizer"] if char_tokenizer else []) + \
            ([] if fail_after is None else ["--fail-after", str(fail_after)])

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        port = self.proc.stdout.readline().strip()
        if not port.isdigit():
            self.proc.kill()
            raise RuntimeError(f"fake server did not start (printed {port!r})")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(5)

    def stats(self) -> dict:
        return httpx.get(self.url + "/_stats", trust_env=False).json()


@pytest.fixture
def fake_server():
    """Factory: `with fake_server(ttft=..., itl=...) as srv:`."""
    return FakeServer


def parse_bench(argv: list[str]) -> argparse.Namespace:
    """Parse `deepserve bench ...` flags with the real sub-command parser."""
    from deepserve.cli.bench import register

    parser = argparse.ArgumentParser(prog="deepserve")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


@pytest.fixture
def bench_args():
    return parse_bench


def benchmark_module(name: str):
    """benchmarks/<name>.py imported as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
