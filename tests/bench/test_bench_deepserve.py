"""bench serve against the real `deepserve` server on the built-in demo model (stories260k):
every dataset kind, a rate-limited and a concurrency-limited run, saved JSON with vLLM's keys."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import EXPECTED_KEYS, SERVING
from deepserve.bench.serve import run_serve

pytest.importorskip("deepserve.server.api_server", reason="the server is not in this build")

from deepserve.config import DEMO_MODEL  # noqa: E402

# stories260k ships no chat template; a plain one lets the chat endpoint run too
SERVER = ("from deepserve.server.api_server import run_server; from deepserve.config import EngineArgs; "
          "run_server(EngineArgs(), host='127.0.0.1', port=0, log_level='warning', "
          "chat_template=\"{% for m in messages %}{{ m['content'] }}{% endfor %}\")")


@pytest.fixture(scope="module")
def server_url():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"at (http://\S+/v1)", line)
        if not match:
            pytest.fail(f"deepserve server did not start: {line!r}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(20)


DATASETS = {
    "random": ["--random-input-len", "24", "--random-output-len", "6"],
    "sonnet": ["--dataset-path", str(SERVING / "sonnet.txt"), "--sonnet-input-len", "120",
               "--sonnet-prefix-len", "40", "--sonnet-output-len", "6"],
    "sharegpt": ["--dataset-path", str(SERVING / "ShareGPT_V3_unfiltered_cleaned_split.first500.json"),
                 "--sharegpt-output-len", "6"],
    "prefix-repetition": ["--prefix-repetition-prefix-len", "16", "--prefix-repetition-suffix-len", "8",
                          "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "6"],
}


def _argv(url, dataset, *extra):
    return ["serve", "--base-url", url, "--model", "stories260k", "--tokenizer", DEMO_MODEL,
            "--dataset-name", dataset, *DATASETS[dataset], "--num-prompts", "4", "--ignore-eos",
            "--disable-tqdm", *extra]


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_each_dataset_kind(server_url, bench_args, dataset):
    res = run_serve(bench_args(_argv(server_url, dataset, "--max-concurrency", "4")))
    assert res["failed"] == 0, res["errors"]
    assert res["output_lens"] == [6] * 4  # --ignore-eos: exactly the tokens asked for
    assert all(n > 0 for n in res["input_lens"]) and res["mean_ttft_ms"] > 0


def test_chat_endpoint(server_url, bench_args):
    res = run_serve(bench_args(_argv(server_url, "random", "--endpoint", "/v1/chat/completions")))
    assert res["failed"] == 0, res["errors"]
    assert res["output_lens"] == [6] * 4


@pytest.mark.parametrize("traffic", [["--request-rate", "8", "--burstiness", "0.5"], ["--max-concurrency", "2"]])
def test_limited_runs_save_json(server_url, bench_args, tmp_path, traffic):
    res = run_serve(bench_args(_argv(server_url, "random", *traffic, "--save-result", "--result-dir",
                                     str(tmp_path), "--result-filename", "out.json")))
    saved = json.loads((tmp_path / "out.json").read_text())
    assert EXPECTED_KEYS <= set(saved)
    assert saved["completed"] == 4 and saved["failed"] == 0 and saved["total_output_tokens"] == 24
    if "--max-concurrency" in traffic:
        assert saved["max_concurrency"] == 2 and res["max_concurrent_requests"] <= 2
    else:
        assert saved["request_rate"] == 8.0 and saved["burstiness"] == 0.5
