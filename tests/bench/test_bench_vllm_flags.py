"""`vllm bench serve` flags carried over: each is sent or stored as vLLM does, or refused by name."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import TOKENIZER
from deepserve.bench.client import RequestOutput
from deepserve.bench.metrics import compute_metrics, format_summary, peak_output_tokens_per_s
from deepserve.bench.serve import run_serve


def _argv(url, *extra):
    return ["serve", "--base-url", url, "--model", "fake-model", "--tokenizer", str(TOKENIZER),
            "--num-prompts", "3", "--disable-tqdm", *extra]


def test_request_flags_reach_the_server(fake_server, bench_args, tmp_path):
    # vLLM's spelling prefix_repetition, --output-len over the dataset's own flag, sampling flags,
    # --extra-body over them, --header and the x-request-id prefix.
    argv = _argv("", "--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "8",
                 "--prefix-repetition-suffix-len", "4", "--prefix-repetition-num-prefixes", "1",
                 "--output-len", "3", "--top-p", "0.9", "--top-k", "5", "--repetition-penalty", "1.1",
                 "--extra-body", '{"top_k": 7, "min_tokens": 2}', "--header", "X-Team=a=b",
                 "--request-id-prefix", "run1-", "--ready-check-timeout-sec", "5")
    with fake_server(ttft=0.01, itl=0.005) as srv:
        argv[2] = srv.url
        res = run_serve(bench_args(argv))
        stats = srv.stats()
    assert res["completed"] == 3
    bodies, headers = stats["requests"][-3:], stats["headers"][-3:]
    assert len(stats["requests"]) == 4   # the ready check's test request, then the run
    for body in bodies:
        assert body["max_tokens"] == 3 and "ignore_eos" not in body
        assert (body["top_p"], body["top_k"], body["repetition_penalty"], body["min_tokens"]) == (0.9, 7, 1.1, 2)
        assert "min_p" not in body and "temperature" not in body   # flags not given are not sent
    assert all(h["x-team"] == "a=b" for h in headers)
    assert sorted(h["x-request-id"] for h in headers) == ["run1-0", "run1-1", "run1-2"]


def test_random_ignores_eos_and_results_append_with_metadata(fake_server, bench_args, tmp_path):
    argv = _argv("", "--random-input-len", "8", "--input-len", "6", "--output-len", "2", "--append-result",
                 "--result-dir", str(tmp_path), "--result-filename", "runs.json", "--label", "mylabel",
                 "--metadata", "tp=8", "note=a b",
                 "--backend", "vllm", "--save-detailed", "--temperature", "0")
    with fake_server(ttft=0.01, itl=0.005, usage=False) as srv:   # prompt lengths counted by the bench
        argv[2] = srv.url
        run_serve(bench_args(argv))
        run_serve(bench_args(argv))
        bodies = srv.stats()["requests"]
    assert all(b["ignore_eos"] is True and b["max_tokens"] == 2 and b["temperature"] == 0.0 for b in bodies)
    lines = (tmp_path / "runs.json").read_text().splitlines()
    assert len(lines) == 2   # one JSON document a line
    for line in lines:
        res = json.loads(line)
        assert res["tp"] == "8" and res["note"] == "a b" and res["backend"] == res["endpoint_type"] == "vllm"
        assert res["label"] == "mylabel" and set(res["input_lens"]) <= {5, 6, 7}
        assert isinstance(res["max_output_tokens_per_s"], float) and len(res["start_times"]) == 3


@pytest.mark.parametrize("extra, message", [
    (["--dataset-name", "random", "--dataset-path", "x.json"], "--dataset-name random takes no --dataset-path"),
    (["--dataset-path", "x.jsonl"], "--dataset-name random takes no --dataset-path; name the file's set with "
                                    "--dataset-name sharegpt, sonnet or custom"),
    (["--tokenizer-mode", "mistral"], "--tokenizer-mode mistral is not supported"),
    (["--header", "novalue"], "--header takes KEY=VALUE"),
    (["--metadata", "=x"], "--metadata takes KEY=VALUE"),
])
def test_refused_by_name(fake_server, bench_args, extra, message):
    with fake_server() as srv:
        with pytest.raises(ValueError, match=message):
            run_serve(bench_args(_argv(srv.url, *extra)))


def test_ready_check_names_the_flag_when_nothing_answers(bench_args):
    with pytest.raises(ValueError, match="--ready-check-timeout-sec 1"):
        run_serve(bench_args(_argv("http://127.0.0.1:9", "--ready-check-timeout-sec", "1")))


def test_extra_body_must_be_a_json_object(bench_args, capsys):
    with pytest.raises(SystemExit):
        bench_args(_argv("http://x", "--extra-body", "[1]"))
    assert "--extra-body: must be a JSON object" in capsys.readouterr().err


def test_peak_output_tokens_per_s_counts_chunks_in_one_second_buckets():
    def out(start, ttft, itl):
        return RequestOutput(success=True, start_time=start, ttft=ttft, itl=itl, latency=ttft + sum(itl),
                             generated_text="x", output_tokens=len(itl) + 1)
    outs = [out(10.0, 0.5, [0.1, 0.1]), out(10.2, 0.4, [0.2, 0.6]), RequestOutput(error="x")]
    # tokens at 10.5, 10.6, 10.7 and 10.6, 10.8, 11.4: five in [10, 11), one in [11, 12)
    assert peak_output_tokens_per_s(outs) == 5.0
    res = compute_metrics(outs, 2.0, count_tokens=len)
    text = format_summary({**res, "request_rate": "inf"})
    assert "Peak output token throughput (tok/s):    5.00" in text
    assert peak_output_tokens_per_s([RequestOutput(error="x")]) == 0.0


def test_backend_and_label_name_the_result_file():
    from deepserve.bench.serve import backend_name, check_backend, result_filename
    base = dict(request_rate=2.0, max_concurrency=None, model="m", endpoint="/v1/chat/completions", label=None)
    assert backend_name(SimpleNamespace(**base, backend=None)) == "openai-chat"
    assert backend_name(SimpleNamespace(**base, backend="openai-chat")) == "openai-chat"
    assert result_filename(SimpleNamespace(**base, backend=None)).startswith("openai-chat-2.0qps-m-")
    comp = {**base, "endpoint": "/v1/completions", "label": "L"}
    assert result_filename(SimpleNamespace(**comp, backend="vllm")).startswith("L-2.0qps-m-")
    check_backend(SimpleNamespace(**comp, backend="vllm"))
    check_backend(SimpleNamespace(**base, backend="openai-chat"))
    # vLLM's backends post to one endpoint each: a contradiction is refused, not sent the other way
    with pytest.raises(ValueError, match="--backend openai-chat sends to /v1/chat/completions, but --endpoint is "
                                         "/v1/completions"):
        check_backend(SimpleNamespace(**comp, backend="openai-chat"))
    with pytest.raises(ValueError, match="--backend openai sends to /v1/completions"):
        check_backend(SimpleNamespace(**base, backend="openai"))


class CountingLLM:
    """vLLM's `LLM.generate` shape; records each call's prompts and returns max_tokens ids each."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=False):
        params = params if isinstance(params, list) else [params] * len(prompts)
        self.calls.append(prompts)
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[0] * p.max_tokens)]) for p in params]


