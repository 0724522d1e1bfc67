"""The accuracy table's row titles are the deployment guides' own, so a run pastes beside them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from deepserve.evals.tasks import DEFAULT_TASKS, TASKS

SHARED = Path(__file__).resolve().parents[2].parent / "shared"

GUIDES = ["flagos-nvidia-h100.md", "flagos-metax.md"]


def guide_rows(name: str) -> list[str]:
    """First cells of the rows of the guide's "| Metrics | ..." table."""
    text = (SHARED / "reference" / name).read_text(encoding="utf-8")
    start = text.index("| Metrics")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


@pytest.mark.parametrize("guide", GUIDES)
def test_default_tasks_use_the_guides_row_titles(guide):
    rows = guide_rows(guide)
    assert len(rows) >= 2
    titles = [TASKS[name].title for name in DEFAULT_TASKS]
    for row in rows:
        assert row in titles, f"{guide} row {row!r} has no task titled so ({titles})"


def test_every_guide_title_is_in_the_h100_table_order():
    rows = guide_rows("flagos-nvidia-h100.md")
    titles = [TASKS[name].title for name in DEFAULT_TASKS]
    assert [t for t in titles if t in rows] == rows
    assert all(re.fullmatch(r"[\w\- ]+( \((EM|Acc\.|Pass@1)\))?", t) for t in titles)
