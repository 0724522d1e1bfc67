"""`deepserve bench serve | sweep | latency | throughput`: vLLM's bench commands, same flags.

`serve` and `sweep` measure any OpenAI-compatible server over HTTP; `latency` and
`throughput` run the engine in-process. Flag names, defaults and meanings follow
`vllm bench ...`, so commands and result JSON carry over from vLLM runs.
"""
from __future__ import annotations

import argparse
import json

from deepserve.bench.client import ENDPOINTS
from deepserve.cli.arg_types import int_at_least
from deepserve.bench.datasets import DATASET_NAMES
from deepserve.server.vllm_flags import add_refused_flags, check_refused


def _rate(text: str) -> float:
    value = float(text)  # accepts "inf"
    if not value > 0:   # NaN too
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (or inf), got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


_count = int_at_least(0)


def _burstiness(text: str) -> float:
    value = float(text)  # accepts "inf": gaps of exactly 1 / rate
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return value


def _range_ratio(text: str):
    from deepserve.bench.datasets import parse_range_ratio

    try:
        return parse_range_ratio(text)
    except ValueError as exc:   # argparse names the flag first
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--random-range-ratio ")) from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


# `vllm bench serve` flags of features deepserve's bench does not have: each is parsed (whatever
# its values) and refused in one line naming it, never ignored.
_DATASET_FLAGS = {   # vLLM dataset: its own flags
    "hf": ("--hf-name", "--hf-split", "--hf-subset", "--hf-output-len", "--no-stream"),
    "hf (audio)": ("--asr-max-audio-len-sec", "--asr-min-audio-len-sec"),
    "hf (blazedit)": ("--blazedit-min-distance", "--blazedit-max-distance"),
    "hf (BFCL)": ("--bfcl-categories",),
    "random-mm": ("--random-mm-base-items-per-request", "--random-mm-bucket-config",
                  "--random-mm-limit-mm-per-prompt", "--random-mm-num-mm-items-range-ratio",
                  "--enable-multimodal-chat"),
    "random-rerank": ("--no-reranker",),
    "custom_image": ("--custom-ensure-client-side-data",),
    "spec_bench": ("--spec-bench-category", "--spec-bench-output-len"),
    "speed_bench": ("--speed-bench-category", "--speed-bench-dataset-subset", "--speed-bench-output-len"),
    "timed_trace": ("--timed-trace-chunk-hash-size", "--timed-trace-label-hash-ids",
                    "--timed-trace-label-input-length", "--timed-trace-label-output-length",
                    "--timed-trace-label-timestamp", "--timed-trace-sec-multiplier"),
}
VLLM_REFUSED = {
    **{flag: f"belongs to vLLM's {name} dataset, which deepserve bench serve does not have"
       for name, flags in _DATASET_FLAGS.items() for flag in flags},
    "--self-timed": "replays the timestamps of vLLM's timed_trace dataset, which deepserve bench serve does not have",
    "--no-self-timed": "goes with vLLM's timed_trace dataset, which deepserve bench serve does not have",
    "--skip-tokenizer-init": "is not supported: the prompts are built and counted with the tokenizer "
                             "(vLLM's bench serve stops without one too)",
    "--plot-timeline": "is not supported (bench sweep draws throughput against latency)",
    "--timeline-itl-thresholds": "is not supported (it colours vLLM's --plot-timeline, which deepserve does not draw)",
    "--plot-dataset-stats": "is not supported (the result JSON has input_lens and output_lens with --save-detailed)",
}