def test_throughput_takes_vllms_random_flags_and_warmups(bench_args, monkeypatch, capsys):
    from deepserve.bench import offline

    llm = CountingLLM()
    monkeypatch.setattr(offline, "_load_engine", lambda args: (llm, SimpleNamespace, 1000, 0))
    args = bench_args(["throughput", "--backend", "vllm", "--num-prompts", "20", "--random-input-len", "10",
                       "--random-output-len", "8", "--random-range-ratio", "0.5", "--random-prefix-len", "4",
                       "--num-warmups", "3", "--disable-tqdm"])
    res = offline.run_throughput(args)
    warm, run = llm.calls
    assert len(warm) == 3 and len(run) == 20
    ids = [p["prompt_token_ids"] for p in run]
    assert all(9 <= len(i) <= 19 for i in ids) and len({len(i) for i in ids}) > 1
    assert len({tuple(i[:4]) for i in ids}) == 1   # the shared prefix
    assert 20 * 4 <= res["total_output_tokens"] <= 20 * 12 and res["total_prompt_tokens"] == sum(map(len, ids))
    out = capsys.readouterr().out
    assert f"Total num prompt tokens:  {res['total_prompt_tokens']}\n" in out


@pytest.mark.parametrize("argv, message", [
    (["--backend", "hf"], "--backend hf is not supported"),
    (["--dataset-name", "prefix_repetition", "--dataset-path", "x.json"],
     "--dataset-name prefix_repetition takes no --dataset-path"),
])
def test_throughput_refusals(bench_args, monkeypatch, argv, message):
    from deepserve.bench import offline

    monkeypatch.setattr(offline, "_load_engine", lambda args: (CountingLLM(), SimpleNamespace, 1000, 0))
    with pytest.raises(ValueError, match=message):
        offline.run_throughput(bench_args(["throughput", "--num-prompts", "2", "--disable-tqdm", *argv]))


