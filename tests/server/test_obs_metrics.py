"""vLLM's request and engine metrics at /metrics, checked against what was sent: the phases of
each request (queue, prefill, decode, inference, time per output token), its n / max_tokens /
longest sample / computed prompt tokens, the tokens of each engine step, finish reasons
(error included) and cache_config_info. As vLLM 0.26, which runs each of a request's n samples
as a child request, request_success_total, time_to_first_token, inter_token_latency,
e2e_request_latency, the queue / prefill / decode / inference / per-output-token times and
request_prompt_tokens, request_generation_tokens, request_prefill_kv_computed_tokens and
request_params_max_tokens, prompt_tokens_total and prompt_tokens_by_source count once per
sample; request_params_n and request_max_num_generation_tokens once per request."""
from __future__ import annotations

import asyncio

import pytest

from deepserve.config import EngineArgs
from deepserve.engine.async_llm import AsyncLLM, EngineStepError, FinishedRequest
from deepserve.engine.sampling_params import SamplingParams
from deepserve.server.metrics import ServerMetrics, cache_info_labels, parse_metrics

LAB = 'model_name="demo",engine="0"'


async def drain(llm: AsyncLLM, prompt, params: SamplingParams, rid: str):
    last = None
    async for out in llm.generate(prompt, params, rid):
        last = out
    return last


def test_request_phases_params_and_step_tokens():
    llm = AsyncLLM.from_engine_args(EngineArgs(num_gpu_blocks_override=64, async_scheduling=False))
    metrics = ServerMetrics("demo", lambda: llm.snapshot, max_model_len=llm.max_model_len,
                            cache_info=cache_info_labels(llm.engine.config.cache))
    llm.listener = metrics
    prompt = {"prompt_token_ids": [1, 403, 407, 261, 378]}   # 5 tokens
    seen = {}

    async def main():
        llm.start()
        try:
            out = await drain(llm, prompt, SamplingParams(max_tokens=7, temperature=0, ignore_eos=True), "a")
            assert len(out.outputs[0].token_ids) == 7
            values = parse_metrics(metrics.render())
            # one request: a 5-token prefill, then 6 one-token decode steps
            assert values[f"vllm:iteration_tokens_total_count{{{LAB}}}"] == 7
            assert values[f"vllm:iteration_tokens_total_sum{{{LAB}}}"] == 5 + 6
            assert values[f'vllm:iteration_tokens_total_bucket{{{LAB},le="1.0"}}'] == 6
            assert values[f'vllm:iteration_tokens_total_bucket{{{LAB},le="8.0"}}'] == 7
            # n = 3 samples of at most 4 tokens: its prompt is found in the cache by samples 2 and 3
            await drain(llm, prompt, SamplingParams(n=3, max_tokens=4, temperature=1, seed=0, ignore_eos=True), "b")
            # a client gone after two outputs, and a request whose second step fails
            gen = llm.generate(prompt, SamplingParams(max_tokens=50, ignore_eos=True), "c")
            await gen.__anext__()
            seen["c"] = len((await gen.__anext__()).outputs[0].token_ids)   # 2, or more if outputs merged
            await gen.aclose()
            real, calls = llm.engine.runner.execute, {"n": 0}

            def flaky(batch):   # request d's second step
                calls["n"] += any(s.request_id == "d" for s in batch.seqs)
                if calls["n"] == 2:
                    raise RuntimeError("device lost")
                return real(batch)

            llm.engine.runner.execute = flaky
            with pytest.raises(EngineStepError):
                await drain(llm, prompt, SamplingParams(max_tokens=9, ignore_eos=True), "d")
            llm.engine.runner.execute = real
        finally:
            llm.shutdown()

    asyncio.run(main())
    values = parse_metrics(metrics.render())

    def v(name: str, extra: str = "") -> float:
        return values[f"vllm:{name}{{{LAB}{extra}}}"]

    # every series vLLM 0.26's Grafana dashboard (examples/observability/prometheus_grafana) draws
    for name in ("e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total",
                 "inter_token_latency_seconds_count", "num_requests_running", "num_requests_waiting",
                 "time_to_first_token_seconds_count", "kv_cache_usage_perc", "request_prompt_tokens_count",
                 "request_generation_tokens_count", "request_queue_time_seconds_sum", "request_prefill_time_seconds_sum",
                 "request_decode_time_seconds_sum", "request_max_num_generation_tokens_sum"):
        assert f"vllm:{name}{{{LAB}}}" in values, name
    for reason, count in (("length", 1 + 3), ("abort", 1), ("error", 1), ("stop", 0), ("repetition", 0)):
        assert v("request_success_total", f',finished_reason="{reason}"') == count, reason
    # as vLLM, which runs each of n samples as a child request: b's 3 samples count 3 times in
    # the finish reasons, latencies, phases, token counts and max_tokens; n and the longest
    # sample once a request
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_inference_time_seconds", "time_to_first_token_seconds",
                 "request_time_per_output_token_seconds", "request_params_max_tokens", "request_prompt_tokens",
                 "request_generation_tokens", "request_prefill_kv_computed_tokens"):
        assert v(name + "_count") == 1 + 3 + 1 + 1, name
    for name in ("request_params_n", "request_max_num_generation_tokens"):
        assert v(name + "_count") == 4, name
    assert v("request_params_n_sum") == 1 + 3 + 1 + 1
    assert v("request_params_max_tokens_sum") == 7 + 3 * 4 + 50 + 9
    assert v("request_max_num_generation_tokens_sum") == 7 + 4 + seen["c"] + 1
    assert v("request_generation_tokens_sum") == 7 + 3 * 4 + seen["c"] + 1
    # every sample's tokens after its first are inter-token gaps: 6 + 3 x 3 + (c's - 1) + 0
    assert v("inter_token_latency_seconds_count") == 6 + 9 + seen["c"] - 1
    # prompt tokens less those found in the prefix cache (the 5-token prompt fills no 16-token block)
    assert v("request_prefill_kv_computed_tokens_sum") == 6 * 5
    assert v("prompt_tokens_by_source_total", ',source="local_compute"') == v("prompt_tokens_total") == 6 * 5
    assert v("prompt_tokens_by_source_total", ',source="local_cache_hit"') == 0
    assert v("prompt_tokens_by_source_total", ',source="external_kv_transfer"') == 0
    assert v("prompt_tokens_cached_total") == 0
    # the phases add up: inference = prefill + decode, each request's, so their sums too
    assert v("request_inference_time_seconds_sum") == pytest.approx(
        v("request_prefill_time_seconds_sum") + v("request_decode_time_seconds_sum"), abs=1e-6)
    assert v("request_queue_time_seconds_sum") >= 0
    assert v("request_queue_time_seconds_sum") + v("request_inference_time_seconds_sum") <= \
        v("e2e_request_latency_seconds_sum") + 1e-3
    assert v("num_requests_waiting_by_reason", ',reason="capacity"') == v("num_requests_waiting") == 0
    assert v("num_requests_waiting_by_reason", ',reason="deferred"') == 0
    assert v("engine_sleep_state", ',sleep_state="awake"') == 1
    assert v("engine_sleep_state", ',sleep_state="discard_all"') == 0
    info = next(k for k in values if k.startswith("vllm:cache_config_info{"))
    assert values[info] == 1
    for label in ('block_size="16"', 'num_gpu_blocks="64"', 'cache_dtype="auto"', 'enable_prefix_caching="True"',
                  'engine="0"'):
        assert label in info, (label, info)


