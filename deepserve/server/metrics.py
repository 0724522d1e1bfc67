"""Prometheus metrics at /metrics, in the text exposition format (written here, no client
library): gauges read from the engine snapshot (running / waiting requests, KV cache usage,
free blocks), counters (prompt and generation tokens, prefix-cache queries and hits,
preemptions, finished requests by reason) and latency histograms (time to first token,
inter-token latency, end-to-end latency) fed by AsyncLLM's request listener.

Names follow vLLM's with a `deepserve:` prefix, e.g. `deepserve:time_to_first_token_seconds`.
"""
from __future__ import annotations

import bisect
from collections import Counter
from typing import Callable, Optional

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)   # last: above every bound (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """Collects request timings (as AsyncLLM's listener) and renders the exposition text."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict]):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.snapshot = snapshot
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: Counter = Counter()
        self._last_output: dict[str, float] = {}
        self.http_errors: Counter = Counter()

    # AsyncLLM's RequestListener
    def on_output(self, request_id: str, arrival: float, now: float, new_tokens: int, first: bool) -> None:
        last = self._last_output.get(request_id)
        if first or last is None:
            self.ttft.observe(now - arrival)
            if new_tokens > 1:  # n > 1: the other samples' first tokens came in the same step
                self.itl.observe(0.0, new_tokens - 1)
        else:
            self.itl.observe((now - last) / new_tokens, new_tokens)
        self._last_output[request_id] = now

    def on_finish(self, request_id: str, arrival: float, now: float, prompt_tokens: int,
                  generation_tokens: int, reason: Optional[str]) -> None:
        self._last_output.pop(request_id, None)
        self.e2e.observe(now - arrival)
        self.finished[reason or "abort"] += 1

    def record_error(self, status: int) -> None:
        self.http_errors[status] += 1

    # exposition
    def render(self) -> str:
        snap = self.snapshot()
        lab = self.labels
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP deepserve:{name} {help_text}")
            lines.append(f"# TYPE deepserve:{name} {kind}")
            for suffix_labels, value in samples:
                lines.append(f"deepserve:{name}{{{lab}{suffix_labels}}} {value}")

        metric("num_requests_running", "gauge", "Requests in the running batch.",
               [("", snap.get("num_requests_running", 0))])
        metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
               [("", snap.get("num_requests_waiting", 0))])
        metric("kv_cache_usage_perc", "gauge", "Share of KV cache blocks in use (1 = full).",
               [("", snap.get("kv_cache_usage", 0.0))])
        metric("num_free_kv_blocks", "gauge", "KV cache blocks not held by any request.",
               [("", snap.get("num_free_blocks", 0))])
        metric("num_kv_blocks", "gauge", "KV cache blocks in the pool.", [("", snap.get("num_blocks", 0))])
        queries, hits = snap.get("prefix_cache_queries", 0), snap.get("prefix_cache_hits", 0)
        metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [("", queries)])
        metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
               [("", hits)])
        metric("prefix_cache_hit_rate", "gauge", "Prefix-cache hits / queries since start.",
               [("", hits / queries if queries else 0.0)])
        metric("num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
               [("", snap.get("num_preemptions", 0))])
        metric("prompt_tokens_total", "counter", "Prompt tokens accepted.", [("", snap.get("prompt_tokens", 0))])
        metric("generation_tokens_total", "counter", "Tokens generated.",
               [("", snap.get("generation_tokens", 0))])
        metric("request_success_total", "counter", "Requests ended, by finish reason.",
               [(f',finished_reason="{_escape(r)}"', n) for r, n in sorted(self.finished.items())]
               or [(',finished_reason="stop"', 0)])
        metric("http_errors_total", "counter", "Error responses sent, by status.",
               [(f',status="{s}"', n) for s, n in sorted(self.http_errors.items())]
               or [(',status="400"', 0)])
        for name, hist, help_text in (
                ("time_to_first_token_seconds", self.ttft, "Time from arrival to the first token."),
                ("inter_token_latency_seconds", self.itl, "Time between consecutive tokens."),
                ("e2e_request_latency_seconds", self.e2e, "Time from arrival to the last token.")):
            lines.append(f"# HELP deepserve:{name} {help_text}")
            lines.append(f"# TYPE deepserve:{name} histogram")
            lines.extend(hist.lines(f"deepserve:{name}", lab))
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value; for tests and `deepserve bench`-style scrapers."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
