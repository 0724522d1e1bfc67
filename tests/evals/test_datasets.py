"""Loading the benchmark files in their published formats (counts from the datasets README)."""
from __future__ import annotations

import collections
import json
import zipfile

import pytest

from deepserve.evals import datasets
from deepserve.evals.tasks import TASKS, parse_tasks


@pytest.mark.parametrize("task,count,first_id,first_gold", [
    ("gsm8k", 1319, "0", "18"),
    ("math500", 500, "test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("aime24", 30, "60", "204"),
    ("aime25", 30, "0", "70"),
    ("gpqa_diamond", 198, "rec06pnAkLOr2t2mp", None),
    ("mmlu", 14042, "abstract_algebra/0", "B"),
    ("mmlu_pro", 12032, "70", "I"),
    ("ceval", 1346, "accountant/0", "D"),
])
def test_loaders_read_the_published_files(datasets_dir, task, count, first_id, first_gold):
    items = TASKS[task].load(datasets_dir)
    assert len(items) == count
    assert len({item.id for item in items}) == count          # ids are unique
    assert items[0].id == first_id
    if first_gold is not None:
        assert items[0].gold == first_gold


def test_gpqa_options_shuffled_stably(datasets_dir):
    items = datasets.load_gpqa_diamond(datasets_dir)
    first = items[0]
    assert first.choices[ord(first.gold) - ord("A")] == "10^-4 eV"  # the csv's correct answer
    golds = collections.Counter(item.gold for item in items)
    assert set(golds) == set("ABCD") and max(golds.values()) < 80   # not always "A"
    datasets.load_gpqa_diamond.cache_clear()
    again = datasets.load_gpqa_diamond(datasets_dir)
    assert [i.choices for i in again] == [i.choices for i in items]


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gsm8k" / "test.jsonl")):
        datasets.load_gsm8k(tmp_path)
    bad = tmp_path / "gsm8k"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match="test.jsonl:2"):
        datasets.load_gsm8k.__wrapped__(tmp_path)


def test_gpqa_reads_a_plain_zip_too(tmp_path):
    folder = tmp_path / "gpqa_diamond"
    folder.mkdir()
    csv_text = ("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,"
                "Incorrect Answer 3,Record ID\nWhat is 2+2?,4,3,5,22,recX\n")
    with zipfile.ZipFile(folder / "gpqa_diamond.zip", "w") as zf:
        zf.writestr("gpqa_diamond.csv", csv_text)  # unencrypted: the password is ignored
    [item] = datasets.load_gpqa_diamond.__wrapped__(tmp_path)
    assert item.id == "recX" and sorted(item.choices) == ["22", "3", "4", "5"]
    assert item.choices["ABCD".index(item.gold)] == "4"


def test_parquet_reader_values(datasets_dir):
    read_parquet = datasets.read_parquet
    rows = read_parquet(datasets_dir / "mmlu_pro" / "validation-00000-of-00001.parquet")
    assert len(rows) == 70
    assert rows[0]["question_id"] == 0 and rows[0]["answer"] == "A"
    assert rows[0]["options"] == ["0", "30", "3", "10", "12", "50", "2", "100", "20", "5"]
    assert rows[0]["category"] == "math" and rows[0]["answer_index"] == 0
    assert rows[-1]["answer"] == "F" and rows[-1]["options"][-1] == "N/A"
    only = read_parquet(datasets_dir / "mmlu_pro" / "validation-00000-of-00001.parquet",
                        columns=("question_id",))
    assert [r["question_id"] for r in only] == [r["question_id"] for r in rows]
    assert set(only[0]) == {"question_id"}


def test_parquet_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="bad.parquet: cannot read as Parquet"):
        datasets.read_parquet(bad)


def test_parse_tasks():
    assert [t.name for t in parse_tasks("gsm8k, aime24,gsm8k")] == ["gsm8k", "aime24"]
    with pytest.raises(ValueError, match="unknown task.*hellaswag"):
        parse_tasks("gsm8k,hellaswag")


def test_math500_answers_are_json_strings(datasets_dir):
    row = json.loads((datasets_dir / "math500" / "test.jsonl").open().readline())
    assert datasets.load_math500(datasets_dir)[0].gold == row["answer"]