def test_latency_buckets_hold_every_vllm_bound():
    from deepserve.server.metrics import E2E_BUCKETS, ITL_BUCKETS, PHASE_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

    # vLLM 0.26's (vllm/v1/metrics/loggers.py)
    vllm_ttft = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
    vllm_itl = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
    vllm_latency = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
    assert set(vllm_ttft) <= set(TTFT_BUCKETS) and set(vllm_itl) <= set(ITL_BUCKETS)
    assert set(vllm_latency) <= set(E2E_BUCKETS) and set(vllm_latency) <= set(PHASE_BUCKETS)
    assert set(vllm_itl) <= set(TPOT_BUCKETS)


def test_offline_get_metrics_has_the_step_token_histogram():
    from deepserve import LLM
    from deepserve.engine.metrics_reader import Histogram

    llm = LLM(num_gpu_blocks_override=64, async_scheduling=False)
    llm.generate([{"prompt_token_ids": [1, 403, 407, 261, 378]}], SamplingParams(max_tokens=7, temperature=0,
                                                                                   ignore_eos=True))
    (steps,) = [m for m in llm.get_metrics() if m.name == "vllm:iteration_tokens_total"]
    assert isinstance(steps, Histogram) and steps.labels == {"model_name": "stories260k", "engine": "0"}
    assert (steps.count, steps.sum) == (7, 5 + 6)   # the prefill, then six one-token decodes
    assert (steps.buckets["1.0"], steps.buckets["8.0"], steps.buckets["+Inf"]) == (6, 7, 7)
    llm.shutdown()