@pytest.mark.parametrize("argv, line", [
    (["--async-engine"], "--async-engine is not supported: bench throughput runs the engine in-process"),
    (["--lora-path", "/a"], "--lora-path /a is not supported: deepserve serves no LoRA adapters"),
    (["--hf-name", "x/y"], "--hf-name x/y belongs to vLLM's hf dataset, which deepserve bench throughput does not "
                           "have (it has random, sharegpt, sonnet, prefix_repetition)"),
    (["--random-batch-size", "4"], "--random-batch-size 4 belongs to vLLM's random-rerank dataset"),
    (["--hf-max-batch-size", "8"], "--hf-max-batch-size 8 goes with vLLM's --backend hf"),
    (["--custom-output-len", "5"], "--custom-output-len 5 belongs to vLLM's custom_audio dataset"),
])
def test_throughput_names_vllms_flags_it_lacks(capsys, argv, line):
    # vLLM's `bench throughput` flags: argparse said "unrecognized arguments"
    from deepserve.cli.main import main

    assert main(["bench", "throughput", "--model", "m", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deepserve bench: error: " + line), err


class QueueingLLM(CountingLLM):
    """CountingLLM with vLLM's enqueue / wait_for_completion, recording which ran."""

    def enqueue(self, prompts, params, use_tqdm=False):
        self.queued = (prompts, params)

    def wait_for_completion(self, use_tqdm=False):
        self.prequeued = True
        return self.generate(*self.queued)


def test_throughput_vllms_dataset_spellings_and_defaults(bench_args, monkeypatch, shared_dir):
    # vLLM's throughput: --dataset (deprecated --dataset-path), prefix_repetition with its own flags,
    # sonnet at 550 in / 150 out with --prefix-len 0, --prequeue-requests (enqueue, then run)
    from deepserve.bench import offline
    from deepserve.bench.datasets import sample_prefix_repetition, sample_sonnet
    from deepserve.config import DEMO_MODEL
    from deepserve.engine.tokenizer import load_tokenizer

    def run(*argv):
        llm = QueueingLLM()
        monkeypatch.setattr(offline, "_load_engine", lambda args: (llm, SimpleNamespace, 1000, 0))
        offline.run_throughput(bench_args(["throughput", "--model", str(DEMO_MODEL), "--disable-tqdm", *argv]))
        return llm

    tok = load_tokenizer(DEMO_MODEL)
    sonnet = str(shared_dir / "datasets/serving/sonnet.txt")
    llm = run("--dataset", sonnet, "--dataset-name", "sonnet", "--num-prompts", "3")
    expected = sample_sonnet(tok, sonnet, 3, 550, 0, 150, chat_format=True, seed=0)
    assert llm.calls == [[{"prompt_token_ids": tok.encode(r.prompt, add_special_tokens=False)} for r in expected]]
    assert not hasattr(llm, "prequeued")
    llm = run("--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "6",
              "--prefix-repetition-suffix-len", "5", "--prefix-repetition-num-prefixes", "2",
              "--prefix-repetition-output-len", "3", "--output-len", "9", "--num-prompts", "4", "--prequeue-requests")
    expected = sample_prefix_repetition(tok, 4, 6, 5, 2, 3, seed=0)
    assert llm.calls == [[{"prompt_token_ids": tok.encode(r.prompt, add_special_tokens=False)} for r in expected]]
    assert llm.prequeued and llm.queued[1].max_tokens == 3   # its own output length, as vLLM's
    assert len({tuple(p["prompt_token_ids"][:4]) for p in llm.calls[0]}) == 2
    llm = run("--num-prompts", "2")   # random: 1024 in / 128 out without --input-len / --output-len
    assert [len(p["prompt_token_ids"]) for p in llm.calls[0]] == [1024, 1024]


def test_custom_jsonl_dataset(bench_args, tmp_path):
    from deepserve.bench.datasets import sample_requests
    from deepserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "What is the capital of India?", "output_tokens": 10}\n\n'
                    '{"prompt": "Name a prime.", "output_tokens": 3}\n')
    base = ["--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts", "3"]
    reqs = sample_requests(bench_args(_argv("http://x", *base, "--custom-output-len", "-1", "--skip-chat-template",
                                            "--disable-shuffle")), tok)
    assert [(r.prompt, r.expected_output_len) for r in reqs[:2]] == [("What is the capital of India?", 10),
                                                                     ("Name a prime.", 3)]
    assert len(reqs) == 3 and reqs[2] in reqs[:2] and reqs[0].prompt_len == tok.count(reqs[0].prompt)
    templated = sample_requests(bench_args(_argv("http://x", *base, "--output-len", "7")), tok)
    assert [r.expected_output_len for r in templated] == [7, 7, 7]
    # chat-templated for /v1/completions
    assert all(r.prompt not in ("Name a prime.", "What is the capital of India?") for r in templated)
    path.write_text('{"prompt": "no length"}\n')
    with pytest.raises(ValueError, match="output_tokens"):
        sample_requests(bench_args(_argv("http://x", *base, "--custom-output-len", "-1")), tok)
    with pytest.raises(ValueError, match="reads a .jsonl file"):
        sample_requests(bench_args(_argv("http://x", "--dataset-name", "custom", "--dataset-path", __file__)), tok)


