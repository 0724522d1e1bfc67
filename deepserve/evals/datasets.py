"""Load the evaluation sets from the user's own copies (nothing is ever downloaded).

`--data-path DIR` is a root holding one folder per set, in the formats of the public releases
(see ../shared/datasets/README.md in the deepserve checkout):

    gsm8k/test.jsonl                 question, answer ending "#### N"
    math500/test.jsonl               problem, answer, unique_id, ...
    aime/test.jsonl                  AIME 2024: id, problem, answer
    aime/aime_2025.jsonl             AIME 2025: question/problem, answer
    gpqa_diamond/gpqa_diamond.zip    csv in a zip with the authors' password (or the plain
                                     gpqa_diamond.csv)
    mmlu/test/*.csv                  question, 4 options, answer (A-D, or 0-3 under a header
                                     question,choice0..3,answer)
    mmlu_pro/test-*.parquet          question_id, question, options, answer
    ceval/ceval-exam.zip             val/<subject>_val.csv: id, question, A..D, answer

Every loader returns `Item`s with a stable string id, so caches and run-to-run comparisons
line up item by item. Loaders are memoised per process (the CLI loads once; tests reuse).
GPQA's options are shuffled by a hash of the record id (the csv always
lists the correct answer first), the same on every run and machine.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

GPQA_PASSWORD = b"deserted-untie-orchid"  # published by the GPQA authors with the data
LETTERS = "ABCDEFGHIJKLMNOP"


@dataclass(frozen=True)
class Item:
    """One question: `gold` is the reference answer (a number, LaTeX, or an option letter)."""
    id: str
    question: str
    gold: str
    choices: tuple[str, ...] = ()
    subject: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)


# Where each task's data lies under --data-path.
LAYOUT = {"gsm8k": "gsm8k/test.jsonl", "math500": "math500/test.jsonl", "aime24": "aime/test.jsonl",
          "aime25": "aime/aime_2025.jsonl", "gpqa_diamond": "gpqa_diamond/gpqa_diamond.zip or gpqa_diamond.csv",
          "mmlu": "mmlu/test/*.csv", "mmlu_pro": "mmlu_pro/test-*.parquet", "ceval": "ceval/ceval-exam.zip"}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(_require(path, "dataset file"), encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return rows


def _open_zip(path: Path, what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(_require(path, what))
    except zipfile.BadZipFile as exc:   # a download cut short, or an error page saved under its name
        raise ValueError(f"{path}: not a readable zip ({exc}); fetch it again") from None


def _field(row: dict, names: tuple[str, ...], path: Path):
    for name in names:
        if name in row:
            return row[name]
    raise ValueError(f"{path}: a row has none of the fields {names}; it has {sorted(row)}")


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_gsm8k(root: Path) -> list[Item]:
    path = root / "gsm8k" / "test.jsonl"
    items = []
    for i, row in enumerate(_read_jsonl(path)):
        answer = str(_field(row, ("answer",), path))
        gold = answer.split("####")[-1].strip().replace(",", "")
        items.append(Item(id=str(i), question=str(_field(row, ("question",), path)), gold=gold))
    return items


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_math500(root: Path) -> list[Item]:
    path = root / "math500" / "test.jsonl"
    return [Item(id=str(row.get("unique_id", i)), question=str(_field(row, ("problem",), path)),
                 gold=str(_field(row, ("answer",), path)), subject=str(row.get("subject", "")))
            for i, row in enumerate(_read_jsonl(path))]


def _load_aime(path: Path) -> list[Item]:
    return [Item(id=str(row.get("id", i)), question=str(_field(row, ("problem", "question",
                                                                      "Question"), path)),
                 gold=str(_field(row, ("answer", "Answer"), path)).strip())
            for i, row in enumerate(_read_jsonl(path))]


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_aime24(root: Path) -> list[Item]:
    return _load_aime(root / "aime" / "test.jsonl")


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_aime25(root: Path) -> list[Item]:
    return _load_aime(root / "aime" / "aime_2025.jsonl")


def _stable_shuffle(values: list[str], key: str) -> list[str]:
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    out = list(values)
    random.Random(seed).shuffle(out)
    return out


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_gpqa_diamond(root: Path) -> list[Item]:
    """From the zip, or from the plain gpqa_diamond.csv of the Hugging Face copy."""
    path = root / "gpqa_diamond" / "gpqa_diamond.zip"
    plain = path.with_suffix(".csv")
    if plain.exists() and not path.exists():
        text = plain.read_text(encoding="utf-8")
    else:
        with _open_zip(path, "GPQA-Diamond zip") as zf:
            names = [n for n in zf.namelist() if n.endswith(".csv")]
            if not names:
                raise ValueError(f"{path}: no .csv inside (found {zf.namelist()})")
            # the authors' dataset.zip also holds gpqa_main, gpqa_extended and gpqa_experts
            name = next((n for n in names if n.endswith("gpqa_diamond.csv")), names[0])
            try:
                text = zf.read(name, pwd=GPQA_PASSWORD).decode("utf-8")
            except RuntimeError as exc:  # zipfile's "Bad password for file"
                raise ValueError(f"{path}: cannot decrypt {name}: {exc}") from None
    items = []
    for i, row in enumerate(csv.DictReader(io.StringIO(text))):
        correct = row["Correct Answer"].strip()
        options = [correct] + [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
        rid = row.get("Record ID") or str(i)
        shuffled = _stable_shuffle(options, rid)
        items.append(Item(id=rid, question=row["Question"].strip(), choices=tuple(shuffled),
                          gold=LETTERS[shuffled.index(correct)],
                          subject=row.get("High-level domain", "")))
    return items


MMLU_HEADER = ("question", "choice0", "choice1", "choice2", "choice3", "answer")


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_mmlu(root: Path) -> list[Item]:
    folder = _require(root / "mmlu" / "test", "MMLU test folder")
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.csv files")
    items = []
    for path in files:
        subject = re.sub(r"_test$", "", path.stem)
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        if rows and [c.strip().lower() for c in rows[0]] == list(MMLU_HEADER):
            rows = rows[1:]   # the re-export's header; the original release has none
        for i, row in enumerate(rows):
            if len(row) != 6:
                raise ValueError(f"{path}: row {i + 1} has {len(row)} fields, expected 6 "
                                 "(question, four options, answer)")
            answer = row[5].strip()
            gold = LETTERS[int(answer)] if answer.isdigit() else answer.upper()
            if gold not in LETTERS[:4]:
                raise ValueError(f"{path}: row {i + 1} answers {answer!r}, expected A-D or 0-3")
            items.append(Item(id=f"{subject}/{i}", question=row[0].strip(), choices=tuple(row[1:5]),
                              gold=gold, subject=subject))
    return items


def read_parquet(path: Path, columns: tuple[str, ...] | None = None) -> list[dict]:
    """The rows of a Parquet file as dicts (pyarrow, the `eval` extra; imported when asked for)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet files (MMLU-Pro) needs pyarrow: "
                          "pip install 'deepserve[eval]'") from None
    try:
        table = pq.read_table(path, columns=list(columns) if columns else None)
    except (OSError, ValueError, KeyError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path}: cannot read as Parquet ({exc})") from None
    return table.to_pylist()


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_mmlu_pro(root: Path) -> list[Item]:
    folder = _require(root / "mmlu_pro", "MMLU-Pro folder")
    files = sorted(folder.glob("test-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder}: no test-*.parquet files")
    items = []
    for path in files:
        for row in read_parquet(path, columns=("question_id", "question", "options",
                                               "answer", "category")):
            options = [str(o) for o in row["options"]]
            gold = str(row["answer"]).strip().upper()
            items.append(Item(id=str(row["question_id"]), question=str(row["question"]).strip(),
                              choices=tuple(options), gold=gold,
                              subject=str(row.get("category", ""))))
    return items


@functools.lru_cache(maxsize=None)  # parsed once per process
def load_ceval(root: Path) -> list[Item]:
    """C-Eval's val split: the test split's answers are not public."""
    path = root / "ceval" / "ceval-exam.zip"
    mapping_path = root / "ceval" / "subject_mapping.json"
    items = []
    with _open_zip(path, "C-Eval zip") as zf:
        names = sorted(n for n in zf.namelist() if re.fullmatch(r"(?:.*/)?val/\w+_val\.csv", n))
        if not names:
            raise ValueError(f"{path}: no val/<subject>_val.csv inside")
        if mapping_path.exists():
            mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
        elif "subject_mapping.json" in zf.namelist():
            mapping = json.loads(zf.read("subject_mapping.json").decode("utf-8"))
        else:
            mapping = {}
        for name in names:
            subject = re.sub(r"_val\.csv$", "", name.rsplit("/", 1)[-1])
            subject_zh = mapping.get(subject, [subject, subject])[1]
            rows = csv.DictReader(io.StringIO(zf.read(name).decode("utf-8")))
            for row in rows:
                items.append(Item(id=f"{subject}/{row['id']}", question=row["question"].strip(),
                                  choices=tuple(row[k] for k in "ABCD"),
                                  gold=row["answer"].strip().upper(), subject=subject_zh))
    return items
