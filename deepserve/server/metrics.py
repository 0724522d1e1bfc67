"""Prometheus metrics at /metrics, through `prometheus_client`: gauges read from the engine
snapshot at scrape time (running / waiting requests, KV cache usage, free blocks), counters
(prompt and generation tokens, prefix-cache queries and hits (vLLM's external and
multi-modal cache counters beside them, at 0), preemptions, finished requests
by reason, error responses by status, operator calls and those run as Triton kernels, with
their share as a gauge; with --ops-profile the share of profiled kernel time by kind,
deepserve:ops_time_share{kind="triton"|"blas"|"torch"|"memcpy"}), latency histograms (time to
first token, inter-token latency, end-to-end latency; each ended request's queue, prefill,
decode and inference time and its mean time per output token, from the engine's timestamps)
and each ended request's prompt, generated and computed prompt tokens, its longest sample, n
and max_tokens (vLLM's request_* histograms, which its Grafana dashboard draws) and its prompt
tokens by source (computed or found in the prefix cache), fed by AsyncLLM's request listener.
The tokens of each engine step (vLLM's iteration_tokens_total), cache_config_info,
num_requests_waiting_by_reason and engine_sleep_state come from the engine.

Every metric is exposed under vLLM's name (`vllm:time_to_first_token_seconds`, ...), so
dashboards and alerts made for vLLM work unchanged, and the same series under a `deepserve:`
prefix; as in vLLM each series carries `model_name` and `engine`, the DP rank whose gauges it
reads or that served the request (engine="0" without data parallelism: vLLM's labels); beside
them the HTTP metrics vLLM's /metrics carries (prometheus-fastapi-instrumentator's
http_requests_total{method, status, handler}, http_request_duration_seconds, ...). Each server
has its own registry (several servers can live in one process).

With several API server processes (--api-server-count N > 1) the launcher sets
PROMETHEUS_MULTIPROC_DIR before it starts them (vLLM does the same): each process writes its
request counters and histograms to files there, and any process's /metrics sums them over all
(prometheus_client's MultiProcessCollector), so a scrape that reaches either process counts
every request. The engine's gauges and counters are the cores' own, which every API server
receives, so they are reported once, not summed.
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Iterator, Optional, Union

from prometheus_client import CollectorRegistry, Counter, Histogram, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from deepserve.engine.async_llm import FinishedRequest
from deepserve.engine.scheduler import STEP_TOKEN_BUCKETS
from deepserve.ops.profile import KINDS as OPS_TIME_KINDS

PREFIX = "deepserve:"
ALIAS = "vllm:"

# every bound of vLLM 0.26's buckets is one of ours (an alert on a vLLM `le` finds its bucket);
# ours add finer ones where a fast accelerator's latencies fall
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's for the phases of a request (queue, prefill, decode, inference)
PHASE_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's FinishReason values, present from the start at 0 (alerts on "error" find the series)
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
# the HTTP metrics vLLM's /metrics has from prometheus-fastapi-instrumentator, which leaves out
# these routes, groups statuses by hundreds ("2xx") and names each route by its template
HTTP_UNCOUNTED_PATHS = frozenset(("/metrics", "/health", "/load", "/ping", "/version", "/server_info"))
HTTP_HIGHR_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 7.5,
                      10, 30, 60)
HTTP_LOWR_BUCKETS = (0.1, 0.5, 1)
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")   # vLLM's, at 0 from the start


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's buckets of per-request token counts: 1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return tuple(buckets)
            buckets.append(m * scale)
        scale *= 10

# (name, help, snapshot key) of the values the engine keeps itself
GAUGES = (("num_requests_running", "Requests in the running batch.", "num_requests_running"),
          ("num_requests_waiting", "Requests waiting to be scheduled.", "num_requests_waiting"),
          ("kv_cache_usage_perc", "Share of KV cache blocks in use (1 = full).", "kv_cache_usage"),
          ("num_free_kv_blocks", "KV cache blocks not held by any request.", "num_free_blocks"),
          ("num_kv_blocks", "KV cache blocks in the pool.", "num_blocks"),
          ("kv_cache_capacity_tokens", "Tokens the KV cache pool holds (blocks x block size; "
           "twice as many with --kv-cache-dtype fp8).", "kv_cache_capacity_tokens"))
COUNTERS = (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("spec_decode_num_drafts", "Speculative decoding: sequence steps that drafted.", "spec_decode_num_drafts"),
            ("spec_decode_num_draft_tokens", "Speculative decoding: draft tokens proposed.",
             "spec_decode_num_draft_tokens"),
            ("spec_decode_num_accepted_tokens", "Speculative decoding: draft tokens accepted.",
             "spec_decode_num_accepted_tokens"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
            # vLLM's KV connector and multi-modal caches, which deepserve does not have: 0, as vLLM's without them
            ("external_prefix_cache_queries", "External (KV connector) prefix cache queries: none (no KV "
             "connector).", "external_prefix_cache_queries"),
            ("external_prefix_cache_hits", "External (KV connector) prefix cache hits: none (no KV connector).",
             "external_prefix_cache_hits"),
            ("mm_cache_queries", "Multi-modal cache queries: none (text-only models).", "mm_cache_queries"),
            ("mm_cache_hits", "Multi-modal cache hits: none (text-only models).", "mm_cache_hits"),
            ("num_preemptions", "Sequences preempted for lack of KV blocks.", "num_preemptions"),
            ("prompt_tokens", "Prompt tokens accepted.", "prompt_tokens"),
            ("generation_tokens", "Tokens generated.", "generation_tokens"),
            ("op_calls", "Operator calls counted on the DP rank's first worker (its start-up step; every call "
             "with DEEPSERVE_OPS_COUNT=1).", "op_calls"),
            ("triton_op_calls", "Of those, the calls that ran as Triton kernels.", "triton_op_calls"))


class _EngineCollector:
    """The gauges and counters of the engine snapshots, read when scraped: one series per DP
    rank, labelled with its index as vLLM's `engine` label (vLLM's PrometheusStatLogger)."""

    def __init__(self, model_name: str, snapshot: Callable[[], Union[dict, list[dict]]],
                 cache_info: Optional[dict] = None):
        self.model_name, self.snapshot, self.cache_info = model_name, snapshot, cache_info

    def collect(self) -> Iterator[Metric]:
        snaps = self.snapshot()
        ranks = list(enumerate(snaps if isinstance(snaps, list) else [snaps]))
        yield self._step_tokens(ranks)
        yield from self._vllm_states(ranks)
        if self.cache_info is not None:   # vLLM's info gauge: the cache's settings as labels, value 1
            names = [*self.cache_info, "num_gpu_blocks", "engine"]
            info = GaugeMetricFamily(PREFIX + "cache_config_info", "Information of the LLMEngine CacheConfig",
                                     labels=names)
            for i, snap in ranks:
                info.add_metric([*self.cache_info.values(), str(snap.get("num_blocks", 0)), str(i)], 1.0)
            yield info
        for name, help_text, key in GAUGES:
            yield self._family(GaugeMetricFamily, name, help_text, ranks, lambda snap, key=key: snap.get(key, 0))
        for name, help_text, key in COUNTERS:
            yield self._family(CounterMetricFamily, name, help_text, ranks, lambda snap, key=key: snap.get(key, 0))
        per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                      "Speculative decoding: draft tokens accepted at each draft position.",
                                      labels=["model_name", "engine", "position"])
        for i, snap in ranks:
            for j, v in sorted((int(k.rsplit("_", 1)[1]), v) for k, v in snap.items()
                               if k.startswith("spec_decode_num_accepted_tokens_per_pos_")):
                per_pos.add_metric([self.model_name, str(i), str(j)], v)
        if per_pos.samples:
            yield per_pos
        yield self._family(GaugeMetricFamily, "prefix_cache_hit_rate", "Prefix-cache hits / queries since start.",
                           ranks, lambda snap: _share(snap.get("prefix_cache_hits", 0), snap.get("prefix_cache_queries", 0)))
        yield self._family(GaugeMetricFamily, "triton_op_call_share", "Share of the counted operator calls "
                           "that ran as Triton kernels (--ops triton).", ranks,
                           lambda snap: _share(snap.get("triton_op_calls", 0), snap.get("op_calls", 0)))
        yield from self._ops_time(ranks)

    def _vllm_states(self, ranks: list[tuple[int, dict]]) -> Iterator[Metric]:
        """vLLM's waiting requests by reason (all wait for capacity here: nothing defers them)
        and its sleep-state gauge (always awake: there is no sleep mode)."""
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting_by_reason", "Requests waiting, by reason: "
                                    "capacity (scheduling room) or deferred (none here).",
                                    labels=["model_name", "engine", "reason"])
        sleep = GaugeMetricFamily(PREFIX + "engine_sleep_state", "Engine sleep state: awake 1 (there is no sleep "
                                  "mode).", labels=["model_name", "engine", "sleep_state"])
        for i, snap in ranks:
            waiting.add_metric([self.model_name, str(i), "capacity"], snap.get("num_requests_waiting", 0))
            waiting.add_metric([self.model_name, str(i), "deferred"], 0)
            for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
                sleep.add_metric([self.model_name, str(i), state], value)
        yield waiting
        yield sleep

    def _step_tokens(self, ranks: list[tuple[int, dict]]) -> Metric:
        """vLLM's iteration_tokens_total: a histogram of the tokens each engine step computed."""
        family = HistogramMetricFamily(PREFIX + "iteration_tokens_total", "Histogram of number of tokens per "
                                       "engine_step.", labels=["model_name", "engine"])
        bounds = [str(float(b)) for b in STEP_TOKEN_BUCKETS] + ["+Inf"]
        for i, snap in ranks:
            counts = [snap.get(f"step_tokens_le_{b}", 0) for b in STEP_TOKEN_BUCKETS] + [snap.get("step_tokens_le_inf", 0)]
            cumulative, total = [], 0
            for bound, count in zip(bounds, counts):
                total += count
                cumulative.append((bound, total))
            family.add_metric([self.model_name, str(i)], cumulative, snap.get("step_tokens_sum", 0))
        return family

    def _ops_time(self, ranks: list[tuple[int, dict]]) -> Iterator[Metric]:
        """--ops-profile: the share of profiled kernel time per kind (deepserve/ops/profile.py)."""
        share = GaugeMetricFamily(PREFIX + "ops_time_share", "--ops-profile: share of the profiled steps' kernel "
                                  "time (CPU: op time) by kind: triton, blas (cuBLAS/cuDNN), torch, memcpy.",
                                  labels=["model_name", "engine", "kind"])
        profiled = []
        for i, snap in ranks:
            spent = {k: snap[f"ops_time_us_{k}"] for k in OPS_TIME_KINDS if f"ops_time_us_{k}" in snap}
            if spent:
                profiled.append((i, snap))
                total = sum(spent.values())
                for kind, us in spent.items():
                    share.add_metric([self.model_name, str(i), kind], us / total if total else 0.0)
        if profiled:
            yield share
            yield self._family(CounterMetricFamily, "ops_profiled_steps", "--ops-profile: engine steps profiled "
                               "(start-up generation and windows).", profiled,
                               lambda snap: snap.get("ops_profiled_steps", 0))

    def _family(self, kind, name: str, help_text: str, ranks: list[tuple[int, dict]],
                value: Callable[[dict], float]) -> Metric:
        family = kind(PREFIX + name, help_text, labels=["model_name", "engine"])
        for i, snap in ranks:
            family.add_metric([self.model_name, str(i)], value(snap))
        return family


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


