"""Result files and tables: one run's accuracy table, and several runs side by side.

A result JSON ("format": "deepserve-eval/1") holds the settings, per-task scores in percent
with 95 % intervals and counts, and every item's per-sample scores and extracted answers;
the per-item scores are what `eval compare` pairs up. Tables use the row titles of the
deployment guides ("| Metrics | <model> |", "| GSM8K (EM) | 95.75 |"), so a run can be
pasted next to the official numbers.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from deepserve.evals.stats import paired_test

FORMAT = "deepserve-eval/1"


def markdown_table(result: dict) -> str:
    """The accuracy table of one run."""
    lines = [f"| Metrics | {result['model']} | 95% CI | items x samples |",
             "| --- | --- | --- | --- |"]
    for task in result["tasks"].values():
        low, high = task["ci95"]
        per_item = task["n_samples"] // max(task["n_items"], 1)
        lines.append(f"| {task['title']} | {task['score']:.2f} | {low:.2f}-{high:.2f} | "
                     f"{task['n_items']} x {per_item} |")
    return "\n".join(lines) + "\n"


def write_result(result: dict, path: str | Path) -> tuple[Path, Path]:
    """Write the JSON (atomically: temp file + rename) and the Markdown table beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    doc = dict(result, table_markdown=table)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    md = path.with_suffix(".md")
    md.write_text(table, encoding="utf-8")
    return path, md


def load_result(path: str | Path) -> dict:
    """Read a result JSON written by `deepserve eval`; ValueError if it is something else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"result file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path} is not a deepserve eval result (format {got!r}, "
                         f"expected {FORMAT!r})")
    return doc


def _labels(results: list[dict], paths: list[str]) -> list[str]:
    labels = [r.get("model", "?") for r in results]
    if len(set(labels)) < len(labels):
        labels = [Path(p).stem for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return labels


def compare(results: list[dict], paths: list[str], alpha: float = 0.05) -> dict:
    """Pair every run with the first (the baseline), task by task, on their shared items."""
    if len(results) < 2:
        raise ValueError(f"eval compare needs at least 2 result files, got {len(results)}")
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    labels = _labels(results, paths)
    task_names = list(dict.fromkeys(name for r in results for name in r["tasks"]))
    rows = []
    for name in task_names:
        present = [r["tasks"].get(name) for r in results]
        title = next(t["title"] for t in present if t)
        row = {"task": name, "title": title,
               "scores": [t["score"] if t else None for t in present], "deltas": []}
        base = present[0]
        for other in present[1:]:
            if base is None or other is None:
                row["deltas"].append(None)
                continue
            shared = [i for i in base["items"] if i in other["items"]]
            test = paired_test([base["items"][i]["score"] for i in shared],
                               [other["items"][i]["score"] for i in shared])
            test["delta"] *= 100
            test["ci95"] = [100 * v for v in test["ci95"]]
            test["significant"] = test["n"] > 0 and test["p"] < alpha
            row["deltas"].append(test)
        rows.append(row)
    return {"labels": labels, "files": list(paths), "alpha": alpha, "rows": rows}


def compare_markdown(comparison: dict) -> str:
    labels = comparison["labels"]
    base = labels[0]
    head = ["Metrics", *labels, *[f"{label} - {base}" for label in labels[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in comparison["rows"]:
        cells = [row["title"]]
        cells += ["-" if s is None else f"{s:.2f}" for s in row["scores"]]
        for d in row["deltas"]:
            if d is None:
                cells.append("-")
            elif d["n"] == 0:
                cells.append("no shared items")
            else:
                verdict = "**beyond noise**" if d["significant"] else "within noise"
                cells.append(f"{d['delta']:+.2f} (n={d['n']}, p={d['p']:.3g}, {verdict})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Deltas are paired over the items both runs scored: exact McNemar test when "
                 f"every item has one sample, else a paired sign-flip test on per-item pass@1; "
                 f"'beyond noise' means p < {comparison['alpha']:g}.")
    return "\n".join(lines) + "\n"
