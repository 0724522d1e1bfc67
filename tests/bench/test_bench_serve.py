"""bench serve against the fake endpoint: timing metrics, failures, traffic shaping, JSON."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from conftest import DETAILED_KEYS, EXPECTED_KEYS, TOKENIZER
from deepserve.bench.serve import arrival_gaps, run_serve
from deepserve.engine.tokenizer import Tokenizer
from deepserve.cli.bench import _serve


def _argv(url, *extra, n=4, out=10):
    return ["serve", "--base-url", url, "--model", "fake-model", "--tokenizer", str(TOKENIZER),
            "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", str(out),
            "--num-prompts", str(n), "--disable-tqdm", *extra]


TIMING = {"ttft": 100.0, "tpot": 20.0, "itl": 20.0, "e2el": 280.0}  # ms, for 10 tokens


def _loopback_rtt_ms(url: str) -> float:
    """Median round trip of a tiny request to the fake server: this machine's floor under TTFT."""
    with httpx.Client(trust_env=False) as client:
        client.get(url + "/v1/models")
        times = []
        for _ in range(9):
            start = time.perf_counter()
            client.get(url + "/v1/models")
            times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def _timing_errors(res: dict, slack_ms: float) -> list[str]:
    return [f"{stat}_{key}={res[f'{stat}_{key}_ms']:.1f} ms, want {want} ms ± 10% + {slack_ms:.1f} ms"
            for key, want in TIMING.items() for stat in ("mean", "median")
            if abs(res[f"{stat}_{key}_ms"] - want) > 0.10 * want + slack_ms]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_known_timing(fake_server, bench_args, endpoint, capsys):
    # First token after 100 ms, then one every 20 ms: 10 tokens -> E2EL = 100 + 9 * 20 = 280 ms.
    # On an idle machine the client measures TTFT 103 ms, E2EL 283 ms, TPOT/ITL 20.0 ms (16-core
    # host). A loaded one adds scheduler delay to every wake-up (~15 ms per TTFT at load 8 on 2
    # cores), so the tolerance is 10% plus two loopback round trips measured just before, and up
    # to 3 attempts; a wrong measurement (role chunk as first token, time to [DONE], ...) fails all.
    for _attempt in range(3):
        with fake_server(ttft=0.1, itl=0.02) as srv:
            slack = 2 * _loopback_rtt_ms(srv.url)
            res = run_serve(bench_args(_argv(srv.url + "/v1", "--endpoint", endpoint, "--max-concurrency", "1",
                                             "--percentile-metrics", "ttft,tpot,itl,e2el", n=3)))
            received = srv.stats()["requests"]
        if not _timing_errors(res, slack):
            break
    assert not _timing_errors(res, slack), _timing_errors(res, slack)
    assert res["completed"] == 3 and res["failed"] == 0
    assert res["output_lens"] == [10] * 3 and res["total_output_tokens"] == 30
    assert all(len(itl) == 9 for itl in res["itls"])
    # input lengths are the server's usage.prompt_tokens (the fake's word count), as vLLM takes them
    tok = Tokenizer(TOKENIZER)
    sent = [r.get("prompt") or r["messages"][0]["content"] for r in received]
    assert sorted(res["input_lens"]) == sorted(len(p.split()) for p in sent)
    assert res["input_lens"] != [tok.count(p) for p in sent]
    assert res["total_input_tokens"] == sum(res["input_lens"])
    assert all(r["stream"] and r["stream_options"] == {"include_usage": True} for r in received)
    assert res["output_throughput"] == pytest.approx(30 / res["duration"])
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Median TTFT (ms):" in out and "P99 E2EL (ms):" in out


def test_output_tokens_counted_with_tokenizer_without_usage(fake_server, bench_args):
    with fake_server(ttft=0.01, itl=0.002, usage=False) as srv:
        res = run_serve(bench_args(_argv(srv.url, n=2, out=7)))
    # " hello" x 7 is 7 Llama tokens; splitting on spaces would also give 7, so check the text too
    assert res["output_lens"] == [7, 7]
    assert res["mean_tpot_ms"] > 0


def test_failing_endpoint_counts_failures(fake_server, bench_args, capsys):
    with fake_server(status=500) as srv:
        args = bench_args(_argv(srv.url, n=3))
        res = run_serve(args)
        code = _serve(bench_args(_argv(srv.url, n=3)))
    assert res["completed"] == 0 and res["failed"] == 3
    assert len(res["errors"]) == 3 and all(e.startswith("HTTP 500") for e in res["errors"])
    assert res["output_lens"] == [0, 0, 0] and res["request_throughput"] == 0.0
    assert code == 1
    assert "first error: HTTP 500" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["serve"], ["sweep", "--max-concurrency-list", "1"]])