def test_ready_check_stops_at_a_refusal(fake_server, bench_args):
    with fake_server(status=400) as srv:
        with pytest.raises(ValueError, match="refused the --ready-check-timeout-sec test request: HTTP 400"):
            run_serve(bench_args(_argv(srv.url, "--ready-check-timeout-sec", "20")))
        assert len(srv.stats()["requests"]) == 1


def test_ramp_up_rates_and_gaps():
    import numpy as np

    from deepserve.bench.serve import arrival_gaps, ramp_up_rates

    def ns(strategy, start, end, rate=float("inf")):
        return SimpleNamespace(ramp_up_strategy=strategy, ramp_up_start_rps=start, ramp_up_end_rps=end,
                               request_rate=rate)
    assert ramp_up_rates(ns("linear", 2, 10), 5) == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert ramp_up_rates(ns("exponential", 1, 16), 5) == pytest.approx([1, 2, 4, 8, 16])
    assert ramp_up_rates(ns(None, None, None), 5) is None
    gaps = np.array(arrival_gaps(4001, ramp_up_rates(ns("linear", 1, 1000), 4001), 1.0, seed=0))
    assert gaps[0] == 0.0 and gaps[1:400].mean() > 5 * gaps[-400:].mean()
    for args, message in [(ns("linear", None, 5), "needs --ramp-up-start-rps and --ramp-up-end-rps"),
                          (ns(None, 1, 5), "need --ramp-up-strategy"),
                          (ns("linear", 5, 1), "must be > 0 and <= --ramp-up-end-rps"),
                          (ns("linear", 0, 1), "must be > 0"),
                          (ns("linear", 1, 5, rate=3.0), "--request-rate and --ramp-up-strategy")]:
        with pytest.raises(ValueError, match=message):
            ramp_up_rates(args, 5)


