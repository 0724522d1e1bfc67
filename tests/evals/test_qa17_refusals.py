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
ALL_REFUSED_LIMIT = 8   # 16 requests: more than the FIRST_REFUSALS that stop a run early


@pytest.fixture(scope="module")
def items(datasets_dir):
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"),
                       tasks=[TASKS["gsm8k"], TASKS["mmlu"]], data_path=datasets_dir,
                       cache_path=datasets_dir / "unused", limit=ALL_REFUSED_LIMIT)
    return load_items(opts)


def _argv(url, datasets_dir, out, limit=LIMIT):
    return ["eval", "--base-url", url, "--model", "fake-r1", "--tasks", "gsm8k,mmlu",
            "--data-path", str(datasets_dir), "--limit", str(limit), "--output", str(out),
            "--no-progress", "--retry-backoff", "0.001", "--max-concurrency", "2"]


def test_some_refused_are_counted(items, datasets_dir, tmp_path, capsys):
    refused = {items["gsm8k"][1].id, items["mmlu"][0].id}
    out = tmp_path / "r.json"
    def refuse(item):
        return item.id in refused and f"prompt of {item.id} is longer than the context"

    with FakeOpenAI(items, mode="gold", refuse=refuse) as srv:
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


@pytest.mark.parametrize("message, stops_early", [
    (lambda item: "no chat template", True),             # the same refusal: stop at once
    (lambda item: f"prompt of {item.id} is too long", False),   # each its own: all are asked
])
def test_all_refused_stops(items, datasets_dir, tmp_path, capsys, message, stops_early):
    with FakeOpenAI(items, mode="gold", refuse=message) as srv:
        assert main(_argv(srv.url, datasets_dir, tmp_path / "r.json", limit=ALL_REFUSED_LIMIT)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert (srv.calls < 2 * ALL_REFUSED_LIMIT) == stops_early, srv.calls
    assert "HTTP 400" in err[-1] and ("no chat template" in err[-1] or "too long" in err[-1])
    assert not (tmp_path / "r.json").exists()
