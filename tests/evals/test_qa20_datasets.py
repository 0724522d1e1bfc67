"""MMLU as first released (Hendrycks' data.tar, OpenCompass, evalscope): headerless csv rows
`question, A, B, C, D, answer letter`, read to the same items as the shared re-export."""
import csv

import pytest

from deepserve.evals.datasets import LETTERS, load_mmlu


def test_headerless_mmlu_reads_as_the_reexport(datasets_dir, tmp_path):
    source = datasets_dir / "mmlu" / "test" / "anatomy_test.csv"
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    with open(source, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]
    with open(tmp_path / "mmlu" / "test" / "anatomy_test.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(row[:5] + [LETTERS[int(row[5])]] for row in rows)
    original = load_mmlu(tmp_path)
    reexport = [item for item in load_mmlu(datasets_dir) if item.subject == "anatomy"]
    assert len(original) == len(rows) == 135
    assert original == reexport


def test_mmlu_row_of_other_shape_names_file_and_row(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,1,2,3,4,B\nq2,1,2,3,E\n")
    with pytest.raises(ValueError, match=r"x_test.csv: row 2 has 5 fields, expected 6"):
        load_mmlu(tmp_path)