def test_ramp_up_run_writes_vllms_fields(fake_server, bench_args, tmp_path):
    argv = _argv("", "--random-input-len", "8", "--random-output-len", "2", "--ramp-up-strategy", "linear",
                 "--ramp-up-start-rps", "50", "--ramp-up-end-rps", "53", "--save-result", "--result-dir", str(tmp_path))
    argv[argv.index("--num-prompts") + 1] = "4"
    with fake_server(ttft=0.01, itl=0.005) as srv:
        argv[2] = srv.url
        run_serve(bench_args(argv))
    (path,) = tmp_path.glob("openai-ramp-up-linear-50qps-53qps-fake-model-*.json")
    res = json.loads(path.read_text())
    assert (res["ramp_up_strategy"], res["ramp_up_start_rps"], res["ramp_up_end_rps"]) == ("linear", 50, 53)
    assert [e["rps"] for e in res["rps_change_events"]] == [50, 51, 52, 53]
    assert res["completed"] == 4 and res["request_rate"] == "inf"


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_fixed_rate_schedule_ends_at_n_over_rate_as_vllms(burstiness):
    from deepserve.bench.serve import arrival_gaps

    for seed in range(3):
        gaps = arrival_gaps(50, 10.0, burstiness, seed)
        assert gaps[0] == 0.0 and sum(gaps) == pytest.approx(5.0)


def test_peak_concurrency_counts_requests_in_one_second_buckets():
    # vLLM's max_concurrent_requests: requests active in the same second of the run, so three that
    # follow each other within it count 3 (one in flight at any instant), one spanning two seconds
    # counts in both
    def out(start, latency):
        return RequestOutput(success=True, ttft=0.01, latency=latency, start_time=start, output_tokens=1)
    res = compute_metrics([out(10.0, 0.3), out(10.3, 0.3), out(10.6, 0.3), out(11.5, 1.0), RequestOutput(error="x")],
                          2.0, count_tokens=len)
    assert res["max_concurrent_requests"] == 3
    res = compute_metrics([out(10.0, 0.3), out(10.5, 1.2), out(11.9, 0.05)], 2.0, count_tokens=len)
    assert res["max_concurrent_requests"] == 2   # seconds 0: {1, 2}, 1: {2, 3}


def test_summary_prints_peak_concurrency_as_vllm():
    res = compute_metrics([RequestOutput(success=True, ttft=0.1, latency=0.2, itl=[0.1], start_time=1.0,
                                         generated_text="ab", output_tokens=2)], 1.0, count_tokens=len)
    assert "Peak concurrent requests:                1.00      " in format_summary({**res, "request_rate": "inf"})


def test_insecure_turns_certificate_checks_off(bench_args, monkeypatch):
    import httpx

    from deepserve.bench import serve

    seen = []

    class Refused(Exception):
        pass

    class Client:
        def __init__(self, **kwargs):
            seen.append(("client", kwargs["verify"]))
            raise Refused

    def get(url, **kwargs):
        seen.append(("get", kwargs["verify"]))
        raise httpx.ConnectError("no server")

    monkeypatch.setattr(serve.httpx, "AsyncClient", Client)
    monkeypatch.setattr(serve.httpx, "get", get)
    for argv, verify in (([], True), (["--insecure"], False)):
        seen.clear()
        with pytest.raises(Refused):
            run_serve(bench_args(_argv("https://127.0.0.1:9", "--random-input-len", "4", *argv)))
        assert seen == [("get", verify), ("client", verify)]


