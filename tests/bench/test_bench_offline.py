"""bench latency / throughput: the measuring on a timed stand-in engine, then the real engine."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from deepserve.bench.offline import measure_latency, measure_throughput, random_prompts


class SleepyLLM:
    """vLLM's `LLM.generate` shape; each call takes `seconds` and returns max_tokens ids per prompt."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def generate(self, prompts, params, use_tqdm=False):
        self.calls += 1
        time.sleep(self.seconds)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(range(params.max_tokens)))])
                for _ in prompts]


def test_random_prompts_shape_and_range():
    prompts = random_prompts(3, 5, vocab_size=11, seed=0)
    assert [len(p["prompt_token_ids"]) for p in prompts] == [5, 5, 5]
    assert all(0 <= t < 11 for p in prompts for t in p["prompt_token_ids"])
    assert prompts == random_prompts(3, 5, 11, 0) != random_prompts(3, 5, 11, 1)
    with pytest.raises(ValueError, match="0 prompts"):
        random_prompts(0, 5, 11, 0)


def test_measure_latency_times_each_iteration():
    llm = SleepyLLM(0.03)
    res = measure_latency(llm, SimpleNamespace(max_tokens=4), random_prompts(2, 4, 10, 0),
                          num_iters=4, num_iters_warmup=2, progress=False)
    assert llm.calls == 6 and len(res["latencies"]) == 4
    assert res["avg_latency"] == pytest.approx(0.03, rel=0.5)
    assert min(res["latencies"]) >= 0.03
    assert set(res["percentiles"]) == {"10", "25", "50", "75", "90", "99"}
    assert res["percentiles"]["10"] <= res["percentiles"]["50"] <= res["percentiles"]["99"]


def test_measure_throughput_counts_tokens():
    res = measure_throughput(SleepyLLM(0.05), SimpleNamespace(max_tokens=6), random_prompts(4, 10, 50, 0),
                             progress=False)
    assert res["num_requests"] == 4 and res["total_prompt_tokens"] == 40 and res["total_output_tokens"] == 24
    assert res["total_num_tokens"] == 64
    assert res["requests_per_second"] == pytest.approx(4 / res["elapsed_time"])
    assert res["output_tokens_per_second"] == pytest.approx(24 / res["elapsed_time"])
    assert res["elapsed_time"] >= 0.05


def test_real_engine_latency_and_throughput(bench_args, tmp_path, capsys):
    pytest.importorskip("deepserve.engine.llm", reason="the engine (deepserve.LLM) is not in this build")
    from deepserve.cli.bench import _latency, _throughput

    lat = tmp_path / "lat.json"
    assert _latency(bench_args(["latency", "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                                "--num-iters", "2", "--num-iters-warmup", "1", "--output-json", str(lat),
                                "--disable-tqdm"])) == 0
    res = json.loads(lat.read_text())
    assert len(res["latencies"]) == 2 and res["avg_latency"] > 0
    thr = tmp_path / "thr.json"
    assert _throughput(bench_args(["throughput", "--num-prompts", "3", "--input-len", "8", "--output-len", "5",
                                   "--output-json", str(thr), "--disable-tqdm"])) == 0
    res = json.loads(thr.read_text())
    # ignore_eos: every request generates exactly --output-len tokens
    assert res["total_output_tokens"] == 15 and res["total_prompt_tokens"] == 24
    out = capsys.readouterr().out
    assert "Avg latency:" in out and "Throughput:" in out
    # vLLM's --n: that many sampled sequences a prompt, every one counted
    assert _throughput(bench_args(["throughput", "--num-prompts", "3", "--input-len", "8", "--output-len", "5",
                                   "--n", "2", "--output-json", str(thr), "--disable-tqdm"])) == 0
    res = json.loads(thr.read_text())
    assert res["total_output_tokens"] == 30 and res["total_prompt_tokens"] == 24 and res["num_requests"] == 3
    with pytest.raises(ValueError, match="--n must be >= 1"):
        _throughput(bench_args(["throughput", "--num-prompts", "1", "--n", "0", "--disable-tqdm"]))


@pytest.mark.parametrize("command", [
    ["latency", "--batch-size", "1", "--num-iters", "1", "--num-iters-warmup", "0"],
    ["throughput", "--num-prompts", "2"],
])
def test_requests_past_max_model_len_are_refused(bench_args, command):
    """As vLLM's benchmarks assert: a prompt + output past max_model_len is refused, where the
    engine would stop each output early and the run time shorter outputs than were asked for
    (bench latency timed 60 + 4 tokens for --output-len 10 at --max-model-len 64)."""
    pytest.importorskip("deepserve.engine.llm", reason="the engine (deepserve.LLM) is not in this build")
    from deepserve.bench.offline import run_latency, run_throughput

    run = run_latency if command[0] == "latency" else run_throughput
    flags = [*command, "--max-model-len", "64", "--input-len", "60", "--disable-tqdm"]
    with pytest.raises(ValueError, match=r"^a request of 70 tokens \(prompt \+ output\) does not fit "
                                         r"max_model_len 64: lower --input-len / --output-len or raise --max-model-len$"):
        run(bench_args(flags + ["--output-len", "10"]))
    result = run(bench_args(flags + ["--output-len", "4"]))
    if command[0] == "throughput":
        assert result["total_output_tokens"] == 8
