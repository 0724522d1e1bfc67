"""Serving metrics from timed requests, with vLLM `bench serve`'s definitions and field names.

Per request: TTFT, E2EL, the ITLs between text chunks, and TPOT = (E2EL - TTFT) /
(output_tokens - 1) (only for outputs longer than one token). Over the run: mean, median,
std and percentiles of each (reported in ms), request / input / output / total token
throughput over the wall time of the run, and goodput: requests per second that met every
SLO given with `--goodput ttft:MS tpot:MS e2el:MS`. Failed requests count in `failed`,
keep their error in `errors`, and add nothing to the latency statistics.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from deepserve.bench.client import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_HEADERS = {"ttft": ("TTFT", "Time to First Token"),
                  "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
                  "itl": ("ITL", "Inter-token Latency"),
                  "e2el": ("E2EL", "End-to-end Latency")}
DEFAULT_METRICS = ("ttft", "tpot", "itl")   # vLLM's default --percentile-metrics for generation
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(items: Optional[Sequence[str]]) -> dict[str, float]:
    """`["ttft:100", "tpot:50"]` -> {"ttft": 100.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput takes NAME:MS with NAME in {', '.join(GOODPUT_METRICS)}, got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput value must be a number of milliseconds, got {item!r}") from None
        if ms < 0:
            raise ValueError(f"--goodput value must be >= 0 ms, got {item!r}")
        slos[name] = ms
    return slos


def percentile_key(p: float) -> str:
    return f"p{int(p) if float(p).is_integer() else p}"


def _stats(name: str, values_s: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0 if values_s else np.zeros(1)
    out = {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(np.std(ms))}
    for p in percentiles:
        out[f"{percentile_key(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def _busiest_second(outputs: Sequence[RequestOutput], buckets: Callable[[RequestOutput, float], Iterable[int]]) -> int:
    """vLLM's one-second buckets, numbered from the first successful request's send t0: the
    largest count over the successful requests of `buckets(o, t0)` (the buckets o counts in)."""
    done = [o for o in outputs if o.success]
    if not done:
        return 0
    t0 = min(o.start_time for o in done)
    counts: dict[int, int] = {}
    for o in done:
        for bucket in buckets(o, t0):
            counts[bucket] = counts.get(bucket, 0) + 1
    return max(counts.values())


def peak_concurrency(outputs: Sequence[RequestOutput]) -> int:
    """vLLM's max_concurrent_requests: the most requests active (from send to last token) in one
    second of the run; a request counts in every second it touches, so requests that follow each
    other within a second all count there."""
    return _busiest_second(outputs, lambda o, t0: range(int(o.start_time - t0), int(o.start_time + o.latency - t0) + 1))


def peak_output_tokens_per_s(outputs: Sequence[RequestOutput]) -> float:
    """Most text chunks (streamed tokens) received in one second of the run (vLLM's
    max_output_tokens_per_s)."""
    return float(_busiest_second(outputs, lambda o, t0: (int(t - t0) for t in np.cumsum([o.start_time + o.ttft,
                                                                                         *o.itl]))))


def compute_metrics(outputs: Sequence[RequestOutput], duration: float,
                    count_tokens: Callable[[str], int], percentiles: Sequence[float] = (99,),
                    goodput: Optional[dict[str, float]] = None, metrics: Sequence[str] = METRICS) -> dict:
    """The result fields of one run (vLLM names); `duration` in seconds. Mean, median, std and
    `percentiles` are given for the latencies named in `metrics` only, as vLLM stores them."""
    if duration <= 0:
        raise ValueError(f"benchmark duration must be > 0 s, got {duration}")
    output_lens, ttfts, tpots, itls, e2els = [], [], [], [], []
    good = 0
    total_input = completed = 0
    for o in outputs:
        if not o.success:
            output_lens.append(0)
            continue
        n = o.output_tokens if o.output_tokens else count_tokens(o.generated_text)
        output_lens.append(n)
        total_input += o.prompt_len
        completed += 1
        tpot = (o.latency - o.ttft) / (n - 1) if n > 1 else 0.0
        if n > 1:
            tpots.append(tpot)
        ttfts.append(o.ttft)
        itls.extend(o.itl)
        e2els.append(o.latency)
        if goodput:
            measured = {"ttft": o.ttft, "tpot": tpot, "e2el": o.latency}
            good += all(measured[k] * 1000.0 <= slo for k, slo in goodput.items())
    total_output = int(sum(output_lens))
    result = {
        "duration": duration,
        "completed": completed,
        "failed": len(outputs) - completed,
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / duration,
        "request_goodput": good / duration if goodput else None,
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": peak_output_tokens_per_s(outputs),
        "max_concurrent_requests": peak_concurrency(outputs),
        "rtfx": 0.0,   # vLLM's inverse real-time factor, which only audio requests have
    }
    latencies = {"ttft": ttfts, "tpot": tpots, "itl": itls, "e2el": e2els}
    for name in metrics:
        result.update(_stats(name, latencies[name], percentiles))
    result.update({
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    })
    return result


def parse_spec_decode_counters(text: str) -> Optional[dict]:
    """vLLM's speculative-decoding counters (vllm:spec_decode_*_total) from a /metrics page,
    summed over their label sets: num_drafts, num_draft_tokens, num_accepted_tokens and
    per_pos {position: accepted}; None when the page has none (no speculative decoding)."""
    out: dict = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "per_pos": {}}
    found = False
    for line in text.splitlines():
        if not line.startswith("vllm:spec_decode_"):
            continue
        name = line.split(" ", 1)[0].split("{", 1)[0]
        if not name.endswith("_total"):
            continue
        try:
            value = int(float(line.rsplit(" ", 1)[1]))
        except (IndexError, ValueError):
            continue
        key = name[len("vllm:spec_decode_"):-len("_total")]
        if key == "num_accepted_tokens_per_pos":
            position = line.partition('position="')[2].partition('"')[0]
            if position.isdigit():
                out["per_pos"][int(position)] = out["per_pos"].get(int(position), 0) + value
                found = True
        elif key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            out[key] += value
            found = True
    return out if found else None


def spec_decode_fields(before: Optional[dict], after: Optional[dict]) -> dict:
    """vLLM's spec_decode_* result fields from the counters before and after the run (empty
    when the server drafted nothing in between)."""
    if before is None or after is None:
        return {}
    drafts = after["num_drafts"] - before["num_drafts"]
    draft_tokens = after["num_draft_tokens"] - before["num_draft_tokens"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    if draft_tokens <= 0:
        return {}
    positions = sorted(set(before["per_pos"]) | set(after["per_pos"]))
    per_pos = [(after["per_pos"].get(p, 0) - before["per_pos"].get(p, 0)) / drafts for p in positions] \
        if drafts > 0 else []
    return {"spec_decode_acceptance_rate": accepted / draft_tokens * 100.0,
            "spec_decode_acceptance_length": 1.0 + accepted / drafts if drafts > 0 else 0.0,
            "spec_decode_num_drafts": drafts, "spec_decode_draft_tokens": draft_tokens,
            "spec_decode_accepted_tokens": accepted, "spec_decode_per_position_acceptance_rates": per_pos}


def format_summary(result: dict, percentiles: Sequence[float] = (99,),
                   metrics: Sequence[str] = DEFAULT_METRICS) -> str:
    """The result table `vllm bench serve` prints, as one string."""
    rows = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label, value, fmt="{:<10}"):
        rows.append(("{:<40} " + fmt).format(label, value))

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency") is not None:
        row("Maximum request concurrency:", result["max_concurrency"])
    rate = result.get("request_rate")
    if rate not in (None, "inf", float("inf")):
        row("Request rate configured (RPS):", float(rate), "{:<10.2f}")
    row("Benchmark duration (s):", result["duration"], "{:<10.2f}")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], "{:<10.2f}")
    if result.get("request_goodput") is not None:
        row("Request goodput (req/s):", result["request_goodput"], "{:<10.2f}")
    row("Output token throughput (tok/s):", result["output_throughput"], "{:<10.2f}")
    row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"], "{:<10.2f}")
    row("Peak concurrent requests:", result["max_concurrent_requests"], "{:<10.2f}")   # vLLM's format
    row("Total token throughput (tok/s):", result["total_token_throughput"], "{:<10.2f}")
    for name in metrics:
        short, header = METRIC_HEADERS[name]
        rows.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", result[f"mean_{name}_ms"], "{:<10.2f}")
        row(f"Median {short} (ms):", result[f"median_{name}_ms"], "{:<10.2f}")
        for p in percentiles:
            key = percentile_key(p)
            row(f"{key.upper()} {short} (ms):", result[f"{key}_{name}_ms"], "{:<10.2f}")
    if "spec_decode_acceptance_rate" in result:
        rows.append("{s:{c}^{n}}".format(s="Speculative Decoding", n=50, c="-"))
        row("Acceptance rate (%):", result["spec_decode_acceptance_rate"], "{:<10.2f}")
        row("Acceptance length:", result["spec_decode_acceptance_length"], "{:<10.2f}")
        row("Drafts:", result["spec_decode_num_drafts"])
        row("Draft tokens:", result["spec_decode_draft_tokens"])
        row("Accepted tokens:", result["spec_decode_accepted_tokens"])
        if result["spec_decode_per_position_acceptance_rates"]:
            rows.append("Per-position acceptance (%):")
            for i, rate in enumerate(result["spec_decode_per_position_acceptance_rates"]):
                row(f"  Position {i}:", rate * 100.0, "{:<10.2f}")
    rows.append("=" * 50)
    return "\n".join(rows)