def test_short_files_are_oversampled_unless_no_oversample(bench_args, tmp_path):
    from deepserve.bench.datasets import sample_requests
    from deepserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Tell me a story about a cat."},
                                                    {"from": "gpt", "value": "Once upon a time a cat sat."}]}]))
    argv = _argv("http://x", "--dataset-name", "sharegpt", "--dataset-path", str(share))
    reqs = sample_requests(bench_args(argv), tok)
    assert len(reqs) == 3 and len({r.prompt for r in reqs}) == 1
    assert len(sample_requests(bench_args([*argv, "--no-oversample"]), tok)) == 1


def test_spec_decode_acceptance_from_the_servers_counters(fake_server, bench_args, capsys):
    # The fake server counts 2 drafts of 2 tokens per request received, 3 tokens accepted (2 at
    # position 0, 1 at position 1): over the 3 timed requests (the warm-up is before the count).
    argv = _argv("", "--random-input-len", "8", "--random-output-len", "2", "--num-warmups", "1")
    with fake_server(ttft=0.01, itl=0.005, spec_metrics=True) as srv:
        argv[2] = srv.url
        res = run_serve(bench_args(argv))
    assert (res["spec_decode_num_drafts"], res["spec_decode_draft_tokens"], res["spec_decode_accepted_tokens"]) == \
        (6, 12, 9)
    assert res["spec_decode_acceptance_rate"] == pytest.approx(75.0)
    assert res["spec_decode_acceptance_length"] == pytest.approx(2.5)
    assert res["spec_decode_per_position_acceptance_rates"] == pytest.approx([1.0, 0.5])
    out = capsys.readouterr().out
    assert "Acceptance rate (%):                     75.00" in out and "  Position 1:" in out
    with fake_server(ttft=0.01, itl=0.005) as srv:   # no /metrics: no spec_decode fields
        argv[2] = srv.url
        assert not [k for k in run_serve(bench_args(argv)) if k.startswith("spec_decode")]


def test_throughput_sharegpt_is_oversampled_unless_no_oversample(bench_args, tmp_path):
    from deepserve.bench.offline import dataset_prompts

    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Tell me a story about a cat."},
                                                    {"from": "gpt", "value": "Once upon a time a cat sat."}]}]))
    argv = ["throughput", "--dataset-name", "sharegpt", "--dataset-path", str(share), "--num-prompts", "4"]
    prompts, out_lens = dataset_prompts(bench_args(argv), seed=0)
    assert len(prompts) == len(out_lens) == 4 and len({tuple(p["prompt_token_ids"]) for p in prompts}) == 1
    assert len(dataset_prompts(bench_args([*argv, "--no-oversample"]), seed=0)[0]) == 1


def test_result_has_vllms_rtfx():
    res = compute_metrics([RequestOutput(error="x")], 1.0, count_tokens=len)
    assert res["rtfx"] == 0.0


@pytest.mark.parametrize("extra, message", [
    (["--hf-split", "train"], "--hf-split belongs to vLLM's hf dataset, which deepserve bench serve does not have"),
    (["--no-self-timed"], "--no-self-timed goes with vLLM's timed_trace dataset"),
    (["--plot-timeline", "--timeline-itl-thresholds", "10,20"], "--plot-timeline is not supported"),
    (["--random-mm-limit-mm-per-prompt", '{"image": 1}'], "--random-mm-limit-mm-per-prompt belongs to vLLM's "
                                                          "random-mm dataset"),
    (["--skip-tokenizer-init"], "--skip-tokenizer-init is not supported"),
    (["--dataset-name", "random-mm"], "--dataset-name random-mm is not supported: deepserve bench serve has random, "
                                      "sonnet, sharegpt, custom, prefix_repetition"),
    (["--backend", "openai-embeddings"], "--backend openai-embeddings is not supported"),
    (["--random-batch-size", "4"], "--random-batch-size 4: several prompts a request are vLLM's embeddings"),
    (["--endpoint", "/v1/chat/completions", "--logprobs", "2"], "--logprobs goes with /v1/completions only"),
])
def test_vllm_flags_deepserve_lacks_are_one_line(fake_server, extra, message, capsys):
    """vLLM 0.26 bench serve flags of features deepserve's bench lacks: one line naming the flag
    (argparse printed its whole usage, or a dataset-only flag would be ignored), nothing sent."""
    from deepserve.cli.main import main

    with fake_server() as srv:
        code = main(["bench", *_argv(srv.url, *extra)])
        sent = srv.stats()["requests"]
    err = capsys.readouterr().err
    assert code == 2 and err == f"deepserve bench: error: {err.split('error: ', 1)[1]}" and err.count("\n") == 1
    assert message in err and sent == []


