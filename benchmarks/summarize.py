"""Print every result in benchmarks/results/ as one Markdown table (for docs/PERFORMANCE.md)."""
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    print("| name | device | date | value | unit | roofline | ratio | command |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("*.json")):
        d = json.loads(path.read_text())
        ratio = f"{d['ratio']:.1%}" if d.get("ratio") is not None else "-"
        print(f"| {d['name']} | {d['device']} | {d['date'][:10]} | {d['value']:.4g} | {d['unit']} | "
              f"{d['roofline_value']:.4g} | {ratio} | `{d['command']}` |")


if __name__ == "__main__":
    main()