class _Aliased:
    """Every deepserve: family of `inner` under its own name and again with the vLLM prefix."""

    def __init__(self, inner: CollectorRegistry):
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            yield family
            if not family.name.startswith(PREFIX):   # the http_* metrics: one name, as vLLM's
                continue
            alias = Metric(ALIAS + family.name[len(PREFIX):], family.documentation, family.type)
            alias.samples = [s._replace(name=ALIAS + s.name[len(PREFIX):]) for s in family.samples]
            yield alias


class _SharedFilesCollector(MultiProcessCollector):
    """prometheus_client's collector over the API servers' metric files, skipping a file
    another process has created but not yet sized (prometheus_client opens it empty, then
    grows it): reading that one raises, so a scrape, or an API server registering its metrics
    while another starts, would fail on it."""

    def collect(self):
        files = []
        for name in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(name) >= 8:   # the used-bytes header and its padding
                    files.append(name)
            except OSError:  # removed meanwhile (a stopped server's files)
                pass
        return self.merge(files, accumulate=True)


class ServerMetrics:
    """Collects request timings (as AsyncLLM's listener) and renders the exposition text."""

    def __init__(self, model_name: str, snapshot: Callable[[], Union[dict, list[dict]]],
                 api_server: Optional[int] = None, max_model_len: int = 1 << 17, cache_info: Optional[dict] = None,
                 engines: int = 1):
        """`snapshot`: the engine's gauges, or each DP rank's (AsyncLLM.rank_snapshots).
        `api_server`: this process's index among several API servers; their requests are
        then also counted per API server (`api_server_requests`). `max_model_len`: the top of
        the token-count histograms' buckets. `cache_info`: the KV cache's settings, the labels
        of cache_config_info (cache_info_labels). `engines`: the DP ranks, whose request
        series (engine="0", "1", ...) are served from the start, at 0."""
        inner = CollectorRegistry(auto_describe=True)
        inner.register(_EngineCollector(model_name, snapshot, cache_info))
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared_dir:  # the request metrics of every API server process, read from their files
            _SharedFilesCollector(inner, shared_dir)
        own = None if shared_dir else inner   # (registered, they would show this process's alone too)

        ranks = [str(i) for i in range(engines)]

        def histogram(name: str, help_text: str, buckets: tuple[float, ...]) -> list:
            """The histogram's series of each DP rank."""
            family = Histogram(PREFIX + name, help_text, ["model_name", "engine"], buckets=buckets, registry=own)
            return [family.labels(model_name, rank) for rank in ranks]

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of each ended request.",
                                       token_buckets(max_model_len))
        self.generation_tokens = histogram("request_generation_tokens", "Tokens generated for each ended request "
                                           "(each sample of n counted as one).", token_buckets(max_model_len))
        self.queue_time = histogram("request_queue_time_seconds", "Time from arrival to the first admission "
                                    "to run.", PHASE_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds", "Time from the first admission to run to "
                                      "the first token.", PHASE_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "Time from the first token to the last.",
                                     PHASE_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds", "Time from the first admission to "
                                        "run to the last token.", PHASE_BUCKETS)
        self.request_tpot = histogram("request_time_per_output_token_seconds", "Each ended request's decode time per "
                              "token after its first.", TPOT_BUCKETS)
        self.computed_prompt_tokens = histogram("request_prefill_kv_computed_tokens", "Prompt tokens each ended "
                                                "request computed (not found in the prefix cache).",
                                                token_buckets(max_model_len))
        self.max_sample_tokens = histogram("request_max_num_generation_tokens", "Tokens of each ended request's "
                                           "longest sample.", token_buckets(max_model_len))
        self.params_n = histogram("request_params_n", "The n of each ended request (once for its n samples).", N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens", "The max_tokens of each ended request.",
                                           token_buckets(max_model_len))
        finished = Counter(PREFIX + "request_success", "Requests ended, by finish reason.",
                           ["model_name", "engine", "finished_reason"], registry=own)
        self.finished = lambda engine, reason: finished.labels(model_name, str(engine), reason)
        by_source = Counter(PREFIX + "prompt_tokens_by_source", "Prompt tokens of ended requests by source: "
                            "local_compute, local_cache_hit (prefix cache), external_kv_transfer (none here).",
                            ["model_name", "engine", "source"], registry=own)
        self.prompt_by_source = [{source: by_source.labels(model_name, rank, source) for source in PROMPT_SOURCES}
                                 for rank in ranks]
        for rank in ranks:
            for reason in FINISH_REASONS:
                self.finished(rank, reason)
        cached = Counter(PREFIX + "prompt_tokens_cached", "Prompt tokens of ended requests found in the prefix "
                         "cache.", ["model_name", "engine"], registry=own)
        self.prompt_cached = [cached.labels(model_name, rank) for rank in ranks]
        self._http_metrics(own)
        errors = Counter(PREFIX + "http_errors", "Error responses sent, by status.", ["model_name", "status"],
                         registry=own)
        self.http_errors = lambda status: errors.labels(model_name, str(status))
        self.served = None
        if api_server is not None:
            self.served = Counter(PREFIX + "api_server_requests", "Requests ended, by the API server process "
                                  "that served them.", ["model_name", "api_server"],
                                  registry=own).labels(model_name, str(api_server))
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Aliased(inner))
        self._last_output: dict[str, list] = {}   # request id -> each sample's last output time

    # AsyncLLM's RequestListener
    def on_output(self, request_id: str, arrival: float, now: float, new_tokens: list[int], first: bool,
                  engine: int = 0) -> None:
        """Each sample's first output is a time to first token and its tokens after its first
        are inter-token gaps of that sample (vLLM times each of n samples as a request of its
        own), a sample's k new tokens splitting the time since its last output. `engine`: the DP
        rank whose series they go to."""
        last = self._last_output.get(request_id)
        if first or last is None:
            last = self._last_output[request_id] = []
        last += [None] * (len(new_tokens) - len(last))
        for i, k in enumerate(new_tokens):
            if not k:
                continue
            if last[i] is None:   # its first token is no gap, those that came with it none either
                self.ttft[engine].observe(now - arrival)
                gaps = [0.0] * (k - 1)
            else:
                gaps = [(now - last[i]) / k] * k
            for gap in gaps:
                self.itl[engine].observe(gap)
            last[i] = now

    def on_finish(self, request_id: str, arrival: float, now: float, finished: FinishedRequest) -> None:
        """As vLLM, which runs each of n samples as a request of its own: the finish reasons,
        latencies, phases, token counts (prompt tokens by source too) and max_tokens once per sample; n and the longest
        sample's tokens (request_params_n, request_max_num_generation_tokens) once per request."""
        last = self._last_output.pop(request_id, None) or []
        e = finished.engine
        computed = finished.prompt_tokens - finished.cached_tokens
        outputs = [t for t in last if t is not None]
        for i, (tokens, reason) in enumerate(finished.each_sample()):
            # a sample that ended on its own did so at its last output, before the request's last
            own = reason not in ("abort", "error") and i < len(last) and last[i] is not None
            early = max(outputs) - last[i] if own else 0.0
            self.e2e[e].observe(now - early - arrival)
            self.prompt_tokens[e].observe(finished.prompt_tokens)
            self.generation_tokens[e].observe(tokens)
            self.computed_prompt_tokens[e].observe(computed)
            if finished.max_tokens is not None:
                self.params_max_tokens[e].observe(finished.max_tokens)
            self._observe_phases(e, finished.timings, tokens, early)
            self.finished(e, reason).inc()
        samples = len(finished.each_sample())
        self.prompt_by_source[e]["local_compute"].inc(computed * samples)
        self.prompt_by_source[e]["local_cache_hit"].inc(finished.cached_tokens * samples)
        self.prompt_cached[e].inc(finished.cached_tokens * samples)
        self.max_sample_tokens[e].observe(finished.max_sample_tokens)
        self.params_n[e].observe(finished.n)
        if self.served is not None:
            self.served.inc()

    def _observe_phases(self, e: int, t: dict, tokens: int, early: float = 0.0) -> None:
        """Queue, prefill, decode and inference times from the engine's timestamps (one clock:
        the engine core's), each where the request reached both of its ends. `early`: how long
        before the request's last token this sample had its last."""
        arrival, scheduled = t.get("arrival_time"), t.get("first_scheduled_time")
        first, last = t.get("first_token_time"), t.get("last_token_time")
        if last is not None and first is not None:
            last = max(first, last - early)
        if arrival is not None and scheduled is not None:
            self.queue_time[e].observe(max(0.0, scheduled - arrival))
        if scheduled is not None and first is not None:
            self.prefill_time[e].observe(max(0.0, first - scheduled))
        if first is not None and last is not None:
            self.decode_time[e].observe(last - first)
            self.request_tpot[e].observe((last - first) / (tokens - 1) if tokens > 1 else 0.0)
        if scheduled is not None and last is not None:
            self.inference_time[e].observe(max(0.0, last - scheduled))

    def _http_metrics(self, registry) -> None:
        self.http_total = Counter("http_requests_total", "Total number of requests by method, status and handler.",
                                  ["method", "status", "handler"], registry=registry)
        self.http_in_size = Summary("http_request_size_bytes", "Content length of incoming requests by handler "
                                    "(the header's; 0 without one).", ["handler"], registry=registry)
        self.http_out_size = Summary("http_response_size_bytes", "Content length of outgoing responses by handler "
                                     "(the header's; 0 for streams).", ["handler"], registry=registry)
        self.http_highr = Histogram("http_request_duration_highr_seconds", "Latency with many buckets but no API "
                                    "specific labels.", buckets=HTTP_HIGHR_BUCKETS, registry=registry)
        self.http_lowr = Histogram("http_request_duration_seconds", "Latency with only few buckets by handler.",
                                   ["method", "handler"], buckets=HTTP_LOWR_BUCKETS, registry=registry)

    def record_http(self, method: str, status: int, handler: str, seconds: float, in_bytes: int,
                    out_bytes: int) -> None:
        """One HTTP request answered (a stream: once it ended); `handler`: its route's template,
        "none" for a path no route has."""
        self.http_total.labels(method, f"{status // 100}xx", handler).inc()
        self.http_in_size.labels(handler).observe(in_bytes)
        self.http_out_size.labels(handler).observe(out_bytes)
        self.http_highr.observe(seconds)
        self.http_lowr.labels(method, handler).observe(seconds)

    def record_error(self, status: int) -> None:
        self.http_errors(status).inc()

    def render(self) -> str:
        return generate_latest(self.registry).decode()


def cache_info_labels(cache) -> dict:
    """vllm:cache_config_info's labels (vLLM's CacheConfig names) of a CacheConfig; the number
    of blocks is added at each scrape (the engine cores size the pool)."""
    return {"block_size": str(cache.block_size), "cache_dtype": str(cache.kv_cache_dtype),
            "enable_prefix_caching": str(cache.enable_prefix_caching),
            "gpu_memory_utilization": str(cache.gpu_memory_utilization),
            "kv_cache_memory_bytes": str(cache.kv_cache_memory_bytes),
            "num_gpu_blocks_override": str(cache.num_gpu_blocks_override),
            "prefix_caching_hash_algo": str(cache.prefix_caching_hash_algo)}


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name with its labels -> value, e.g. `deepserve:request_success_total{model_name="m",
    engine="0",finished_reason="stop"}` (model_name first, then the others as exposed); for tests
    and scrapers."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sorted(sample.labels.items(), key=lambda kv: kv[0] != "model_name")
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            values[f"{sample.name}{{{inner}}}" if inner else sample.name] = sample.value
    return values


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
