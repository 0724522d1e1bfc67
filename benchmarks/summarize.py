"""Print every result in benchmarks/results/ as one Markdown table (for docs/PERFORMANCE.md).

Figures of another device than the one most were taken on live in a subfolder named after it
(results/h200/), so that a re-run there does not overwrite the first device's figures; rows
are sorted by name, then device.

Most files hold one figure (name, device, date, command, value, unit, roofline_value, ratio);
bench_layouts.py writes one file per run with its figures under "rows" (equality checks have
no value and are left out here). Reports that are not figures (profile_decode.py's step
breakdowns, sweep_gemv.py's raw timings) have no name and value and are left out too."""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def figures(d: dict) -> list[dict]:
    if "rows" in d:
        return [dict(r, device=d["device"], date=d["date"], command=d["command"])
                for r in d["rows"] if "name" in r and "value" in r]
    return [d] if "name" in d and "value" in d else []


def main() -> None:
    print("| name | device | date | value | unit | roofline | ratio | command |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [d for path in RESULTS.rglob("*.json") for d in figures(json.loads(path.read_text()))]
    for d in sorted(rows, key=lambda d: (d["name"], d["device"])):
        ratio = f"{d['ratio']:.1%}" if d.get("ratio") is not None else "-"
        roof = f"{d['roofline_value']:.4g}" if d.get("roofline_value") is not None else "-"
        print(f"| {d['name']} | {d['device']} | {d['date'][:10]} | {d['value']:.4g} | {d['unit']} | "
              f"{roof} | {ratio} | `{d['command']}` |")


if __name__ == "__main__":
    main()
