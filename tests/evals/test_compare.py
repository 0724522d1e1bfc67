"""`deepserve eval compare`: deltas between runs and whether they exceed sampling noise."""
from __future__ import annotations

import json

import pytest

from deepserve.cli.main import main
from deepserve.evals.report import FORMAT, compare, load_result


def _result(model: str, per_task: dict[str, list[float]]) -> dict:
    titles = {"gsm8k": "GSM8K (EM)", "aime24": "AIME 2024 (Pass@1)", "mmlu": "MMLU (Acc.)"}
    tasks = {}
    for name, scores in per_task.items():
        items = {str(i): {"gold": "1", "scores": [s], "preds": ["1"], "score": s}
                 for i, s in enumerate(scores)}
        tasks[name] = {"title": titles[name], "score": 100 * sum(scores) / len(scores),
                       "ci95": [0.0, 100.0], "n_items": len(scores), "n_samples": len(scores),
                       "n_truncated": 0, "n_unanswered": 0, "items": items}
    return {"format": FORMAT, "model": model, "tasks": tasks}


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_flags_real_differences_only(tmp_path, capsys):
    base = _result("official", {"gsm8k": [1.0] * 150 + [0.0] * 50,
                                "aime24": [1.0] * 20 + [0.0] * 10})
    # gsm8k: 40 of base's right answers turn wrong (-20 points): beyond noise.
    # aime24: one item flips each way: delta 0, within noise.
    worse = _result("ours", {"gsm8k": [1.0] * 110 + [0.0] * 90,
                             "aime24": [0.0] + [1.0] * 19 + [1.0] + [0.0] * 9})
    a, b = _write(tmp_path / "a.json", base), _write(tmp_path / "b.json", worse)
    assert main(["eval", "compare", a, b, "--output", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    assert "| Metrics | official | ours | ours - official |" in out
    gsm_line = next(line for line in out.splitlines() if line.startswith("| GSM8K"))
    assert "| 75.00 | 55.00 | -20.00 (n=200" in gsm_line and "**beyond noise**" in gsm_line
    aime_line = next(line for line in out.splitlines() if line.startswith("| AIME 2024"))
    assert "+0.00 (n=30, p=1," in aime_line and "within noise" in aime_line
    saved = json.loads((tmp_path / "cmp.json").read_text())
    gsm = saved["rows"][0]["deltas"][0]
    assert gsm["test"] == "mcnemar_exact" and gsm["p"] < 1e-9 and gsm["significant"]
    assert (tmp_path / "cmp.md").read_text() == out


def test_compare_pairs_only_shared_items_and_missing_tasks():
    a = _result("a", {"gsm8k": [1.0, 0.0, 1.0, 1.0], "mmlu": [1.0, 1.0]})
    b = _result("b", {"gsm8k": [1.0, 1.0]})            # ran with --limit 2, no mmlu
    c = _result("a", {"gsm8k": [0.0, 0.0, 0.0, 0.0]})  # same model name: labels from files
    cmp = compare([a, b, c], ["x/run1.json", "x/run2.json", "x/run3.json"])
    assert cmp["labels"] == ["run1", "run2", "run3"]
    gsm, mmlu = cmp["rows"]
    assert gsm["deltas"][0]["n"] == 2 and gsm["deltas"][0]["delta"] == pytest.approx(50.0)
    assert gsm["deltas"][1]["n"] == 4 and gsm["deltas"][1]["delta"] == pytest.approx(-75.0)
    assert mmlu["scores"] == [100.0, None, None] and mmlu["deltas"] == [None, None]


def test_compare_rejects_bad_inputs(tmp_path, capsys):
    other = _write(tmp_path / "bench.json", {"format": "vllm-bench", "tasks": {}})
    good = _write(tmp_path / "good.json", _result("m", {"gsm8k": [1.0]}))
    assert main(["eval", "compare", good, other]) == 2
    assert "not a deepserve eval result" in capsys.readouterr().err
    assert main(["eval", "compare", good, str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 2"):
        compare([load_result(good)], [good])
