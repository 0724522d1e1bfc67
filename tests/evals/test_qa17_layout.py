"""A task whose data is missing fails in one line naming the task, the missing path and where
that task's data belongs under --data-path."""
import pytest

from deepserve.cli.main import main


@pytest.mark.parametrize("task, expected", [("gsm8k", "gsm8k/test.jsonl"), ("mmlu_pro", "mmlu_pro/test-*.parquet"),
                                            ("mmlu", "mmlu/test/*.csv")])
def test_missing_dataset_names_task_path_and_layout(tmp_path, capsys, monkeypatch, task, expected):
    (tmp_path / "mmlu_pro").mkdir()
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--model", "m", "--max-tokens", "8",
                 "--tasks", task, "--data-path", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"task {task}:" in err[0] and str(tmp_path) in err[0] and \
        f"--data-path/{expected}" in err[0], err[0]
