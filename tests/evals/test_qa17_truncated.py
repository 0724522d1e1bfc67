"""R1's chat template opens `<think>` in the prompt, so a reply cut at the token limit inside
its reasoning holds no tag at all. It has no answer (scores 0) when the run's other replies
show a reasoning model; a model that never thinks is scored on its text as given."""
from __future__ import annotations

import json

from fake_openai import FakeOpenAI

from deepserve.cli.main import main
from deepserve.evals.cache import ReplyCache
from deepserve.evals.client import SamplingSettings
from deepserve.evals.runner import EvalOptions, build_jobs, load_items, score_task, thinks
from deepserve.evals.tasks import TASKS


def _scored(datasets_dir, tmp_path, replies):
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"),
                       tasks=[TASKS["gsm8k"]], data_path=datasets_dir,
                       cache_path=tmp_path / "c.jsonl", limit=2)
    items = load_items(opts)
    jobs = build_jobs(opts, items)
    cache = ReplyCache(opts.cache_path)
    for job, (content, finish) in zip(jobs, replies(items["gsm8k"])):
        cache.put({"key": job.key, "content": content, "finish_reason": finish})
    records = [cache.get(job.key) for job in jobs]
    return score_task(TASKS["gsm8k"], items["gsm8k"], jobs, cache, reasoning=thinks(records))


def test_cut_reasoning_without_tags_scores_0(datasets_dir, tmp_path):
    def replies(items):
        return [(f"Let me see.\n</think>\n\nThe answer is \\boxed{{{items[0].gold}}}.", "stop"),
                (f"Okay, first guess {items[1].gold}, but let me check again the", "length")]
    task = _scored(datasets_dir, tmp_path, replies)
    assert task["score"] == 50.0 and task["n_unanswered"] == 1 and task["n_truncated"] == 1


def test_model_without_reasoning_is_scored_as_given(datasets_dir, tmp_path):
    def replies(items):
        return [(f"The answer is {items[0].gold}.", "stop"),
                (f"The answer is {items[1].gold}. To double-check, we", "length")]
    assert _scored(datasets_dir, tmp_path, replies)["score"] == 100.0


def test_result_says_whether_the_model_thinks(datasets_dir, tmp_path, capsys):
    """The CLI's note on truncated replies says how they were scored."""
    opts = EvalOptions(base_url="http://127.0.0.1:1", settings=SamplingSettings("m"),
                       tasks=[TASKS["gsm8k"]], data_path=datasets_dir, cache_path=tmp_path / "u", limit=1)
    with FakeOpenAI(load_items(opts)) as srv:
        srv.reply_finish = "length"
        out = tmp_path / "r.json"
        assert main(["eval", "--base-url", srv.url, "--model", "fake-r1", "--tasks", "gsm8k",
                     "--data-path", str(datasets_dir), "--limit", "1", "--output", str(out),
                     "--no-progress"]) == 0
    assert json.loads(out.read_text())["reasoning"] is True
    assert "those cut inside their reasoning have no answer" in capsys.readouterr().err