def test_logprobs_lora_modules_and_beam_search_flag(fake_server, bench_args, capsys):
    # vLLM's --logprobs goes in each completions request, --lora-modules name the model of each
    # request (in turn with round-robin), --use-beam-search changes nothing (vLLM's serve ignores it)
    argv = _argv("", "--logprobs", "2", "--lora-modules", "a", "b", "--lora-assignment", "round-robin",
                 "--use-beam-search", "--max-concurrency", "1")
    with fake_server(ttft=0.001, itl=0.001) as srv:
        argv[2] = srv.url
        res = run_serve(bench_args(argv))
        bodies = srv.stats()["requests"]
    assert res["completed"] == 3 and [b["model"] for b in bodies] == ["a", "b", "a"]
    assert all(b["logprobs"] == 2 for b in bodies)
    assert "--use-beam-search has no effect" in capsys.readouterr().err
    with fake_server(ttft=0.001, itl=0.001) as srv:
        run_serve(bench_args(_argv(srv.url, "--lora-modules", "a", "b", "--num-prompts", "40")))
        models = [b["model"] for b in srv.stats()["requests"]]
    assert set(models) == {"a", "b"} and len(models) == 40


def test_custom_dataset_chat_template_kwargs(bench_args, tmp_path):
    from deepserve.bench.datasets import sample_requests
    from deepserve.engine.tokenizer import load_tokenizer

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes((TOKENIZER / "tokenizer.json").read_bytes())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ 'think:' if thinking else '' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    tok = load_tokenizer(str(tmp_path / "tok"))
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "Name a prime."}\n')
    base = ["--dataset-name", "custom", "--dataset-path", str(path), "--num-prompts", "1"]
    assert sample_requests(bench_args(_argv("http://x", *base)), tok)[0].prompt == "Name a prime."
    reqs = sample_requests(bench_args(_argv("http://x", *base, "--chat-template-kwargs", '{"thinking": true}')), tok)
    assert reqs[0].prompt == "think:Name a prime." and reqs[0].prompt_len == tok.count("think:Name a prime.")


def test_model_lookup_carries_the_key_and_headers_of_the_requests(bench_args, monkeypatch):
    # without --model the /v1/models lookup goes out as the requests do: OPENAI_API_KEY as the
    # bearer token (a server started with --api-key answers 401 without it), and --header (vLLM's)
    import httpx

    from deepserve.bench.serve import resolve_model

    seen = {}

    def get(url, **kwargs):
        seen.update(kwargs["headers"])
        return httpx.Response(200, json={"data": [{"id": "m", "root": "/w/m"}]}, request=httpx.Request("GET", url))
    monkeypatch.setattr(httpx, "get", get)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-1")
    args = bench_args(["serve", "--base-url", "http://h:1", "--header", "X-Team=a"])
    assert resolve_model(args) == "/w/m" and args.served_model_name == "m"
    assert seen == {"Authorization": "Bearer sk-1", "X-Team": "a"}


class RecordingLLM:
    """generate / beam_search that record what they were given."""

    def __init__(self):
        self.generated, self.searched = [], []

    def generate(self, prompts, params, use_tqdm=False):
        self.generated.append(params)
        return []

    def beam_search(self, prompts, params):
        self.searched.append(params)
        return []


@pytest.mark.parametrize("argv, enabled", [([], False), (["--enable-prefix-caching"], True)])
def test_latency_runs_without_prefix_caching_by_default(bench_args, argv, enabled):
    # vLLM's bench latency turns it off: each iteration sends the same prompts, which the cache
    # would otherwise serve after the first (a shorter prefill than the latency asked for)
    from deepserve.config import EngineArgs

    args = bench_args(["latency", "--model", "m", *argv])
    assert EngineArgs.from_cli_args(args).enable_prefix_caching is enabled
    assert EngineArgs.from_cli_args(bench_args(["throughput", "--model", "m"])).enable_prefix_caching is True