def test_inter_token_latency_per_sample():
    """n = 2: each sample's first token and gaps, as vLLM times each sample; not the step's time
    split over both."""
    m = ServerMetrics("demo", dict)
    m.on_output("r", 0.0, 1.0, [1, 1], True)    # both samples' first tokens: the time to first token
    m.on_output("r", 0.0, 1.5, [1, 1], False)   # a token each, 0.5 s after their first
    m.on_output("r", 0.0, 2.5, [2, 0], False)   # sample 0: two more over 1 s
    values = parse_metrics(m.render())
    assert values[f"vllm:time_to_first_token_seconds_count{{{LAB}}}"] == 2
    assert values[f"vllm:inter_token_latency_seconds_count{{{LAB}}}"] == 4
    assert values[f"vllm:inter_token_latency_seconds_sum{{{LAB}}}"] == pytest.approx(0.5 + 0.5 + 0.5 + 0.5)


def test_time_per_output_token_is_each_requests_mean():
    """vLLM 0.26 serves the per-request mean decode time per token as
    request_time_per_output_token_seconds (one observation a request) and no longer serves
    time_per_output_token_seconds (its <= 0.10 name of inter_token_latency_seconds), nor
    gpu_cache_usage_perc (kv_cache_usage_perc's old name)."""
    m = ServerMetrics("demo", lambda: {"kv_cache_usage": 0.25})
    m.on_output("r", 0.0, 1.0, [1], True)
    m.on_output("r", 0.0, 1.5, [1], False)
    m.on_output("r", 0.0, 3.5, [2], False)   # 4 tokens: gaps 0.5, 1.0, 1.0
    m.on_finish("r", 0.0, 3.5, FinishedRequest(
        prompt_tokens=3, generation_tokens=4, max_sample_tokens=4, cached_tokens=0, n=1, max_tokens=4,
        reason="length", timings={"arrival_time": 0.0, "first_scheduled_time": 0.5, "first_token_time": 1.0,
                                  "last_token_time": 3.5}))
    text = m.render()
    values = parse_metrics(text)
    assert values[f"vllm:inter_token_latency_seconds_count{{{LAB}}}"] == 3
    assert values[f"vllm:request_time_per_output_token_seconds_count{{{LAB}}}"] == 1
    assert values[f"vllm:request_time_per_output_token_seconds_sum{{{LAB}}}"] == pytest.approx(2.5 / 3)
    assert values[f"vllm:kv_cache_usage_perc{{{LAB}}}"] == 0.25
    for gone in ("time_per_output_token_seconds", "gpu_cache_usage_perc"):
        assert f"vllm:{gone}" not in text and f"deepserve:{gone}" not in text, gone


def test_a_request_gone_before_its_first_token_is_counted():
    """A client that leaves mid-prefill (no output yet) ends an aborted request, as one that
    leaves later does: request_success{abort}, e2e and its prompt tokens."""
    llm = AsyncLLM.from_engine_args(EngineArgs(num_gpu_blocks_override=64, async_scheduling=False,
                                               max_num_batched_tokens=2, max_num_seqs=2))
    metrics = ServerMetrics("demo", lambda: llm.snapshot, max_model_len=llm.max_model_len)
    llm.listener = metrics
    prompt = {"prompt_token_ids": [1] + [403, 407, 261, 378] * 60}   # 241 tokens: 121 two-token chunks

    async def main():
        llm.start()
        try:
            gen = llm.generate(prompt, SamplingParams(max_tokens=4), "p")
            first = asyncio.ensure_future(gen.__anext__())
            while not llm.engine.scheduler.running:   # admitted: prefilling
                await asyncio.sleep(0.001)
            assert not first.done()
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            await gen.aclose()
            for _ in range(200):
                if not llm.engine.requests:
                    break
                await asyncio.sleep(0.01)
            assert not llm.engine.requests
            # a prompt the engine refuses (past max_model_len) is a 400, not a request that ended
            with pytest.raises(ValueError):
                async for _ in llm.generate({"prompt_token_ids": [1] * 600}, SamplingParams(max_tokens=4), "q"):
                    pass
        finally:
            llm.shutdown()

    asyncio.run(main())
    values = parse_metrics(metrics.render())
    assert values[f'vllm:request_success_total{{{LAB},finished_reason="abort"}}'] == 1
    assert values[f"vllm:e2e_request_latency_seconds_count{{{LAB}}}"] == 1
    assert values[f"vllm:request_prompt_tokens_sum{{{LAB}}}"] == 241
    assert values[f"vllm:request_generation_tokens_sum{{{LAB}}}"] == 0