THROUGHPUT_DATASETS = ("random", "sharegpt", "sonnet", "prefix_repetition")
# `vllm bench throughput` flags of features deepserve's does not have, refused in one line each.
_TP_DATASET_FLAGS = {
    "hf": ("--hf-name", "--hf-split", "--hf-subset"),
    "random-mm": ("--random-mm-base-items-per-request", "--random-mm-bucket-config",
                  "--random-mm-limit-mm-per-prompt", "--random-mm-num-mm-items-range-ratio",
                  "--enable-multimodal-chat"),
    "random-rerank": ("--no-reranker", "--random-batch-size"),
    "custom_audio": ("--custom-output-len", "--asr-min-audio-len-sec", "--asr-max-audio-len-sec"),
}
THROUGHPUT_REFUSED = {
    **{flag: f"belongs to vLLM's {name} dataset, which deepserve bench throughput does not have "
             f"(it has {', '.join(THROUGHPUT_DATASETS)})"
       for name, flags in _TP_DATASET_FLAGS.items() for flag in flags},
    "--async-engine": "is not supported: bench throughput runs the engine in-process (vLLM's LLM path); "
                      "bench serve against `deepserve serve` measures the async engine",
    "--hf-max-batch-size": "goes with vLLM's --backend hf, which deepserve does not have",
    "--hf-enable-torch-compile": "goes with vLLM's --backend hf, which deepserve does not have",
    "--lora-path": "is not supported: deepserve serves no LoRA adapters",
    "--lora-assignment": "is not supported: deepserve serves no LoRA adapters",
}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=None, help="Server URL, root or /v1 (overrides --host/--port).")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--endpoint", default="/v1/completions", choices=ENDPOINTS)
    g.add_argument("--model", default=None, help="Model name sent in requests (default: the first "
                   "model the server lists); also the tokenizer folder when it is a local path.")
    g.add_argument("--served-model-name", default=None, help="Name sent in requests when it differs "
                   "from --model.")
    g.add_argument("--tokenizer", default=None, help="Tokenizer folder (tokenizer.json) to count tokens "
                   "with; default: --model when it is a folder.")
    g.add_argument("--tokenizer-mode", default="auto", help="auto or hf (tokenizer.json); others are refused.")
    g.add_argument("--insecure", action="store_true", help="Do not check an https server's certificate.")
    g.add_argument("--request-timeout", type=_seconds, default=6 * 3600.0, help="Seconds per request.")
    g.add_argument("--profile", action="store_true", help="vLLM's: POST /start_profile before the run (after the "
                   "warm-ups) and /stop_profile after it; the server needs --profiler-config.")
    g.add_argument("--backend", default=None,
                   help="vLLM's request formats: openai and vllm post to /v1/completions, openai-chat to "
                        "/v1/chat/completions (default: what --endpoint names); vLLM's others are refused.")
    g.add_argument("--header", nargs="*", default=None, metavar="KEY=VALUE", help="HTTP headers of every request.")
    g.add_argument("--ready-check-timeout-sec", type=int, default=0,
                   help="Seconds to retry a first test request until the server answers (0: no check).")
    g.add_argument("--request-id-prefix", default=None,
                   help="Each request's x-request-id header is this prefix + its index "
                        "(default: bench-<random hex>-).")
    g.add_argument("--lora-modules", nargs="+", default=None, help="Model names sent instead of the "
                   "model, one chosen per request (LoRA adapters the server serves).")
    g.add_argument("--lora-assignment", default="random", choices=["random", "round-robin"],
                   help="How --lora-modules are chosen: at random (seeded by --seed) or in turn.")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="Accepted (vLLM's flag for loading the tokenizer); tokenizer.json is read as data, "
                        "no code from the model folder runs.")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset-name", default="random",
                   help=f"{', '.join(DATASET_NAMES[:-1])}; vLLM's others are refused.")
    d.add_argument("--dataset-path", default=None, help="sonnet.txt, ShareGPT JSON or custom JSONL file.")
    d.add_argument("--num-prompts", type=int, default=1000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--input-len", type=int, default=None,
                   help="Sets --random-input-len and --sonnet-input-len.")
    d.add_argument("--output-len", type=int, default=None,
                   help="Sets every dataset's output length (--random-output-len, --sonnet-output-len, ...).")
    d.add_argument("--random-input-len", type=int, default=1024)
    d.add_argument("--random-output-len", type=int, default=128)
    d.add_argument("--random-range-ratio", type=_range_ratio, default=0.0,
                   help="Lengths drawn uniformly in [len*(1-r), len*(1+r)]; a JSON object "
                        "'{\"input\": 0.3, \"output\": 0.5}' gives input and output their own r.")
    d.add_argument("--random-prefix-len", type=_count, default=0, help="Random tokens before each prompt.")
    d.add_argument("--sonnet-input-len", type=int, default=550)
    d.add_argument("--sonnet-output-len", type=int, default=150)
    d.add_argument("--sonnet-prefix-len", type=int, default=200)
    d.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="Output length for every request (default: the dataset reply's length).")
    d.add_argument("--custom-output-len", type=int, default=256,
                   help="custom: output tokens per request (-1: each line's output_tokens).")
    d.add_argument("--skip-chat-template", action="store_true",
                   help="custom: send the prompts as they are (else chat-templated for /v1/completions).")
    d.add_argument("--chat-template-kwargs", type=_json_object, default=None,
                   help="custom: JSON object of chat-template arguments (e.g. '{\"thinking\": true}').")
    d.add_argument("--disable-shuffle", action="store_true", help="custom: keep the file's order.")
    d.add_argument("--random-batch-size", type=int, default=1,
                   help="vLLM's prompts per request of its embeddings benchmark; only 1 here.")
    d.add_argument("--no-oversample", action="store_true",
                   help="sharegpt, custom: send only the file's usable entries, even fewer than --num-prompts.")
    d.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    d.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    d.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    d.add_argument("--prefix-repetition-output-len", type=int, default=128)
    t = p.add_argument_group("traffic")
    t.add_argument("--request-rate", type=_rate, default=float("inf"),
                   help="Requests/s, Poisson arrivals (inf: all at once).")
    t.add_argument("--burstiness", type=_burstiness, default=1.0,
                   help="Gamma shape of the arrival gaps: 1 Poisson, <1 burstier, >1 more regular.")
    t.add_argument("--ramp-up-strategy", default=None, choices=["linear", "exponential"],
                   help="Request rate going from --ramp-up-start-rps to --ramp-up-end-rps over the run "
                        "(replaces --request-rate).")
    t.add_argument("--ramp-up-start-rps", type=int, default=None)
    t.add_argument("--ramp-up-end-rps", type=int, default=None)
    t.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight.")
    t.add_argument("--ignore-eos", action="store_true",
                   help="Ask the server to ignore EOS (always on for --dataset-name random, as in vLLM).")
    t.add_argument("--temperature", type=float, default=None,
                   help="Sent with every request (default: not sent, the server's default applies, as in "
                        "vLLM; --temperature 0 for greedy).")
    for flag, kind in (("--top-p", float), ("--top-k", int), ("--min-p", float), ("--frequency-penalty", float),
                       ("--presence-penalty", float), ("--repetition-penalty", float)):
        t.add_argument(flag, type=kind, default=None, help="Sampling parameter sent with every request.")
    t.add_argument("--logprobs", type=int, default=None,
                   help="Log-probabilities per token asked for in each /v1/completions request.")
    t.add_argument("--use-beam-search", action="store_true",
                   help="Accepted with a note: vLLM's bench serve does not use it either.")
    t.add_argument("--extra-body", type=_json_object, default=None,
                   help="JSON object merged into every request body.")
    t.add_argument("--num-warmups", type=_count, default=0, help="Untimed requests before the run.")
    r = p.add_argument_group("results")
    r.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000.")
    r.add_argument("--percentile-metrics", default=None,
                   help="Latencies whose statistics are printed and stored, of ttft,tpot,itl,e2el "
                        "(default: ttft,tpot,itl; sweep: all four).")
    r.add_argument("--metric-percentiles", default="99", help="Percentiles of each, e.g. 50,90,99.")
    r.add_argument("--save-result", action="store_true")
    r.add_argument("--save-detailed", action="store_true", help="Also save each generated text.")
    r.add_argument("--append-result", action="store_true",
                   help="Append the result to the result file as one JSON line.")
    r.add_argument("--metadata", nargs="*", default=None, metavar="KEY=VALUE",
                   help="Extra key-value pairs stored in the result JSON.")
    r.add_argument("--result-dir", default=None)
    r.add_argument("--result-filename", default=None)
    r.add_argument("--label", default=None)
    r.add_argument("--disable-tqdm", action="store_true")
    add_refused_flags(p, VLLM_REFUSED, switches=())