def test_latency_takes_vllms_n_beam_search_and_disable_detokenize(bench_args, monkeypatch, capsys):
    from deepserve import BeamSearchParams
    from deepserve.bench import offline

    def run(*flags):
        llm = RecordingLLM()
        monkeypatch.setattr(offline, "_load_engine", lambda args: (llm, SimpleNamespace, 1000, 0))
        offline.run_latency(bench_args(["latency", "--num-iters", "2", "--num-iters-warmup", "1", "--output-len", "5",
                                        "--disable-tqdm", *flags]))
        return llm
    llm = run("--n", "3", "--disable-detokenize")
    assert len(llm.generated) == 3 and not llm.searched
    p = llm.generated[0]
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.ignore_eos, p.detokenize) == (3, 1.0, 1.0, 5, True, False)
    # vLLM's latency and throughput sample one sequence at temperature 1 / top-p 1 too, never greedily
    assert vars(run().generated[0]) == {"max_tokens": 5, "ignore_eos": True, "n": 1, "temperature": 1.0, "top_p": 1.0}
    capsys.readouterr()
    monkeypatch.setattr(offline, "_load_engine", lambda args: (RecordingLLM(), SimpleNamespace, 1000, 0))
    offline.run_latency(bench_args(["latency", "--num-iters", "1", "--num-iters-warmup", "0", "--disable-tqdm"]))
    assert "(batch 8, 32 in / 128 out)" in capsys.readouterr().out   # vLLM's defaults
    llm = run("--use-beam-search", "--n", "2")
    assert len(llm.searched) == 3 and not llm.generated
    assert llm.searched[0] == BeamSearchParams(beam_width=2, max_tokens=5, ignore_eos=True)


@pytest.mark.parametrize("host, url", [("::1", "http://[::1]:8000"), ("[::1]", "http://[::1]:8000"),
                                       ("127.0.0.1", "http://127.0.0.1:8000"), ("node-1", "http://node-1:8000")])
def test_host_and_port_join_as_vllm_joins_them(bench_args, host, url):
    # an IPv6 --host goes in brackets, as vLLM writes it
    from deepserve.bench.serve import base_url_of

    assert base_url_of(bench_args(["serve", "--host", host])) == url


@pytest.mark.parametrize("dataset", ["random", "prefix_repetition"])
def test_random_prompts_aligned_to_the_servers_tokenizer(fake_server, bench_args, dataset, capsys):
    # vLLM 0.26: a server whose /tokenize counts the prompts longer than the bench's tokenizer gets
    # them cut to their prompt_len in its own tokens (here one a character)
    argv = _argv("", "--dataset-name", dataset, "--random-input-len", "12", "--prefix-repetition-prefix-len", "6",
                 "--prefix-repetition-suffix-len", "6", "--prefix-repetition-num-prefixes", "1", "--output-len", "2")
    with fake_server(ttft=0.001, itl=0.001, char_tokenizer=True) as srv:
        argv[2] = srv.url
        run_serve(bench_args([*argv, "--header", "X-Team=a"]))
        prompts = [b["prompt"] for b in srv.stats()["requests"]]
        assert all(h["x-team"] == "a" for h in srv.stats()["tokenize_headers"])   # 1 + 3 + 3 calls
        assert len(srv.stats()["tokenize_headers"]) == 7
    assert [len(p) for p in prompts] == [12] * 3
    assert "the server's tokenizer counts" in capsys.readouterr().err
    with fake_server(ttft=0.001, itl=0.001) as srv:   # no /tokenize: as sampled
        argv[2] = srv.url
        run_serve(bench_args(argv))
        assert all(len(b["prompt"]) > 12 for b in srv.stats()["requests"])
    assert "the server has no /tokenize" in capsys.readouterr().err
