"""End to end: `deepserve eval` against a fake OpenAI endpoint on 127.0.0.1.

The fake server answers from the dataset's own answer key, so a run against its "gold" mode
must score exactly 100 % on every task, its "wrong" mode 0 %, and its flaky variant (20 % of
calls fail with 503 / 429 / dropped connections) must still complete with the same numbers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.client import SamplingSettings
from deepserve.evals.runner import EvalOptions, load_items
from deepserve.evals.tasks import TASKS
from conftest import REPO

ALL_TASKS = "gsm8k,math500,aime24,aime25,gpqa_diamond,mmlu,mmlu_pro,ceval"
LIMIT = 3


@pytest.fixture(scope="module")
def items(datasets_dir):
    """The first LIMIT items of every task, as the eval will ask them."""
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"),
                       tasks=[TASKS[n] for n in ALL_TASKS.split(",")], data_path=datasets_dir,
                       cache_path=datasets_dir / "unused", limit=LIMIT)
    return load_items(opts)


def _eval(url, datasets_dir, out, *extra) -> dict:
    argv = ["eval", "--base-url", url, "--model", "fake-r1", "--tasks", ALL_TASKS,
            "--data-path", str(datasets_dir), "--limit", str(LIMIT), "--output", str(out),
            "--no-progress", "--retry-backoff", "0.001", *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_gold_answers_score_100(items, datasets_dir, tmp_path):
    with FakeOpenAI(items, mode="gold") as srv:
        result = _eval(srv.url + "/v1/", datasets_dir, tmp_path / "gold.json")
    n_tasks = len(ALL_TASKS.split(","))
    assert srv.answered == n_tasks * LIMIT
    for name, task in result["tasks"].items():
        assert task["score"] == 100.0, (name, task["items"])
        assert task["n_items"] == LIMIT and task["n_samples"] == LIMIT
        assert all(v["preds"] for v in task["items"].values())
    # The default R1 settings went out with every request.
    body = srv.requests[0]
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.95, 32768)
    assert "\\boxed{}" in next(r for r in srv.requests if "Janet" in
                               r["messages"][0]["content"])["messages"][0]["content"]
    md = (tmp_path / "gold.md").read_text()
    assert "| GSM8K (EM) | 100.00 |" in md and "| MMLU-Pro (Acc.) | 100.00 |" in md


def test_wrong_answers_score_0_and_split_reasoning(items, datasets_dir, tmp_path):
    with FakeOpenAI(items, mode="wrong", split_reasoning=True) as srv:
        result = _eval(srv.url, datasets_dir, tmp_path / "wrong.json")
    for name, task in result["tasks"].items():
        assert task["score"] == 0.0, name
        assert task["ci95"][0] == 0.0 and task["ci95"][1] > 0.0   # Wilson: not a point
        assert task["n_unanswered"] == 0                           # answers read, just wrong


def test_flaky_server_completes_with_same_scores(items, datasets_dir, tmp_path):
    with FakeOpenAI(items, mode="mixed") as srv:
        steady = _eval(srv.url, datasets_dir, tmp_path / "steady.json")
    with FakeOpenAI(items, mode="mixed", fail_rate=0.2, seed=3) as srv:
        flaky = _eval(srv.url, datasets_dir, tmp_path / "flaky.json", "--max-concurrency", "4")
    assert srv.failures > 0 and flaky["requests"]["retries"] >= srv.failures
    assert srv.answered == flaky["requests"]["total"]
    scores = {n: t["score"] for n, t in steady["tasks"].items()}
    assert scores == {n: t["score"] for n, t in flaky["tasks"].items()}
    assert 0 < sum(scores.values()) < 100 * len(scores)   # "mixed" is neither all nor nothing


def test_num_samples_and_cache_reuse(items, datasets_dir, tmp_path):
    sub = {"gsm8k": items["gsm8k"], "aime24": items["aime24"]}
    with FakeOpenAI(sub, mode="gold") as srv:
        argv = ["eval", "--base-url", srv.url, "--model", "fake-r1", "--tasks", "gsm8k,aime24",
                "--data-path", str(datasets_dir), "--limit", "2", "--num-samples", "3",
                "--output", str(tmp_path / "r.json"), "--no-progress", "--seed", "7"]
        assert main(argv) == 0
        assert srv.answered == 12
        assert sorted(r["seed"] for r in srv.requests) == [7] * 4 + [8] * 4 + [9] * 4
        assert main(argv) == 0                  # everything comes from the cache
        assert srv.answered == 12
        assert main(argv[:-2] + ["--seed", "8"]) == 0   # new settings: new requests
        assert srv.answered == 24
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tasks"]["aime24"]["items"]["60"]["scores"] == [1.0, 1.0, 1.0]


def test_api_key_server_model_found_and_evaluated(items, datasets_dir, tmp_path, capsys):
    """The README's line (no --model) against a server with an API key: --api-key goes with the
    /v1/models lookup too (it was sent only with the questions: the lookup got a 401)."""
    with FakeOpenAI(items, mode="gold", api_key="sk-eval") as srv:
        argv = ["eval", "--base-url", srv.url, "--api-key", "sk-eval", "--tasks", "gsm8k",
                "--data-path", str(datasets_dir), "--limit", "1", "--no-progress",
                "--output", str(tmp_path / "key.json")]
        assert main(argv) == 0
    assert "eval: model 'fake-r1' (the server's" in capsys.readouterr().err
    assert srv.answered == 1 and srv.requests[0]["model"] == "fake-r1"
    assert json.loads((tmp_path / "key.json").read_text())["tasks"]["gsm8k"]["score"] == 100.0


@pytest.mark.parametrize("context,given,sent", [(32768, None, None), (4096, None, None), (4096, "100", 100),
                                                (40000, None, 32768), (None, None, 32768)])
def test_max_tokens_default_fits_the_servers_context(items, datasets_dir, tmp_path, capsys, context, given, sent):
    """R1's 32768 generated tokens, unless the server's context (its /v1/models max_model_len)
    is no larger: then no max_tokens goes out and a reply takes what its prompt leaves (each
    request was a 400 before, 32768 + the prompt being over the context); --max-tokens as given."""
    with FakeOpenAI(items, mode="gold", max_model_len=context) as srv:
        argv = ["eval", "--base-url", srv.url, "--tasks", "gsm8k", "--data-path", str(datasets_dir),
                "--limit", "1", "--no-progress", "--output", str(tmp_path / "ctx.json")]
        assert main(argv + (["--max-tokens", given] if given else [])) == 0
    assert srv.requests[0].get("max_tokens") == sent and srv.answered == 1
    assert ("no max_tokens is sent" in capsys.readouterr().err) == (sent is None)
    assert json.loads((tmp_path / "ctx.json").read_text())["settings"]["max_tokens"] == sent


def test_permanent_error_stops_with_one_line(items, datasets_dir, tmp_path, capsys):
    with FakeOpenAI(items, mode="gold") as srv:
        argv = ["eval", "--base-url", srv.url + "/nope", "--model", "m", "--tasks", "gsm8k",
                "--data-path", str(datasets_dir), "--limit", "1", "--no-progress",
                "--output", str(tmp_path / "x.json")]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err


def _cache_lines(path) -> int:
    return sum(1 for line in open(path) if line.strip()) if path.exists() else 0


def test_kill_and_resume_equals_uninterrupted(items, datasets_dir, tmp_path):
    """SIGKILL the CLI (a subprocess) mid-run, rerun it: only the missing samples are asked
    again and the result equals that of a run that was never interrupted."""
    tasks = "gsm8k,ceval,math500"
    sub = {n: items[n] for n in tasks.split(",")}
    total = 3 * LIMIT * 2

    def argv(url, out):
        return ["eval", "--base-url", url, "--model", "fake", "--tasks", tasks,
                "--data-path", str(datasets_dir), "--limit", str(LIMIT), "--num-samples", "2",
                "--max-concurrency", "2", "--output", str(out), "--no-progress"]

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with FakeOpenAI(sub, mode="mixed", delay=0.25) as srv:
        out = tmp_path / "killed.json"
        cache = tmp_path / "killed.cache.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "deepserve", *argv(srv.url, out)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while _cache_lines(cache) < 5 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = _cache_lines(cache)
        assert 5 <= done_before < total, (done_before, proc.returncode,
                                          proc.stderr.read().decode()[-2000:])
        assert not out.exists()
        time.sleep(0.3)  # let requests sent just before the kill reach the server
        srv.delay = 0.0    # the slow replies only had to let the kill land mid-run
        calls_before = srv.calls
        assert main(argv(srv.url, out)) == 0      # the same command again
        # Exactly the samples missing from the cache were asked again (those in flight at the
        # kill included); nothing cached was redone.
        assert srv.calls - calls_before == total - done_before
        assert main(argv(srv.url, tmp_path / "once.json")) == 0
    a = json.loads(out.read_text())
    b = json.loads((tmp_path / "once.json").read_text())
    assert a["requests"]["from_cache"] == done_before
    assert b["requests"]["from_cache"] == 0
    for name in sub:
        assert a["tasks"][name]["score"] == b["tasks"][name]["score"]
        assert a["tasks"][name]["items"] == b["tasks"][name]["items"]
        assert a["tasks"][name]["ci95"] == b["tasks"][name]["ci95"]
    assert 0 < a["tasks"]["gsm8k"]["score"] < 100 or 0 < a["tasks"]["math500"]["score"] < 100
    assert _cache_lines(cache) == total
