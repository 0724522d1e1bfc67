"""Users' own copies: MMLU as first released (Hendrycks' data.tar, OpenCompass, evalscope:
headerless rows `question, A, B, C, D, letter`) and GPQA-Diamond as a plain csv or inside the
authors' full dataset.zip read to the same items as the shared files."""
import csv
import zipfile

import pytest

from deepserve.cli.main import main
from deepserve.evals.datasets import GPQA_PASSWORD, LETTERS, load_aime24, load_gpqa_diamond, load_mmlu


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


def test_gpqa_plain_csv_and_the_authors_full_zip(datasets_dir, tmp_path):
    """The Hugging Face copy's plain gpqa_diamond.csv, and the authors' dataset.zip (main,
    extended and experts beside diamond) give the shared zip's 198 items."""
    with zipfile.ZipFile(datasets_dir / "gpqa_diamond" / "gpqa_diamond.zip") as zf:
        text = zf.read("gpqa_diamond.csv", pwd=GPQA_PASSWORD).decode("utf-8")
    shared = load_gpqa_diamond(datasets_dir)
    plain = tmp_path / "plain"
    (plain / "gpqa_diamond").mkdir(parents=True)
    (plain / "gpqa_diamond" / "gpqa_diamond.csv").write_text(text, encoding="utf-8")
    assert load_gpqa_diamond(plain) == shared
    full = tmp_path / "full"
    (full / "gpqa_diamond").mkdir(parents=True)
    header = text.splitlines()[0]
    with zipfile.ZipFile(full / "gpqa_diamond" / "gpqa_diamond.zip", "w") as zf:
        zf.writestr("dataset/gpqa_experts.csv", "Question,Expert\nq,e\n")
        zf.writestr("dataset/gpqa_extended.csv", header + "\n")
        zf.writestr("dataset/gpqa_diamond.csv", text)
    assert load_gpqa_diamond(full) == shared
    assert len(shared) == 198


@pytest.mark.parametrize("task, relpath", [("ceval", "ceval/ceval-exam.zip"),
                                           ("gpqa_diamond", "gpqa_diamond/gpqa_diamond.zip")])
def test_a_broken_zip_is_one_line(tmp_path, capsys, monkeypatch, task, relpath):
    """An error page saved under the zip's name (a failed download) is named, not a traceback."""
    (tmp_path / relpath).parent.mkdir()
    (tmp_path / relpath).write_text("<html>429 Too Many Requests</html>")
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--model", "m", "--max-tokens", "8",
                 "--tasks", task, "--data-path", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"deepserve eval: error: {tmp_path / relpath}: not a readable zip (File is not a zip file); fetch it again"]


def test_jsonl_not_utf8_names_the_file(tmp_path):
    (tmp_path / "aime").mkdir()
    (tmp_path / "aime" / "test.jsonl").write_bytes(b'{"problem": "\xff"}\n')
    with pytest.raises(ValueError, match=r"aime/test.jsonl: not UTF-8 text \(invalid start byte at byte 13\)"):
        load_aime24(tmp_path)


def test_missing_gpqa_names_both_forms(tmp_path, capsys, monkeypatch):
    """Neither the zip nor the plain csv there: the line names both, as `eval --help` does."""
    monkeypatch.setattr("deepserve.cli.bench.check_reachable", lambda url: None)
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--model", "m", "--max-tokens", "8",
                 "--tasks", "gpqa_diamond", "--data-path", str(tmp_path), "--no-progress"]) == 2
    zip_path = tmp_path / "gpqa_diamond" / "gpqa_diamond.zip"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"deepserve eval: error: task gpqa_diamond: GPQA-Diamond zip: {zip_path} does not exist (expected "
        f"--data-path/gpqa_diamond/gpqa_diamond.zip or gpqa_diamond.csv; the layout of every task: "
        f"`deepserve eval --help`)"]
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "gpqa_diamond/gpqa_diamond.zip or gpqa_diamond.csv (gpqa_diamond)" in capsys.readouterr().out
