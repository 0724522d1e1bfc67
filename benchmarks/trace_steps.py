"""Engine steps in torch-profiler traces of vLLM and deepserve, side by side.

Both servers, started with `--profiler-config '{"profiler": "torch", "torch_profiler_dir": DIR}'`
and profiled between `POST /start_profile` and `POST /stop_profile`, run each engine step inside
a range named `execute_context_C(CT)_generation_G(GT)` (C requests in their prompt with CT
scheduled tokens, G generating requests with GT tokens). The trace holds that range twice: on
the host (`user_annotation`) and on the GPU (`gpu_user_annotation`: from the first to the last
kernel the range launched, CUDA-graph replays included). Per step this script takes the GPU
span, the kernels' busy time inside it, and the period to the next step's GPU start (span +
idle gap), then groups the steps: decode steps (C = 0) by batch (G in buckets), mixed steps
(C > 0 and G > 0) by their prompt tokens, prompt-only steps.

    python benchmarks/trace_steps.py DIR_OR_TRACE [--label NAME] [DIR_OR_TRACE --label NAME ...]
    python benchmarks/trace_steps.py po/trace_deepserve po/trace_vllm --json steps.json
    python benchmarks/trace_steps.py --steps-json steps.json     # that JSON's steps again, merged

With two traces the table puts them side by side with the first / second ratio of each median.
A trace is a Chrome JSON file (.json or .json.gz); a folder means every trace file in it (one a
rank: the first rank's is used, the others listed).

A step's GPU range can come as several ranges of its name: vLLM's trace holds each step's range
twice, one inside the other, and a piecewise-graph step as its first range with a fragment per
eager stretch inside it. Ranges of one name that start inside the range before them are one
step (their union). Per group, `--kernels N` (default 12) also lists the N kernels with the most
GPU time a step (ms, the mean over the group's steps), side by side: where a step's time goes.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Optional

STEP = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)$")
DECODE_BUCKETS = (1, 8, 32, 64, 128, 192, 256, 384, 512, 1024)
PROMPT_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def trace_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".json", ".json.gz")))
    if not files:
        raise SystemExit(f"trace_steps: no .json / .json.gz trace under {path}")
    return files


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def steps_of(events: list[dict]) -> list[dict]:
    """The engine steps of one trace, in GPU order: composition, GPU start / span, kernels' busy
    time inside the span, and the period to the next step's GPU start (None for the last). A
    trace without GPU ranges (a CPU run) gives its host ranges; busy time is None in a trace
    without kernels."""
    cat = "gpu_user_annotation"
    if not any(ev.get("cat") == cat and STEP.match(ev.get("name", "")) for ev in events):
        cat = "user_annotation"
    spans = []
    for ev in events:
        if ev.get("ph") != "X" or ev.get("cat") != cat:
            continue
        m = STEP.match(ev.get("name", ""))
        if m:
            c, ct, g, gt = (int(v) for v in m.groups())
            spans.append({"context": c, "context_tokens": ct, "generation": g, "generation_tokens": gt,
                          "start_us": float(ev["ts"]), "span_us": float(ev["dur"])})
    spans = merge_ranges(spans)
    kernels = sorted((float(ev["ts"]), float(ev["ts"]) + float(ev["dur"]), ev.get("name", "?")) for ev in events
                     if ev.get("ph") == "X" and ev.get("cat") == "kernel")
    k = 0
    for i, step in enumerate(spans):
        lo, hi = step["start_us"], step["start_us"] + step["span_us"]
        while k < len(kernels) and kernels[k][1] <= lo:
            k += 1
        inside, by_name, j = [], {}, k
        while j < len(kernels) and kernels[j][0] < hi:
            a, b = max(kernels[j][0], lo), min(kernels[j][1], hi)
            inside.append((a, b))
            by_name[kernels[j][2]] = by_name.get(kernels[j][2], 0.0) + (b - a)
            j += 1
        step["busy_us"] = _union(inside) if kernels else None
        step["kernels_us"] = by_name
    return _with_periods(spans)


def _with_periods(steps: list[dict]) -> list[dict]:
    """Each step's period: its GPU start to the next step's (None for the last)."""
    for i, step in enumerate(steps):
        step["period_us"] = steps[i + 1]["start_us"] - step["start_us"] if i + 1 < len(steps) else None
    return steps


def _name(step: dict) -> tuple:
    return step["context"], step["context_tokens"], step["generation"], step["generation_tokens"]


def merge_ranges(spans: list[dict]) -> list[dict]:
    """One entry a step: a range that starts inside the range before it and has its name (a
    nested copy, or a fragment of a piecewise step) joins it, as their union; of ranges that
    carry a busy time (saved steps), the joined one keeps the largest, which holds the others'
    kernels when they nest."""
    out: list[dict] = []
    for step in sorted(spans, key=lambda s: s["start_us"]):
        last = out[-1] if out else None
        if last and _name(last) == _name(step) and step["start_us"] < last["start_us"] + last["span_us"]:
            end = max(last["start_us"] + last["span_us"], step["start_us"] + step["span_us"])
            last["span_us"] = end - last["start_us"]
            if last.get("busy_us") is not None and step.get("busy_us") is not None:
                last["busy_us"] = max(last["busy_us"], step["busy_us"])
            continue
        out.append(dict(step))
    return out


def resummarize(saved: dict) -> dict[str, dict]:
    """The summary of each label's steps saved by an earlier --json, their ranges merged as
    steps_of merges them and the periods taken again."""
    return {label: summarize(_with_periods(merge_ranges(entry["steps"]))) for label, entry in saved.items()}


def bucket(value: int, edges: tuple[int, ...]) -> str:
    lo = 0
    for edge in edges:
        if value <= edge:
            return f"{lo + 1}-{edge}"
        lo = edge
    return f">{edges[-1]}"


def group(step: dict) -> str:
    if step["context"] == 0:
        return f"decode, batch {bucket(step['generation'], DECODE_BUCKETS)}"
    if step["generation"] == 0:
        return f"prompt only, {bucket(step['context_tokens'], PROMPT_BUCKETS)} tokens"
    return f"mixed, {bucket(step['context_tokens'], PROMPT_BUCKETS)} prompt tokens"


def summarize(steps: list[dict]) -> dict[str, dict]:
    """Per group: steps, mean batch, median GPU span / busy / period (ms), idle share of the periods."""
    out: dict[str, dict] = {}
    for name in sorted({group(s) for s in steps}, key=_group_order):
        mine = [s for s in steps if group(s) == name]
        periods = [s["period_us"] for s in mine if s["period_us"] is not None]
        row = {"steps": len(mine),
               "mean_generation": statistics.fmean(s["generation"] for s in mine),
               "mean_context_tokens": statistics.fmean(s["context_tokens"] for s in mine),
               "span_ms": statistics.median(s["span_us"] for s in mine) / 1e3,
               "busy_ms": (statistics.median(s["busy_us"] for s in mine) / 1e3
                           if mine[0]["busy_us"] is not None else None),
               "period_ms": statistics.median(periods) / 1e3 if periods else None}
        with_next = [s for s in mine if s["period_us"] is not None and s["busy_us"] is not None]
        row["idle_share"] = (1 - sum(s["busy_us"] for s in with_next) / sum(s["period_us"] for s in with_next)
                             if with_next else None)
        totals: dict[str, float] = {}
        for s in mine:
            for k, us in s.get("kernels_us", {}).items():
                totals[k] = totals.get(k, 0.0) + us
        row["kernels_ms"] = {k: v / len(mine) / 1e3 for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
        out[name] = row
    return out


def _group_order(name: str) -> tuple:
    kind = 0 if name.startswith("decode") else 1 if name.startswith("mixed") else 2
    nums = re.findall(r"\d+", name)
    return kind, int(nums[0]) if nums else 0, name


def _fmt(v: Optional[float], spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(labels: list[str], summaries: list[dict[str, dict]]) -> str:
    names = sorted({n for s in summaries for n in s}, key=_group_order)
    head = "| step group | " + " | ".join(f"{lab} steps | {lab} batch | {lab} span ms | {lab} busy ms | "
                                          f"{lab} period ms | {lab} idle" for lab in labels)
    if len(labels) == 2:
        head += f" | period {labels[0]} / {labels[1]} |"
    else:
        head += " |"
    rows = [head, "|" + "---|" * (1 + 6 * len(labels) + (len(labels) == 2))]
    for name in names:
        cells = [name]
        for s in summaries:
            r = s.get(name)
            if r is None:
                cells += ["0"] + ["-"] * 5
                continue
            cells += [str(r["steps"]), f"{r['mean_generation']:.0f}", _fmt(r["span_ms"]), _fmt(r["busy_ms"]),
                      _fmt(r["period_ms"]), _fmt(r["idle_share"], ".0%")]
        if len(labels) == 2:
            a, b = (s.get(name, {}).get("period_ms") for s in summaries)
            cells.append(f"{a / b:.2f}" if a and b else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _short(kernel: str, width: int = 70) -> str:
    return kernel if len(kernel) <= width else kernel[:width - 3] + "..."


def kernel_table(labels: list[str], summaries: list[dict[str, dict]], group_name: str, top: int) -> str:
    """The `top` kernels of each trace in one step group (the union, ordered by the first trace's
    time), ms a step; the last row is every kernel."""
    tables = [s.get(group_name, {}).get("kernels_ms", {}) for s in summaries]
    names: list[str] = []
    for t in tables:
        names += [k for k in list(t)[:top] if k not in names]
    names.sort(key=lambda k: -max(t.get(k, 0.0) for t in tables))
    rows = [f"{group_name}: ms a step", "| kernel | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for k in names:
        rows.append(f"| {_short(k)} | " + " | ".join(f"{t[k]:.3f}" if k in t else "-" for t in tables) + " |")
    rows.append("| all kernels | " + " | ".join(f"{sum(t.values()):.3f}" for t in tables) + " |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", help="trace files or folders")
    ap.add_argument("--steps-json", default=None,
                    help="summarize the steps a --json of an earlier run saved (no traces needed)")
    ap.add_argument("--labels", default=None, help="comma-separated names of the traces (default: their names)")
    ap.add_argument("--json", default=None, help="write every step and the summaries here")
    ap.add_argument("--kernels", type=int, default=12, help="kernels listed a step group (0: none)")
    args = ap.parse_args(argv)
    if args.steps_json:
        again = resummarize(json.loads(Path(args.steps_json).read_text()))
        print(table(list(again), list(again.values())))
        return 0
    if not args.traces:
        ap.error("give trace files or folders, or --steps-json")
    labels = args.labels.split(",") if args.labels else [Path(t).name for t in args.traces]
    if len(labels) != len(args.traces):
        ap.error(f"{len(labels)} labels for {len(args.traces)} traces")
    summaries, dump = [], {}
    for label, given in zip(labels, args.traces):
        files = trace_files(Path(given))
        steps = steps_of(load_trace(files[0]))
        if not steps:
            raise SystemExit(f"trace_steps: {files[0]} has no execute_context_..._generation_... GPU ranges "
                             f"(profiled with a step-annotating server between /start_profile and /stop_profile?)")
        print(f"{label}: {files[0]} ({len(steps)} steps; {len(files) - 1} other trace files)", flush=True)
        summaries.append(summarize(steps))
        dump[label] = {"file": str(files[0]), "others": [str(f) for f in files[1:]],
                       "steps": [{k: v for k, v in st.items() if k != "kernels_us"} for st in steps],
                       "summary": summaries[-1]}
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=1))
    print(table(labels, summaries))
    if args.kernels:
        names = sorted({n for s in summaries for n in s}, key=_group_order)
        for name in names:
            if any(s.get(name, {}).get("kernels_ms") for s in summaries):
                print()
                print(kernel_table(labels, summaries, name, args.kernels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
