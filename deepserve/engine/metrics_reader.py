"""LLM.get_metrics(): the engine's counters, gauges and its one histogram (tokens per step) as
vLLM's metric snapshot (vllm/v1/metrics/reader.py): a list of Counter / Gauge / Vector /
Histogram records under vLLM's metric names, labelled with the model name and the engine index.
Only the metrics vLLM also has are listed; `deepserve serve`'s /metrics (server/metrics.py) shows
deepserve's own too, and the request latency histograms."""
from __future__ import annotations

from dataclasses import dataclass

from deepserve.engine.scheduler import STEP_TOKEN_BUCKETS


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Vector(Metric):
    """Counters by position (vllm:spec_decode_num_accepted_tokens_per_pos)."""
    values: list[int]


@dataclass
class Histogram(Metric):
    """vLLM's record of a histogram: `buckets` maps each upper bound ("8.0", ..., "+Inf") to
    the observations at or below it. The engine keeps vllm:iteration_tokens_total; the request
    latency histograms are the API server's (/metrics)."""
    count: int
    sum: float
    buckets: dict[str, int]


# (vLLM's name, gauges() key)
GAUGES = (("vllm:num_requests_running", "num_requests_running"),
          ("vllm:num_requests_waiting", "num_requests_waiting"),
          ("vllm:kv_cache_usage_perc", "kv_cache_usage"))
COUNTERS = (("vllm:num_preemptions", "num_preemptions"),
            ("vllm:prompt_tokens", "prompt_tokens"),
            ("vllm:generation_tokens", "generation_tokens"),
            ("vllm:prefix_cache_queries", "prefix_cache_queries"),
            ("vllm:prefix_cache_hits", "prefix_cache_hits"),
            ("vllm:spec_decode_num_drafts", "spec_decode_num_drafts"),
            ("vllm:spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens"),
            ("vllm:spec_decode_num_accepted_tokens", "spec_decode_num_accepted_tokens"))
PER_POS = "spec_decode_num_accepted_tokens_per_pos_"


def metrics_snapshot(gauges: dict, model_name: str) -> list[Metric]:
    """`gauges` (LLMEngine.gauges()) as vLLM's metric records; the speculative-decoding ones
    only where it runs, as vLLM registers them."""
    labels = {"model_name": model_name, "engine": "0"}
    out: list[Metric] = [Gauge(name, dict(labels), float(gauges.get(key, 0))) for name, key in GAUGES]
    out += [Counter(name, dict(labels), int(gauges[key])) for name, key in COUNTERS if key in gauges]
    per_pos = sorted((int(k[len(PER_POS):]), v) for k, v in gauges.items() if k.startswith(PER_POS))
    if per_pos:
        out.append(Vector("vllm:spec_decode_num_accepted_tokens_per_pos", dict(labels), [v for _, v in per_pos]))
    buckets, seen = {}, 0
    for bound in [*STEP_TOKEN_BUCKETS, "inf"]:
        seen += int(gauges.get(f"step_tokens_le_{bound}", 0))
        buckets["+Inf" if bound == "inf" else str(float(bound))] = seen
    out.append(Histogram("vllm:iteration_tokens_total", dict(labels), seen, float(gauges.get("step_tokens_sum", 0)),
                         buckets))
    return out
