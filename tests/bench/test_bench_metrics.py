"""Metric arithmetic, goodput, arrival schedule and URL handling on hand-made values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from deepserve.bench.client import RequestOutput, api_url
from deepserve.bench.metrics import compute_metrics, format_summary, parse_goodput
from deepserve.bench.serve import arrival_gaps, parse_percentiles


def _out(ttft, latency, n, start=0.0, itl=None, text=""):
    return RequestOutput(prompt_len=10, success=True, output_tokens=n, ttft=ttft, latency=latency,
                         start_time=start, itl=itl or [], generated_text=text)


def test_compute_metrics_values():
    outs = [_out(0.1, 0.5, 5, start=0.0, itl=[0.1] * 4), _out(0.3, 0.5, 3, start=0.2, itl=[0.1, 0.1]),
            RequestOutput(prompt_len=7, error="HTTP 500: boom"), _out(0.2, 0.2, 1, start=1.0)]
    res = compute_metrics(outs, duration=2.0, count_tokens=lambda s: 99, percentiles=[50, 99],
                          goodput={"ttft": 250.0})
    assert res["completed"] == 3 and res["failed"] == 1
    assert res["errors"] == ["", "", "HTTP 500: boom", ""]
    assert res["total_input_tokens"] == 30 and res["total_output_tokens"] == 9
    assert res["output_lens"] == [5, 3, 0, 1]
    assert res["request_throughput"] == pytest.approx(1.5)
    assert res["output_throughput"] == pytest.approx(4.5)
    assert res["total_token_throughput"] == pytest.approx(19.5)
    assert res["mean_ttft_ms"] == pytest.approx(200.0) and res["median_ttft_ms"] == pytest.approx(200.0)
    assert res["std_ttft_ms"] == pytest.approx(np.std([100, 300, 200]))
    # TPOT = (e2el - ttft) / (n - 1): 400/4 = 100 and 200/2 = 100; the 1-token request has none
    assert res["mean_tpot_ms"] == pytest.approx(100.0) and res["p99_tpot_ms"] == pytest.approx(100.0)
    assert res["mean_itl_ms"] == pytest.approx(100.0)
    assert res["p99_e2el_ms"] == pytest.approx(np.percentile([500, 500, 200], 99))
    assert res["request_goodput"] == pytest.approx(1.0)  # ttft 100 and 200 <= 250 ms, 300 is not
    assert res["max_concurrent_requests"] == 2


def test_tokenizer_counts_when_no_usage():
    res = compute_metrics([_out(0.1, 0.3, None, text="a b c")], 1.0, count_tokens=lambda s: 7)
    assert res["output_lens"] == [7] and res["mean_tpot_ms"] == pytest.approx(200 / 6)


def test_all_failed_gives_zeros_not_errors():
    res = compute_metrics([RequestOutput(error="x")] * 2, 1.0, count_tokens=len)
    assert res["completed"] == 0 and res["failed"] == 2 and res["mean_ttft_ms"] == 0.0
    assert res["request_goodput"] is None
    assert "Failed requests:                         2" in format_summary({**res, "request_rate": "inf"})


def test_parse_goodput():
    assert parse_goodput(["ttft:100", "tpot:12.5", "e2el:3000"]) == {"ttft": 100.0, "tpot": 12.5, "e2el": 3000.0}
    assert parse_goodput(None) == {}
    for bad in ("itl:5", "ttft", "ttft:abc", "tpot:-1"):
        with pytest.raises(ValueError, match=bad.split(":")[0]):
            parse_goodput([bad])


def test_arrival_gaps_poisson_and_gamma():
    assert arrival_gaps(4, math.inf, 1.0, 0) == [0.0] * 4
    gaps = np.array(arrival_gaps(20001, 50.0, 1.0, 0)[1:])
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)      # exponential: CV = 1
    bursty = np.array(arrival_gaps(20001, 50.0, 0.25, 0)[1:])
    assert bursty.mean() == pytest.approx(1 / 50, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # gamma(k): CV = 1/sqrt(k)
    with pytest.raises(ValueError, match="burstiness must be > 0, got 0"):
        arrival_gaps(2, 1.0, 0.0, 0)


@pytest.mark.parametrize("base", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"])
def test_api_url_root_or_v1(base):
    assert api_url(base, "/v1/completions") == "http://h:8000/v1/completions"
    assert api_url(base, "/v1/chat/completions") == "http://h:8000/v1/chat/completions"


def test_api_url_rejects_bad_values():
    with pytest.raises(ValueError, match="'/v2/x'"):
        api_url("http://h", "/v2/x")
    with pytest.raises(ValueError, match="'h:8000'"):
        api_url("h:8000", "/v1/completions")


def test_parse_percentiles():
    assert parse_percentiles("90,99.9", "ttft,e2el") == ([90.0, 99.9], ["ttft", "e2el"])
    with pytest.raises(ValueError, match="'abc'"):
        parse_percentiles("abc", "ttft")
    with pytest.raises(ValueError, match="'101'"):
        parse_percentiles("101", "ttft")
    with pytest.raises(ValueError, match="'latency'"):
        parse_percentiles("99", "ttft,latency")


def test_summary_is_vllms_table():
    # vLLM 0.26's lines for these values: no Std rows, "Total token throughput", the rate and
    # concurrency rows only when set, one row per --metric-percentiles value
    outs = [_out(0.1, 0.5, 5, start=0.0, itl=[0.1] * 4), _out(0.3, 0.5, 3, start=0.2, itl=[0.1, 0.1])]
    res = compute_metrics(outs, duration=2.0, count_tokens=len, percentiles=[50, 99.5], metrics=["ttft", "e2el"])
    assert "mean_tpot_ms" not in res and "p99.5_e2el_ms" in res
    text = format_summary({**res, "request_rate": 4.0, "max_concurrency": 8}, [50, 99.5], ["ttft", "e2el"])
    assert text == """\
============ Serving Benchmark Result ============
Successful requests:                     2         
Failed requests:                         0         
Maximum request concurrency:             8         
Request rate configured (RPS):           4.00      
Benchmark duration (s):                  2.00      
Total input tokens:                      20        
Total generated tokens:                  8         
Request throughput (req/s):              1.00      
Output token throughput (tok/s):         4.00      
Peak output token throughput (tok/s):    8.00      
Peak concurrent requests:                2.00      
Total token throughput (tok/s):          14.00     
---------------Time to First Token----------------
Mean TTFT (ms):                          200.00    
Median TTFT (ms):                        200.00    
P50 TTFT (ms):                           200.00    
P99.5 TTFT (ms):                         299.00    
----------------End-to-end Latency----------------
Mean E2EL (ms):                          500.00    
Median E2EL (ms):                        500.00    
P50 E2EL (ms):                           500.00    
P99.5 E2EL (ms):                         500.00    
=================================================="""
