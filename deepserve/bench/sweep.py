"""`deepserve bench sweep`: one `bench serve` run per concurrency and/or request rate.

The same request set (same dataset flags and seed) is sent at each setting, so the runs
differ only in load. Each run's JSON is written to `--result-dir` as `bench serve` would
write it; beside them go the sweep's combined JSON, a Markdown table, and a PNG chart of
output token throughput against median TPOT and median E2EL (the throughput/latency
trade-off curve users compare deployments with).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import datetime
from pathlib import Path

from deepserve.bench.datasets import sample_requests
from deepserve.bench.results import check_result_path
from deepserve.bench.serve import align_to_server, request_model_name, resolve_model, run_serve
from deepserve.engine.tokenizer import resolve_tokenizer

TABLE_COLUMNS = [  # (header, result key, format)
    ("max concurrency", "max_concurrency", "{}"),
    ("request rate", "request_rate", "{}"),
    ("completed", "completed", "{}"),
    ("failed", "failed", "{}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("total tok/s", "total_token_throughput", "{:.1f}"),
    ("median TTFT ms", "median_ttft_ms", "{:.1f}"),
    ("p99 TTFT ms", "p99_ttft_ms", "{:.1f}"),
    ("median TPOT ms", "median_tpot_ms", "{:.2f}"),
    ("p99 TPOT ms", "p99_tpot_ms", "{:.2f}"),
    ("median ITL ms", "median_itl_ms", "{:.2f}"),
    ("median E2EL ms", "median_e2el_ms", "{:.1f}"),
    ("p99 E2EL ms", "p99_e2el_ms", "{:.1f}"),
]


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (the chart
    is an extra: `deepserve[plot]`; the runs, table and JSON need nothing beyond the base install)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sweep_settings(args: argparse.Namespace) -> list[tuple]:
    """(max_concurrency, request_rate) pairs: the product of the two lists."""
    concs = args.max_concurrency_list or [args.max_concurrency]
    rates = args.request_rate_list or [args.request_rate]
    if not args.max_concurrency_list and not args.request_rate_list:
        raise ValueError("bench sweep needs --max-concurrency-list and/or --request-rate-list")
    for c in concs:   # 0: no limit, as bench serve's --max-concurrency 0 (vLLM's sweep passes it on)
        if c is not None and c < 0:
            raise ValueError(f"--max-concurrency-list values must be >= 0 (0: no limit), got {c}")
    for r in rates:
        if r <= 0:
            raise ValueError(f"--request-rate-list values must be > 0 (or inf), got {r}")
    return list(itertools.product(concs, rates))


def markdown_table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|"]
    for r in results:
        cells = []
        for _, key, fmt in TABLE_COLUMNS:
            value = r.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _point_label(r: dict) -> str:
    parts = []
    if r.get("max_concurrency"):
        parts.append(f"c={r['max_concurrency']}")
    if r.get("request_rate") not in (None, "inf"):
        parts.append(f"r={r['request_rate']:g}")
    return ",".join(parts) or "inf"


def draw_chart(plt, results: list[dict], path: Path, title: str) -> None:
    """Output tok/s (y) against median TPOT and median E2EL (x), one point per run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "median_tpot_ms", "median TPOT (ms)"),
                           (axes[1], "median_e2el_ms", "median E2EL (ms)")):
        xs = [r[key] for r in results]
        ys = [r["output_throughput"] for r in results]
        ax.plot(xs, ys, marker="o")
        for x, y, r in zip(xs, ys, results):
            ax.annotate(_point_label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("output tokens/s")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(args: argparse.Namespace) -> dict:
    """All runs of the sweep; returns {"runs": [...], "markdown": path, "chart": path or None, "json": path}."""
    from tqdm.auto import tqdm

    settings = sweep_settings(args)
    if args.percentile_metrics is None:   # the table and chart read E2EL too
        args.percentile_metrics = "ttft,tpot,itl,e2el"
    plt = _pyplot()
    if plt is None:
        print("bench sweep: matplotlib is not installed, so no chart (pip install 'deepserve[plot]'); "
              "the runs, the table and the JSON are written", file=sys.stderr)
    out_dir = Path(args.result_dir or ".")
    check_result_path(out_dir / "sweep.json", "--result-dir")
    args.model = resolve_model(args)
    tok = resolve_tokenizer(args.tokenizer, args.model)
    requests = align_to_server(args, sample_requests(args, tok), request_model_name(args, quiet=True), quiet=True)
    results = []
    bar = tqdm(settings, desc="sweep", disable=args.disable_tqdm, file=sys.stderr)
    for conc, rate in bar:
        bar.set_postfix_str(f"concurrency={conc} rate={rate:g}")
        run_args = argparse.Namespace(**vars(args))
        run_args.max_concurrency, run_args.request_rate = conc, rate
        run_args.save_result, run_args.result_filename, run_args.result_dir = True, None, str(out_dir)
        result = run_serve(run_args, tok=tok, requests=requests, quiet=True)
        results.append(result)
        print(f"sweep: concurrency={conc} rate={rate:g}: {result['completed']} ok, {result['failed']} failed, "
              f"{result['output_throughput']:.1f} output tok/s, median TPOT {result['median_tpot_ms']:.2f} ms",
              file=sys.stderr)
    stem = Path(args.result_filename).stem if args.result_filename else \
        f"sweep-{Path(str(args.model)).name}-{datetime.now():%Y%m%d-%H%M%S}"
    table = markdown_table(results)
    md_path, png_path, json_path = (out_dir / f"{stem}{ext}" for ext in (".md", ".png", ".json"))
    title = f"{args.model} · {args.dataset_name} · {len(requests)} prompts"
    chart = f"\n![chart]({png_path.name})\n" if plt else ""
    md_path.write_text(f"# bench sweep: {title}\n\n{table}{chart}")
    if plt:
        draw_chart(plt, results, png_path, title)
    else:
        png_path = None
    summary_keys = [key for _, key, _ in TABLE_COLUMNS] + ["result_path", "duration", "total_input_tokens",
                                                           "total_output_tokens", "request_goodput"]
    json_path.write_text(json.dumps({"model_id": args.model, "dataset_name": args.dataset_name,
                                     "num_prompts": len(requests),
                                     "runs": [{k: r.get(k) for k in summary_keys} for r in results]},
                                    indent=2))
    print(table)
    written = [p for p in (md_path, png_path, json_path) if p]
    print(f"sweep: wrote {', '.join(map(str, written))}", file=sys.stderr)
    return {"runs": results, "markdown": str(md_path), "chart": png_path and str(png_path), "json": str(json_path)}
