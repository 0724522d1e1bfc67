"""Every recorded figure (benchmarks/results/) says how it was measured: summarize.py prints
each with its device, date and command, and docs/PERFORMANCE.md's table comes from it."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_figure_names_its_device_date_and_command():
    missing = []
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        d = json.loads(path.read_text())
        rows = d.get("rows", [d]) if isinstance(d, dict) else []
        for r in rows:
            if not isinstance(r, dict) or "name" not in r or "value" not in r:
                continue
            have = {**d, **r} if "rows" in d else r
            absent = [k for k in ("device", "date", "command") if not have.get(k)]
            if absent:
                missing.append(f"{path.relative_to(ROOT)}: {r['name']} lacks {absent}")
    assert not missing, "\n".join(missing)


def test_summarize_prints_the_table():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "summarize.py")], capture_output=True, text=True,
                         check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("| name | device | date |") and len(lines) > 100
