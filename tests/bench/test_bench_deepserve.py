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
        # vLLM's max_concurrent_requests counts the requests active in one second, not at once
        assert saved["max_concurrency"] == 2 and 1 <= res["max_concurrent_requests"] <= 4
    else:
        assert saved["request_rate"] == 8.0 and saved["burstiness"] == 0.5


def _send_all(inputs, kind: str, monkeypatch):
    """send_request for each input, 4 at a time, on the client `kind` (auto: the bench's
    HTTP/1.1 one); also how many connections the HTTP/1.1 client opened."""
    import asyncio

    from deepserve.bench.client import send_request
    from deepserve.bench.http1 import Http1Client
    from deepserve.bench.serve import open_client

    monkeypatch.setenv("DEEPSERVE_BENCH_CLIENT", kind)

    async def go():
        async with open_client(inputs[0].api_url, 30.0) as client:
            outs = []
            for i in range(0, len(inputs), 4):
                outs += await asyncio.gather(*(send_request(client, r) for r in inputs[i:i + 4]))
            return outs, len(client._all) if isinstance(client, Http1Client) else None
    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_http1_client_matches_httpx(server_url, endpoint, monkeypatch):
    """The bench's HTTP/1.1 client against the real server (chunked SSE): the same texts and
    token counts as httpx, the same error strings for a 400 (an error JSON with a Content-Length
    body) and an unknown model (404), over 4 keep-alive connections for 12 requests 4 at a time.
    Frame counts are not compared between the two runs: a server whose stream falls behind the
    engine puts two tokens in one frame, which a loaded machine does in one run and not the
    other; each client's are checked against the tokens instead."""
    from deepserve.bench.client import RequestInput, api_url

    url = api_url(server_url, endpoint)
    prompts = ["Once upon a time", "The cat sat", "Lily and Ben went", "One day a bird"] * 2

    def req(prompt, output_len=8, model="stories260k"):
        return RequestInput(prompt=prompt, prompt_len=0, output_len=output_len, model=model, api_url=url,
                            chat="chat" in endpoint, ignore_eos=True)
    inputs = [req(p, 8 + i) for i, p in enumerate(prompts)] + [req("x", -1), req("x", 4, "no-such-model")] * 2
    mine, connections = _send_all(inputs, "auto", monkeypatch)
    theirs, _ = _send_all(inputs, "httpx", monkeypatch)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert (a.success, a.generated_text, a.output_tokens, a.error) == \
            (b.success, b.generated_text, b.output_tokens, b.error), i
        for o in (a, b):    # a gap between each two text frames, at most one frame a token
            assert not o.success or len(o.itl) <= o.output_tokens - 1, (i, len(o.itl), o.output_tokens)
    assert all(o.success and o.output_tokens == 8 + i and o.ttft > 0 for i, o in enumerate(mine[:8]))
    assert all(o.generated_text for o in mine[:8])
    assert [o.error[:8] for o in mine[8:]] == ["HTTP 400", "HTTP 404"] * 2
    assert connections == 4