def test_server_failing_mid_run_exits_1_with_a_line(fake_server, capsys, tmp_path, command):
    # a server that answers two requests and then goes away: the run's numbers are no clean
    # measurement, so the exit status says so (it was 0 once any request had completed)
    from deepserve.cli.main import main

    with fake_server(ttft=0.001, itl=0.001, fail_after=2) as srv:
        argv = _argv(srv.url, "--max-concurrency", "1", "--result-dir", str(tmp_path), out=2)
        assert main(["bench", *command, *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert "bench serve: 2 of 4 requests failed; first error: HTTP 503" in err
    assert "Traceback" not in err


def test_infinite_burstiness_sends_at_a_constant_rate(bench_args):
    # vLLM: as the Gamma shape grows the gaps tend to 1 / rate, which --burstiness inf sends
    # exactly (the Gamma of an infinite shape gave NaN gaps: every request at once)
    args = bench_args(["serve", "--request-rate", "4", "--burstiness", "inf"])
    assert arrival_gaps(5, args.request_rate, args.burstiness, seed=0) == [0.0, 0.25, 0.25, 0.25, 0.25]
    assert arrival_gaps(3, [1.0, 2.0, 4.0], float("inf"), seed=0) == [0.0, 0.5, 0.25]   # a ramp-up's rates


def test_unreachable_server_is_a_counted_failure(bench_args):
    res = run_serve(bench_args(_argv("http://127.0.0.1:9", n=2)))
    assert res["failed"] == 2 and all("ConnectError" in e for e in res["errors"])


def test_concurrency_limit_and_saved_json(fake_server, bench_args, tmp_path):
    with fake_server(ttft=0.03, itl=0.005) as srv:
        res = run_serve(bench_args(_argv(srv.url, "--max-concurrency", "2", "--save-result",
                                         "--result-dir", str(tmp_path), "--result-filename", "r.json",
                                         "--goodput", "ttft:1000", "tpot:1000", n=6, out=4)))
        assert srv.stats()["max_in_flight"] == 2
    assert 2 <= res["max_concurrent_requests"] <= 6   # vLLM's: the requests active in one second of the run
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == EXPECTED_KEYS   # vLLM's fields, no more: the per-request lists need --save-detailed
    assert saved["completed"] == 6 and saved["max_concurrency"] == 2 and saved["request_rate"] == "inf"
    assert saved["request_goodput"] == pytest.approx(saved["request_throughput"])


def test_default_result_name_carries_the_results_date(fake_server, bench_args, tmp_path, monkeypatch):
    # vLLM names the file after the result's "date"; a clock read twice could name another second
    import datetime as dt
    from deepserve.bench import serve

    class Ticking(dt.datetime):
        tick = 0

        @classmethod
        def now(cls, tz=None):
            cls.tick += 1
            return dt.datetime(2026, 1, 2, 3, 4, 5) + dt.timedelta(seconds=cls.tick)

    monkeypatch.setattr(serve, "datetime", Ticking)
    with fake_server(ttft=0.001, itl=0.001) as srv:
        res = run_serve(bench_args(_argv(srv.url, "--save-result", "--result-dir", str(tmp_path), n=1, out=2)))
    (path,) = tmp_path.iterdir()
    assert path.name == f"openai-infqps-fake-model-{res['date']}.json"
    assert json.loads(path.read_text())["date"] == res["date"]


def test_saved_fields_follow_the_percentile_flags_and_save_detailed(fake_server, bench_args, tmp_path):
    # vLLM stores the statistics of the --percentile-metrics only, at the --metric-percentiles,
    # and the per-request lists with --save-detailed
    with fake_server(ttft=0.01, itl=0.002) as srv:
        res = run_serve(bench_args(_argv(srv.url, "--save-result", "--save-detailed", "--result-dir", str(tmp_path),
                                         "--result-filename", "r.json", "--percentile-metrics", "e2el",
                                         "--metric-percentiles", "50,99.9", n=2, out=3)))
    saved = json.loads((tmp_path / "r.json").read_text())
    latency = {k for k in EXPECTED_KEYS if k.endswith("_ms")}
    e2el = {"mean_e2el_ms", "median_e2el_ms", "std_e2el_ms", "p50_e2el_ms", "p99.9_e2el_ms"}
    assert set(saved) == (EXPECTED_KEYS - latency) | e2el | DETAILED_KEYS
    assert saved["output_lens"] == [3, 3] and saved["errors"] == ["", ""] and saved["p50_e2el_ms"] > 0
    assert res["result_path"] == str(tmp_path / "r.json")


def test_request_rate_spreads_arrivals(fake_server, bench_args, tmp_path):
    with fake_server(ttft=0.005, itl=0.001) as srv:
        res = run_serve(bench_args(_argv(srv.url, "--request-rate", "20", "--burstiness", "1.0",
                                         "--save-result", "--result-dir", str(tmp_path), n=8, out=2)))
        arrivals = srv.stats()["arrivals"]
    assert res["completed"] == 8 and res["request_rate"] == 20.0
    files = list(tmp_path.glob("openai-20.0qps-fake-model-*.json"))
    assert len(files) == 1 and set(json.loads(files[0].read_text())) == EXPECTED_KEYS
    # the server sees the requests on the seeded Poisson schedule (7 gaps, 50 ms on average):
    # never ahead of it, and behind it only by what a loaded host adds (sent all at once, or
    # on a doubled schedule, fails)
    expected = sum(arrival_gaps(8, 20.0, 1.0, seed=0))
    assert expected - 0.03 <= arrivals[-1] - arrivals[0] <= 1.5 * expected + 0.05


def test_goodput_excludes_slow_requests(fake_server, bench_args):
    with fake_server(ttft=0.05, itl=0.002) as srv:
        res = run_serve(bench_args(_argv(srv.url, "--goodput", "ttft:10", n=2, out=2)))
    assert res["request_goodput"] == 0.0 and res["completed"] == 2


def test_model_from_server_listing(fake_server, bench_args):
    with fake_server(ttft=0.001, itl=0.001) as srv:
        argv = [a for a in _argv(srv.url, n=1, out=2) if a not in ("--model", "fake-model")]
        res = run_serve(bench_args(argv))
        assert srv.stats()["requests"][0]["model"] == "fake-model"
    assert res["model_id"] == "fake-model"


def test_model_from_server_listing_takes_its_root(fake_server, bench_args, tmp_path):
    """vLLM without --model: the listed model's root is the model_id (tokenizer, result name), its
    id the name requests carry (a server started with --served-model-name lists both)."""
    with fake_server(ttft=0.001, itl=0.001, root=TOKENIZER) as srv:
        argv = [a for a in _argv(srv.url, "--save-result", "--result-dir", str(tmp_path), n=1, out=2)
                if a not in ("--model", "fake-model", "--tokenizer", str(TOKENIZER))]
        res = run_serve(bench_args(argv))
        assert srv.stats()["requests"][0]["model"] == "fake-model"
    assert res["completed"] == 1 and res["model_id"] == str(TOKENIZER)
    assert len(list(tmp_path.glob(f"openai-infqps-{TOKENIZER.name}-*.json"))) == 1


def test_ignore_eos_and_served_model_name_are_sent(fake_server, bench_args):
    with fake_server(ttft=0.001, itl=0.001) as srv:
        run_serve(bench_args(_argv(srv.url, "--ignore-eos", "--served-model-name", "other", n=1, out=3)))
        body = srv.stats()["requests"][0]
    assert body["ignore_eos"] is True and body["model"] == "other" and body["max_tokens"] == 3


def test_path_not_served_falls_back_to_the_only_model(fake_server, bench_args, capsys):
    """The vllm-ascend guide benches `--model path/DeepSeek-R1-W8A8` against a server started with
    `--served-model-name deepseek_r1`: the server's only model is sent instead, and said so."""
    with fake_server(ttft=0.001, itl=0.001) as srv:
        argv = [("path/DeepSeek-R1-W8A8" if a == "fake-model" else a) for a in _argv(srv.url, n=1, out=2)]
        res = run_serve(bench_args(argv))
        assert srv.stats()["requests"][0]["model"] == "fake-model"
    assert res["completed"] == 1 and res["model_id"] == "path/DeepSeek-R1-W8A8"
    assert "does not serve 'path/DeepSeek-R1-W8A8'; sending its only model 'fake-model'" in capsys.readouterr().err


def test_max_concurrency_zero_is_no_limit_as_vllms(fake_server, bench_args, tmp_path):
    from types import SimpleNamespace

    from deepserve.bench.metrics import format_summary
    from deepserve.bench.serve import result_filename

    with fake_server(ttft=0.05, itl=0.005) as srv:
        res = run_serve(bench_args(_argv(srv.url, "--max-concurrency", "0", "--save-result", "--result-dir",
                                         str(tmp_path), "--result-filename", "r.json", n=4, out=4)))
        assert srv.stats()["max_in_flight"] == 4
    assert res["completed"] == 4 and json.loads((tmp_path / "r.json").read_text())["max_concurrency"] == 0
    # vLLM prints and names the limit whenever one was given, 0 included
    assert "Maximum request concurrency:             0" in format_summary(res)
    name = result_filename(SimpleNamespace(request_rate=2.0, max_concurrency=0, model="m", label="L"))
    assert name.startswith("L-2.0qps-concurrency0-m-")
    with pytest.raises(ValueError, match=r"--max-concurrency must be >= 0 \(0: no limit, as vLLM's\), got -1"):
        run_serve(bench_args(_argv(srv.url, "--max-concurrency", "-1", n=1)))