def test_samples_that_end_apart_count_as_requests():
    """n = 3, samples ending by stop, length and (the request aborted) abort: each is a request
    of its own in vLLM: its finish reason, tokens and end time; n and the longest once."""
    m = ServerMetrics("demo", dict)
    m.on_output("r", 0.0, 1.0, [1, 1, 1], True)
    m.on_output("r", 0.0, 2.0, [1, 3, 1], False)   # sample 0 ends (stop) with 2 tokens
    m.on_output("r", 0.0, 4.0, [0, 2, 1], False)   # sample 1 ends (length) with 6
    m.on_finish("r", 0.0, 5.0, FinishedRequest(
        prompt_tokens=3, generation_tokens=2 + 6 + 3, max_sample_tokens=6, cached_tokens=0, n=3, max_tokens=6,
        reason="stop", timings={"arrival_time": 0.0, "first_scheduled_time": 0.5, "first_token_time": 1.0,
                                "last_token_time": 4.0}, samples=((2, "stop"), (6, "length"), (3, "abort"))))
    values = parse_metrics(m.render())

    def v(name: str, extra: str = "") -> float:
        return values[f"vllm:{name}{{{LAB}{extra}}}"]

    for reason in ("stop", "length", "abort"):
        assert v("request_success_total", f',finished_reason="{reason}"') == 1, reason
    assert v("time_to_first_token_seconds_count") == 3
    assert v("request_generation_tokens_count") == 3 and v("request_generation_tokens_sum") == 11
    assert v("request_prompt_tokens_sum") == 3 * 3
    assert v("request_params_max_tokens_sum") == 3 * 6
    assert (v("request_params_n_count"), v("request_params_n_sum")) == (1, 3)
    assert (v("request_max_num_generation_tokens_count"), v("request_max_num_generation_tokens_sum")) == (1, 6)
    # ends: sample 0 two seconds before the request's last output, the others with the request
    assert v("e2e_request_latency_seconds_sum") == pytest.approx(3.0 + 5.0 + 5.0)
    assert v("request_decode_time_seconds_sum") == pytest.approx(1.0 + 3.0 + 3.0)
    assert v("request_time_per_output_token_seconds_sum") == pytest.approx(1.0 / 1 + 3.0 / 5 + 3.0 / 2)
    assert v("request_queue_time_seconds_count") == 3


def test_every_family_vllm_always_registers_is_exposed_with_its_type_and_labels():
    from prometheus_client.parser import text_string_to_metric_families

    from deepserve.server.metrics import token_buckets

    # vLLM 0.26's PrometheusStatLogger (vllm/v1/metrics/loggers.py) without spec decoding, LoRA,
    # --kv-cache-metrics or VLLM_COMPUTE_NANS_IN_LOGITS: name -> (type, labels beside model_name, engine)
    base = {"num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
            "prefix_cache_queries": "counter", "prefix_cache_hits": "counter",
            "external_prefix_cache_queries": "counter", "external_prefix_cache_hits": "counter",
            "mm_cache_queries": "counter", "mm_cache_hits": "counter", "num_preemptions": "counter",
            "prompt_tokens": "counter", "prompt_tokens_cached": "counter", "generation_tokens": "counter",
            "request_prompt_tokens": "histogram", "request_generation_tokens": "histogram",
            "iteration_tokens_total": "histogram", "request_max_num_generation_tokens": "histogram",
            "request_params_n": "histogram", "request_params_max_tokens": "histogram",
            "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
            "request_time_per_output_token_seconds": "histogram", "e2e_request_latency_seconds": "histogram",
            "request_queue_time_seconds": "histogram", "request_inference_time_seconds": "histogram",
            "request_prefill_time_seconds": "histogram", "request_decode_time_seconds": "histogram",
            "request_prefill_kv_computed_tokens": "histogram"}
    expected = {name: (kind, set()) for name, kind in base.items()}
    expected.update({"num_requests_waiting_by_reason": ("gauge", {"reason"}),
                     "engine_sleep_state": ("gauge", {"sleep_state"}),
                     "prompt_tokens_by_source": ("counter", {"source"}),
                     "request_success": ("counter", {"finished_reason"})})
    metrics = ServerMetrics("demo", lambda: {}, max_model_len=512)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    for name, (kind, extra) in expected.items():
        family = families.get("vllm:" + name)
        assert family is not None, name
        assert family.type == kind, (name, family.type)
        labels = {k for s in family.samples if not s.name.endswith("_created") for k in s.labels} - {"le"}
        assert labels == {"model_name", "engine"} | extra, (name, labels)
        assert all(s.value == 0 for s in family.samples if s.name.endswith(("_total", "_count", "_sum"))
                   and not name.startswith(("num_", "kv_", "engine_"))), name
    # vLLM's token-count buckets (build_1_2_5_buckets(max_model_len)), the same bounds here
    bounds = {s.labels["le"] for s in families["vllm:request_prompt_tokens"].samples if "le" in s.labels}
    assert bounds == {str(float(b)) for b in (1, 2, 5, 10, 20, 50, 100, 200, 500)} | {"+Inf"}
    assert token_buckets(512) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
