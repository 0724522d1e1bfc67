"""A server that refuses some requests (400: a prompt over its context) does not stop the run:
the refused samples score 0, are counted per task and reported, and the next run sends only
them again. A server that refuses every request still stops the run in one line."""
from __future__ import annotations

import json

import pytest
from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.client import SamplingSettings
from deepserve.evals.runner import EvalOptions, load_items
from deepserve.evals.tasks import TASKS

LIMIT = 4


@pytest.fixture(scope="module")
def items(datasets_dir):
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"),
                       tasks=[TASKS["gsm8k"], TASKS["mmlu"]], data_path=datasets_dir,
                       cache_path=datasets_dir / "unused", limit=LIMIT)
    return load_items(opts)


def _argv(url, datasets_dir, out):
    return ["eval", "--base-url", url, "--model", "fake-r1", "--tasks", "gsm8k,mmlu",
            "--data-path", str(datasets_dir), "--limit", str(LIMIT), "--output", str(out),
            "--no-progress", "--retry-backoff", "0.001", "--max-concurrency", "2"]


def test_some_refused_are_counted(items, datasets_dir, tmp_path, capsys):
    refused = {items["gsm8k"][1].id, items["mmlu"][0].id}
    out = tmp_path / "r.json"
    with FakeOpenAI(items, mode="gold", refuse=lambda item: item.id in refused) as srv:
        assert main(_argv(srv.url, datasets_dir, out)) == 0
    err = capsys.readouterr().err
    result = json.loads(out.read_text())
    for name in ("gsm8k", "mmlu"):
        task = result["tasks"][name]
        assert task["n_failed"] == 1 and task["score"] == 75.0, task
        assert "longer than the context" in task["first_error"]
        assert f"note: {name}: 1 of {LIMIT} requests were refused" in err
    assert result["requests"]["failed"] == 2
    # The next run sends only the refused requests again; now answered, they score.
    with FakeOpenAI(items, mode="gold") as srv:
        assert main(_argv(srv.url, datasets_dir, out)) == 0
    assert srv.calls == 2
    result = json.loads(out.read_text())
    assert all(t["score"] == 100.0 and t["n_failed"] == 0 for t in result["tasks"].values())


def test_all_refused_stops(items, datasets_dir, tmp_path, capsys):
    with FakeOpenAI(items, mode="gold", refuse=lambda item: True) as srv:
        assert main(_argv(srv.url, datasets_dir, tmp_path / "r.json")) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert srv.calls <= 2 * LIMIT
    assert "HTTP 400" in err[-1] and "longer than the context" in err[-1]