def _unreachable(exc) -> str:
    """One line for a request of the bench's own (not a measured one, whose errors are counted)
    that could not reach the server: the --profile POSTs (no ready check before them by default)."""
    return f"{exc.request.method} {exc.request.url}: {exc or type(exc).__name__} (is the server up there?)"


def check_reachable(url: str, timeout_s: float = 10.0) -> None:
    """One line naming `url` when nothing answers at its host and port (a refused connection, a
    host name that does not resolve), before a run whose every request would fail or be retried
    for minutes. Only a TCP connection is opened: the server sees no request."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = "no answer in {:g} s".format(timeout_s) if isinstance(exc, TimeoutError) else exc.strerror or exc
        raise RuntimeError(f"cannot reach {url}: {reason} (is the server up there?)") from None


def _check_server(args) -> None:
    """The server of `bench serve` / `sweep` is there, unless --ready-check-timeout-sec waits for it."""
    from deepserve.bench.client import api_url
    from deepserve.bench.serve import base_url_of

    if getattr(args, "ready_check_timeout_sec", 0) <= 0:
        check_reachable(api_url(base_url_of(args), args.endpoint))


def _serve(args) -> int:
    import httpx

    from deepserve.bench.serve import run_serve

    check_refused(args, VLLM_REFUSED, served={}, message="{flag} {why}")
    _check_server(args)
    try:
        result = run_serve(args)
    except httpx.TransportError as exc:
        raise RuntimeError(_unreachable(exc)) from None
    # failed requests (their count and first error printed) make the run no clean measurement
    return 1 if result.get("failed") else 0


def _sweep(args) -> int:
    import httpx

    from deepserve.bench.sweep import run_sweep

    if args.vllm_sweep:
        raise ValueError(f"`bench sweep {args.vllm_sweep[0]}` is vLLM's sweep runner, which deepserve does not "
                         "have; deepserve bench sweep runs bench serve's flags against one server at each of "
                         "--max-concurrency-list / --request-rate-list")
    check_refused(args, VLLM_REFUSED, served={}, message="{flag} {why}")
    _check_server(args)
    try:
        out = run_sweep(args)
    except httpx.TransportError as exc:
        raise RuntimeError(_unreachable(exc)) from None
    return 1 if any(r.get("failed") for r in out["runs"]) else 0


def _check_engine(args) -> None:
    """The engine flags against the model before any rank starts, as `serve` checks them."""
    from deepserve.cli.serve import check_in_process
    from deepserve.config import EngineArgs

    check_in_process(EngineArgs.from_cli_args(args))


def _latency(args) -> int:
    from deepserve.bench.offline import run_latency

    _check_engine(args)
    run_latency(args)
    return 0


def _throughput(args) -> int:
    from deepserve.bench.offline import run_throughput

    check_refused(args, THROUGHPUT_REFUSED, served={"--random-batch-size": ("1",)}, message="{given} {why}")
    _check_engine(args)
    run_throughput(args)
    return 0


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    from deepserve.config import EngineArgs

    EngineArgs.add_cli_args(p)
    latency = p.prog.endswith("latency")
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=32 if latency else None,
                   help="Prompt tokens" + (" (random prompts)." if latency else
                                           " (random: default 1024; sonnet: default 550, as vLLM's)."))
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=None,
                   help="Tokens generated per request (default: 128; sonnet: 150; sharegpt: the dataset reply's "
                        "length; prefix_repetition: --prefix-repetition-output-len).")
    p.add_argument("--output-json", default=None, help="Write the result JSON here.")
    p.add_argument("--disable-tqdm", action="store_true")
    p.add_argument("--disable-detokenize", action="store_true",
                   help="vLLM's: no text made from the generated tokens (detokenizing is left out of the time).")
    p.add_argument("--n", type=int, default=1,
                   help="Generated sequences a prompt (vLLM's; above 1 they sample at temperature 1).")
    p.add_argument("--profile", action="store_true",
                   help="vLLM's: record the run with the engine's --profiler-config (latency: one batch after "
                        "the warm-up, untimed; throughput: the measured run).")


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="Benchmark a server (serve, sweep) or the engine "
                                  "(latency, throughput).")
    sub = bench.add_subparsers(dest="bench_command", metavar="KIND", required=True)

    serve = sub.add_parser("serve", help="Load an OpenAI-compatible server; TTFT/TPOT/ITL/E2EL, throughput.")
    add_serve_args(serve)
    serve.set_defaults(func=_serve)

    sweep = sub.add_parser("sweep", help="bench serve at several concurrencies/rates; Markdown + PNG.")
    add_serve_args(sweep)
    sweep.add_argument("--max-concurrency-list", type=int, nargs="+", default=None)
    sweep.add_argument("--request-rate-list", type=_rate, nargs="+", default=None)
    # vLLM's `bench sweep serve|serve_workload|startup|plot|plot_pareto ...`, taken whole to be named
    sweep.add_argument("vllm_sweep", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sweep.set_defaults(func=_sweep)

    latency = sub.add_parser("latency", help="In-process engine: latency of one batch.")
    _add_engine_args(latency)
    latency.add_argument("--batch-size", type=int, default=8)
    latency.add_argument("--num-iters", type=int, default=30)
    latency.add_argument("--num-iters-warmup", type=int, default=10)
    latency.add_argument("--use-beam-search", action="store_true", help="vLLM's: beam search of --n beams.")
    # as vLLM's: the same prompts every iteration would be served from the prefix cache
    latency.set_defaults(enable_prefix_caching=False)
    latency.set_defaults(func=_latency)

    throughput = sub.add_parser("throughput", help="In-process engine: requests/s and tokens/s.")
    _add_engine_args(throughput)
    throughput.add_argument("--num-prompts", type=int, default=1000)
    throughput.add_argument("--dataset-name", default=None, choices=THROUGHPUT_DATASETS,
                            help="Prompt source (default: sharegpt with --dataset-path, else random).")
    throughput.add_argument("--dataset-path", default=None, help="ShareGPT JSON or sonnet.txt file.")
    throughput.add_argument("--dataset", default=None, help="vLLM's deprecated spelling of --dataset-path.")
    throughput.add_argument("--prefix-len", type=int, default=0,
                            help="sonnet: tokens of shared prefix (vLLM's throughput default: 0).")
    for flag, default in (("prefix-len", 256), ("suffix-len", 256), ("num-prefixes", 10), ("output-len", 128)):
        throughput.add_argument(f"--prefix-repetition-{flag}", type=int, default=None,
                                help=f"prefix_repetition (default {default}, as vLLM's).")
    throughput.add_argument("--prequeue-requests", action="store_true",
                            help="vLLM's: every request queued before the engine schedules the first step.")
    throughput.add_argument("--random-range-ratio", type=_range_ratio, default=0.0,
                            help="random: input and output lengths drawn uniformly in [len*(1-r), len*(1+r)] "
                                 "(a JSON object '{\"input\": r, \"output\": r}' gives each its own).")
    throughput.add_argument("--random-prefix-len", type=int, default=0,
                            help="random: token ids shared by every prompt, before its own.")
    throughput.add_argument("--no-oversample", action="store_true",
                            help="sharegpt: only the file's usable entries, even fewer than --num-prompts.")
    throughput.add_argument("--num-warmups", type=_count, default=0,
                            help="Untimed requests of the same set (next seed) before the run.")
    throughput.add_argument("--backend", default="vllm", choices=["vllm", "hf", "mii", "vllm-chat"],
                            help="vLLM's: only vllm (the engine in-process) runs here; the others are refused.")
    add_refused_flags(throughput, THROUGHPUT_REFUSED, switches=())
    throughput.set_defaults(func=_throughput)
