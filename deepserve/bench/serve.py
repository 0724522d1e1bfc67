"""`deepserve bench serve`: load an OpenAI-compatible server and measure it.

Requests arrive as a Poisson process of `--request-rate` requests/s (all at once when inf);
with `--burstiness` b != 1 the gaps are Gamma(shape=b, scale=1/(rate*b)), vLLM's model of
bursty traffic (b < 1 burstier, b > 1 more regular, same mean rate; inf: every gap 1/rate). `--max-concurrency`
caps the requests in flight: an arriving request waits for a free slot, and its timing
starts when it is sent. The random and prefix_repetition prompts are aligned to the server's
tokenizer where its /tokenize counts them otherwise (vLLM 0.26's). The result dict carries
vLLM's field names and metadata, so tooling written for `vllm bench serve` JSON reads ours.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

import httpx
import numpy as np

from deepserve.bench.client import RequestInput, RequestOutput, api_url, send_request
from deepserve.bench.http1 import HTTPError, Http1Client
from deepserve.bench.datasets import SampleRequest, sample_requests
from deepserve.bench.metrics import (DEFAULT_METRICS, METRICS, compute_metrics, format_summary, parse_goodput,
                                     parse_spec_decode_counters, spec_decode_fields)
from deepserve.bench.results import check_result_path, write_result
from deepserve.engine.tokenizer import Tokenizer, resolve_tokenizer


def arrival_gaps(n: int, request_rate, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before sending each of `n` requests (the first is sent at once).
    `request_rate`: one rate, or each request's own (a ramp-up)."""
    rates = np.full(n, float(request_rate)) if np.isscalar(request_rate) else np.asarray(request_rate, float)
    if not (rates > 0).all():   # NaN too
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {burstiness}")
    if np.isinf(rates).all():
        return [0.0] * n
    if math.isinf(burstiness):   # vLLM's limit of the Gamma gaps: every gap 1 / rate, exactly
        gaps = 1.0 / rates
        gaps[0] = 0.0
        return gaps.tolist()
    rng = np.random.default_rng(seed)
    if np.isscalar(request_rate):
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    else:
        gaps = rng.gamma(shape=burstiness, size=n) / (rates * burstiness)   # 0 where a rate is inf
    gaps[0] = 0.0
    if np.isscalar(request_rate) and n > 1:
        # vLLM scales a fixed rate's schedule so that the last request goes out at n / rate: the
        # offered rate does not drift with the seed.
        gaps *= (n / request_rate) / gaps.sum()
    return gaps.tolist()


RAMP_UP_STRATEGIES = ("linear", "exponential")


def ramp_up_rates(args: argparse.Namespace, n: int) -> Optional[list[float]]:
    """vLLM's --ramp-up-strategy: request i of n is sent at a rate going from --ramp-up-start-rps
    to --ramp-up-end-rps, linearly or geometrically in i (None without a ramp-up)."""
    strategy = getattr(args, "ramp_up_strategy", None)
    start, end = getattr(args, "ramp_up_start_rps", None), getattr(args, "ramp_up_end_rps", None)
    if strategy is None:
        if start is not None or end is not None:
            raise ValueError("--ramp-up-start-rps / --ramp-up-end-rps need --ramp-up-strategy")
        return None
    if strategy not in RAMP_UP_STRATEGIES:
        raise ValueError(f"--ramp-up-strategy takes {' or '.join(RAMP_UP_STRATEGIES)}, got {strategy!r}")
    if start is None or end is None:
        raise ValueError("--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps")
    if not math.isinf(args.request_rate):
        raise ValueError("--request-rate and --ramp-up-strategy both set the rate: give one")
    if not 0 < start <= end:
        raise ValueError(f"--ramp-up-start-rps must be > 0 and <= --ramp-up-end-rps, got {start} and {end}")
    progress = np.arange(n) / max(n - 1, 1)
    if strategy == "linear":
        return (start + (end - start) * progress).tolist()
    return (start * (end / start) ** progress).tolist()


def rps_change_events(rates: Sequence[float], outputs: Sequence[RequestOutput]) -> list[dict]:
    """vLLM's rps_change_events: each whole rate the ramp-up reaches, with the wall-clock time
    (ISO) of the first request sent at it."""
    wall_minus_perf = time.time() - time.perf_counter()
    events, last = [], int(rates[0]) - 1 if rates else 0
    for rate, out in zip(rates, outputs):
        if int(rate) > last:
            stamp = datetime.fromtimestamp(out.start_time + wall_minus_perf).isoformat()
            events += [{"rps": r, "timestamp": stamp} for r in range(last + 1, int(rate) + 1)]
            last = int(rate)
    return events


async def _warm_up(client, url: str) -> None:
    """One untimed GET /v1/models first: it opens a connection, and httpx/anyio import their
    networking lazily on the first request (tens of ms), which would otherwise land in the first
    request's TTFT."""
    models = url[: url.index("/v1/") + len("/v1/")] + "models"
    try:
        await client.get(models)
    except (httpx.HTTPError, HTTPError):
        pass  # an unreachable server shows up as failed requests in the run itself


CLIENTS = ("auto", "httpx")


def open_client(url: str, timeout_s: float, verify: bool = True):
    """The client for `url`'s requests: the bench's own HTTP/1.1 client for http (a fraction of
    httpx's CPU per streamed token), httpx for https or when DEEPSERVE_BENCH_CLIENT=httpx (to
    compare the two)."""
    choice = os.environ.get("DEEPSERVE_BENCH_CLIENT", "auto")
    if choice not in CLIENTS:
        raise ValueError(f"DEEPSERVE_BENCH_CLIENT must be one of {', '.join(CLIENTS)}, got {choice!r}")
    if url.startswith("http://") and choice == "auto":
        return Http1Client(timeout_s)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    # trust_env=False: a proxy from the environment must not sit between bench and server.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False, verify=verify)


async def post_profile(url: str, timeout_s: float, verify: bool = True) -> None:
    """vLLM bench's --profile: POST the server's /start_profile or /stop_profile (`url`)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), trust_env=False, verify=verify) as http:
        resp = await http.post(url)
    if resp.status_code == 404:
        raise ValueError(f"{url}: 404; --profile needs a server started with --profiler-config")
    if resp.status_code != 200:
        raise RuntimeError(f"POST {url}: {resp.status_code} {resp.text[:300]}")


async def run_requests(inputs: Sequence[RequestInput], request_rate, burstiness: float,
                       max_concurrency: Optional[int], seed: int, timeout_s: float,
                       progress: bool = True, num_warmups: int = 0,
                       profile_root: Optional[str] = None, verify: bool = True,
                       on_start: Optional[Callable[[], None]] = None) -> tuple[list[RequestOutput], float]:
    """Send `inputs` on the arrival schedule (`request_rate`: one rate or each request's); returns
    their outputs (input order) and the wall time.
    `profile_root`: the server's root URL, whose profiler records the run (after the warm-ups).
    `verify`: check an https server's certificate (vLLM's --insecure turns it off). `on_start`:
    called after the warm-ups, just before the timed run."""
    from tqdm.auto import tqdm

    if max_concurrency is not None and max_concurrency < 0:
        raise ValueError(f"--max-concurrency must be >= 0 (0: no limit, as vLLM's), got {max_concurrency}")
    gaps = arrival_gaps(len(inputs), request_rate, burstiness, seed)
    async with open_client(inputs[0].api_url if inputs else "http://", timeout_s, verify) as client:
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def limited(req: RequestInput) -> RequestOutput:
            if slots is None:
                return await send_request(client, req)
            async with slots:
                return await send_request(client, req)

        if inputs:
            await _warm_up(client, inputs[0].api_url)
        if num_warmups > 0 and inputs:
            await asyncio.gather(*(limited(inputs[0]) for _ in range(num_warmups)))
        if on_start:
            await asyncio.to_thread(on_start)
        if profile_root:
            await post_profile(profile_root + "/start_profile", timeout_s, verify)
        bar = tqdm(total=len(inputs), disable=not progress, desc="requests", file=sys.stderr)

        async def tracked(req: RequestInput) -> RequestOutput:
            out = await limited(req)
            bar.update(1)
            return out

        start = time.perf_counter()
        tasks = []
        # Send times are fixed from the start (cumulative gaps), so sleep overshoot does not
        # slow the offered rate down.
        for req, send_at in zip(inputs, np.cumsum(gaps)):
            delay = start + send_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tracked(req)))
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        if profile_root:   # returns once the server's traces are written
            await post_profile(profile_root + "/stop_profile", timeout_s, verify)
    return list(outputs), duration


def result_filename(args: argparse.Namespace, date: Optional[str] = None) -> str:
    """vLLM's default name: {label or backend}-{rate}qps[-concurrency{n}]-{model}-{date}.json, with
    ramp-up-{strategy}-{start}qps-{end}qps for the rate under a ramp-up; `date` (the result's
    "date", as vLLM names the file after it) defaults to now."""
    rate = "inf" if math.isinf(args.request_rate) else str(float(args.request_rate))   # 20.0qps, as vLLM writes it
    if getattr(args, "ramp_up_strategy", None):
        rate = f"ramp-up-{args.ramp_up_strategy}-{args.ramp_up_start_rps}qps-{args.ramp_up_end_rps}"
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency is not None else ""
    model = Path(str(args.model)).name or "model"
    prefix = getattr(args, "label", None) or backend_name(args)
    return f"{prefix}-{rate}qps{conc}-{model}-{date or f'{datetime.now():%Y%m%d-%H%M%S}'}.json"


def backend_name(args: argparse.Namespace) -> str:
    """--backend as given, else the format --endpoint implies (openai, openai-chat)."""
    return getattr(args, "backend", None) or ("openai-chat" if "chat" in args.endpoint else "openai")


BACKENDS = ("vllm", "openai", "openai-chat")


def check_backend(args: argparse.Namespace) -> None:
    """vLLM's backends post to one endpoint each: openai and vllm to completions, openai-chat to
    chat completions; a --backend that contradicts --endpoint is refused, as vLLM refuses it."""
    backend = getattr(args, "backend", None)
    if backend not in (None, *BACKENDS):
        raise ValueError(f"--backend {backend} is not supported: deepserve bench serve sends text generation "
                         f"requests ({', '.join(BACKENDS)})")
    wants = "/v1/chat/completions" if backend == "openai-chat" else "/v1/completions"
    if backend and args.endpoint != wants:
        raise ValueError(f"--backend {backend} sends to {wants}, but --endpoint is {args.endpoint} "
                         f"(pass --endpoint {wants}, or leave --backend out)")


def key_values(items: Optional[Sequence[str]], flag: str) -> dict[str, str]:
    """`["K=V", ...]` (--header, --metadata) as a dict."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


SAMPLING_FLAGS = ("top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


def request_body_extras(args: argparse.Namespace) -> dict:
    """The sampling flags given, then --extra-body over them (vLLM's order)."""
    body = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "logprobs", None) is not None:
        if "chat" in args.endpoint:
            raise ValueError("--logprobs goes with /v1/completions only (vLLM's chat requests do not carry it)")
        body["logprobs"] = args.logprobs
    body.update(getattr(args, "extra_body", None) or {})
    return body


TOKENIZER_MODES = ("auto", "hf")


def check_tokenizer_mode(mode: Optional[str]) -> None:
    if mode not in (None, *TOKENIZER_MODES):
        raise ValueError(f"--tokenizer-mode {mode} is not supported (tokenizer.json is read; "
                         f"use {' or '.join(TOKENIZER_MODES)})")


async def _ready_check(req: RequestInput, timeout_s: float, verify: bool) -> RequestOutput:
    """vLLM's --ready-check-timeout-sec: send `req` until it succeeds, the server refuses it (4xx),
    or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with open_client(req.api_url, max(1.0, deadline - time.monotonic()), verify) as client:
            out = await send_request(client, req)
        # A 4xx is the server's answer to the request itself: retrying cannot change it.
        if out.success or out.error.startswith("HTTP 4") or time.monotonic() >= deadline:
            return out
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def wait_until_ready(req: RequestInput, timeout_s: int, verify: bool = True) -> None:
    out = asyncio.run(_ready_check(req, timeout_s, verify))
    if out.error.startswith("HTTP 4"):
        raise ValueError(f"the server refused the --ready-check-timeout-sec test request: {out.error}")
    if not out.success:
        raise ValueError(f"the server did not answer a test request within --ready-check-timeout-sec "
                         f"{timeout_s}: {out.error}")


def base_url_of(args: argparse.Namespace) -> str:
    """--base-url, else http://--host:--port (an IPv6 address in brackets, as vLLM joins them)."""
    if args.base_url:
        return args.base_url
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    return f"http://{host}:{args.port}"


def spec_decode_counters(root: str, verify: bool) -> Optional[dict]:
    """The server's vLLM spec_decode counters from `root`/metrics (None: none, or no /metrics)."""
    try:
        resp = httpx.get(root + "/metrics", timeout=30.0, trust_env=False, verify=verify)
    except httpx.HTTPError:
        return None
    return parse_spec_decode_counters(resp.text) if resp.status_code == 200 else None


def lookup_headers(args: argparse.Namespace) -> dict:
    """The headers of the bench's own requests (model list, tokenizer): `args.api_key` or else
    OPENAI_API_KEY as the bearer token, then --header."""
    key = getattr(args, "api_key", None) or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(key_values(getattr(args, "header", None), "--header"))
    return headers


def model_cards(args: argparse.Namespace) -> list[dict]:
    """The model cards the server lists at /v1/models (each with its "id"; vLLM's and ours with
    "max_model_len"), asked with lookup_headers (a server started with --api-key answers /v1/*
    only with its key)."""
    url = api_url(base_url_of(args), "/v1/completions").replace("/completions", "/models")
    try:
        resp = httpx.get(url, timeout=30.0, trust_env=False, verify=not getattr(args, "insecure", False),
                         headers=lookup_headers(args))
        resp.raise_for_status()
        cards = resp.json()["data"]
        if not all("id" in card for card in cards):
            raise KeyError("id")
    except httpx.HTTPStatusError as exc:   # its text runs on to a second line of documentation links
        raise ValueError(f"{url} did not list the served models (HTTP {exc.response.status_code} "
                         f"{exc.response.reason_phrase})") from None
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{url} did not list the served models ({exc})") from None
    if not cards:
        raise ValueError(f"{url} lists no model")
    return cards


def served_models(args: argparse.Namespace) -> list[str]:
    """The model names the server lists at /v1/models."""
    return [card["id"] for card in model_cards(args)]


def resolve_model(args: argparse.Namespace) -> str:
    """`--model`, or when it is not given, as vLLM: the "root" (the model's path, which the
    tokenizer and result name come from) of the first model the server lists at /v1/models,
    whose "id" the requests then carry unless --served-model-name says otherwise."""
    if args.model:
        return args.model
    try:
        card = model_cards(args)[0]
    except ValueError as exc:
        raise ValueError(f"no --model given and {exc}") from None
    args.served_model_name = args.served_model_name or card["id"]
    return card.get("root") or card["id"]


def request_model_name(args: argparse.Namespace, quiet: bool = False) -> str:
    """The name requests carry: --served-model-name, else --model when the server serves it,
    else the server's only model (the vllm-ascend guide benchmarks a server started with
    `--served-model-name deepseek_r1` by its path, which vLLM would answer with 404s)."""
    if args.served_model_name:
        return args.served_model_name
    try:
        names = served_models(args)
    except ValueError:
        return args.model  # an unreachable server shows up as failed requests
    if args.model in names or len(names) != 1:
        return args.model
    if not quiet:
        print(f"bench serve: the server does not serve {args.model!r}; sending its only model {names[0]!r} "
              "(--served-model-name chooses)", file=sys.stderr)
    return names[0]


def request_models(args: argparse.Namespace, name: str, n: int) -> list[str]:
    """The model name of each of `n` requests: `name`, or with vLLM's --lora-modules one of them
    per request, in turn (--lora-assignment round-robin) or at random (seeded by --seed)."""
    modules = getattr(args, "lora_modules", None)
    if not modules:
        return [name] * n
    if args.lora_assignment == "round-robin":
        return [modules[i % len(modules)] for i in range(n)]
    return random.Random(args.seed).choices(modules, k=n)


def parse_percentiles(percentiles: str, metrics: Optional[str]) -> tuple[list[float], list[str]]:
    """`--metric-percentiles 90,99` and `--percentile-metrics ttft,tpot` (None: vLLM's default
    for generation, ttft,tpot,itl), checked."""
    values = []
    for p in str(percentiles).split(","):
        try:
            value = float(p)
        except ValueError:
            raise ValueError(f"--metric-percentiles takes numbers like 90,95,99, got {p!r}") from None
        if not 0 <= value <= 100:
            raise ValueError(f"--metric-percentiles must be in [0, 100], got {p!r}")
        values.append(value)
    names = list(DEFAULT_METRICS) if metrics is None else [m.strip() for m in str(metrics).split(",") if m.strip()]
    for name in names:
        if name not in METRICS:
            raise ValueError(f"--percentile-metrics takes {','.join(METRICS)}, got {name!r}")
    return values, names


ALIGNED_DATASETS = ("random", "prefix_repetition", "prefix-repetition")


async def _align_to_server(root: str, model: str, requests: list[SampleRequest], verify: bool,
                           headers: dict, quiet: bool) -> list[SampleRequest]:
    """vLLM's re-alignment of random prompts: when the server's tokenizer (its /tokenize, no
    special tokens) counts the first prompt otherwise than the bench's, each prompt it counts
    longer is cut to its prompt_len in the server's tokens (/detokenize). A server without these
    endpoints, or a request to them that fails, leaves the prompts as they are."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), trust_env=False, verify=verify,
                                 headers=headers) as http:
        slots = asyncio.Semaphore(64)

        async def post(path: str, body: dict) -> dict:
            async with slots:
                resp = await http.post(root + path, json={"model": model, **body})
            resp.raise_for_status()
            return resp.json()

        async def tokens(prompt: str) -> list[int]:
            return (await post("/tokenize", {"prompt": prompt, "add_special_tokens": False}))["tokens"]

        try:
            first = await tokens(requests[0].prompt)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            if not quiet:
                print("bench serve: the server has no /tokenize; prompts not aligned to its tokenizer",
                      file=sys.stderr)
            return requests
        if len(first) == requests[0].prompt_len:
            return requests
        if not quiet:
            print(f"bench serve: the server's tokenizer counts {len(first)} tokens in the first prompt, the bench's "
                  f"{requests[0].prompt_len}: cutting the prompts to their lengths in the server's tokens",
                  file=sys.stderr)

        async def align(req: SampleRequest) -> SampleRequest:
            try:
                ids = await tokens(req.prompt)
                if len(ids) <= req.prompt_len:
                    return req
                return dataclasses.replace(req, prompt=(await post("/detokenize", {"tokens": ids[:req.prompt_len]}))
                                           ["prompt"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return req
        return list(await asyncio.gather(*(align(r) for r in requests)))


def align_to_server(args: argparse.Namespace, requests: list[SampleRequest], model: str,
                    quiet: bool = False) -> list[SampleRequest]:
    """The random / prefix_repetition set aligned to the server's tokenizer, as vLLM aligns them."""
    if args.dataset_name not in ALIGNED_DATASETS or not requests:
        return requests
    root = api_url(base_url_of(args), args.endpoint)[: -len(args.endpoint)]
    return asyncio.run(_align_to_server(root, model, requests, not getattr(args, "insecure", False),
                                        lookup_headers(args), quiet))


# per-request lists, saved only with --save-detailed (as vLLM saves them)
DETAILED_FIELDS = ("input_lens", "output_lens", "ttfts", "itls", "start_times", "generated_texts", "errors")


def run_serve(args: argparse.Namespace, tok: Optional[Tokenizer] = None,
              requests: Optional[list[SampleRequest]] = None, quiet: bool = False) -> dict:
    """One benchmark run; returns the result dict (saved when `args.save_result`)."""
    check_tokenizer_mode(getattr(args, "tokenizer_mode", None))
    check_backend(args)
    append = getattr(args, "append_result", False)
    if args.save_result or append:
        flag = "--result-filename" if args.result_filename else "--result-dir"
        check_result_path(Path(args.result_dir or ".") / (args.result_filename or "result.json"), flag)
    args.model = resolve_model(args)
    tok = tok or resolve_tokenizer(args.tokenizer, args.model)
    sampled = requests is None
    requests = sample_requests(args, tok) if sampled else requests
    url = api_url(base_url_of(args), args.endpoint)
    goodput = parse_goodput(args.goodput)
    percentiles, metrics = parse_percentiles(args.metric_percentiles, args.percentile_metrics)
    metadata = key_values(getattr(args, "metadata", None), "--metadata")
    headers = key_values(getattr(args, "header", None), "--header")
    extras = request_body_extras(args)
    chat = "chat" in args.endpoint
    name = request_model_name(args, quiet)
    if sampled:   # sweep aligns its set once, before its runs
        requests = align_to_server(args, requests, name, quiet)
    # vLLM asks for the random set's lengths exactly: EOS is ignored there.
    ignore_eos = args.ignore_eos or args.dataset_name == "random"
    id_prefix = getattr(args, "request_id_prefix", None) or f"bench-{os.urandom(4).hex()}-"
    models = request_models(args, name, len(requests))
    inputs = [RequestInput(prompt=r.prompt, prompt_len=r.prompt_len, output_len=r.expected_output_len,
                           model=models[i], api_url=url, chat=chat, ignore_eos=ignore_eos,
                           temperature=args.temperature, extra_body=extras,
                           headers={**headers, "x-request-id": f"{id_prefix}{i}"})
              for i, r in enumerate(requests)]
    ramp = ramp_up_rates(args, len(inputs))
    verify = not getattr(args, "insecure", False)
    if inputs and getattr(args, "ready_check_timeout_sec", 0) > 0:
        wait_until_ready(inputs[0], args.ready_check_timeout_sec, verify)
    if not quiet:
        if getattr(args, "use_beam_search", False):
            print("bench serve: --use-beam-search has no effect (vLLM's bench serve does not use it either)",
                  file=sys.stderr)
        if args.temperature is None:
            print("bench serve: no --temperature: the server's default applies (as in vLLM 0.26; "
                  "--temperature 0 for greedy)", file=sys.stderr)
        rate = "inf" if math.isinf(args.request_rate) else args.request_rate
        if ramp:
            rate = f"{args.ramp_up_strategy} ramp-up {args.ramp_up_start_rps} -> {args.ramp_up_end_rps}"
        print(f"bench serve: {len(inputs)} {args.dataset_name} requests to {url}, request rate {rate}, "
              f"burstiness {args.burstiness}, max concurrency {args.max_concurrency}", file=sys.stderr)
    root = url[: -len(args.endpoint)]
    counters = {}

    def count_before() -> None:
        counters["before"] = spec_decode_counters(root, verify)

    outputs, duration = asyncio.run(run_requests(
        inputs, ramp or args.request_rate, args.burstiness, args.max_concurrency, args.seed,
        args.request_timeout, progress=not args.disable_tqdm, num_warmups=args.num_warmups,
        profile_root=root if getattr(args, "profile", False) else None, verify=verify, on_start=count_before))
    result = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": backend_name(args),
        "backend": backend_name(args),
        "label": args.label,
        "model_id": args.model,
        "tokenizer_id": tok.name,
        "num_prompts": len(inputs),
        **metadata,
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
    }
    if ramp:
        result.update(ramp_up_strategy=args.ramp_up_strategy, ramp_up_start_rps=args.ramp_up_start_rps,
                      ramp_up_end_rps=args.ramp_up_end_rps, rps_change_events=rps_change_events(ramp, outputs))
    result.update(compute_metrics(outputs, duration, tok.count, percentiles, goodput, metrics))
    # vLLM's: the acceptance of a speculating server over the run, from its /metrics counters
    result.update(spec_decode_fields(counters.get("before"), spec_decode_counters(root, verify)))
    if not args.save_detailed:
        result.pop("generated_texts")
    if not quiet:
        print(format_summary(result, percentiles, metrics))
    if result["failed"]:
        first = next(e for e in result["errors"] if e)
        print(f"bench serve: {result['failed']} of {len(inputs)} requests failed; first error: {first}",
              file=sys.stderr)
    if args.save_result or append:
        path = Path(args.result_dir or ".") / (args.result_filename or result_filename(args, result["date"]))
        saved = result if args.save_detailed else {k: v for k, v in result.items() if k not in DETAILED_FIELDS}
        write_result(path, json.dumps(saved) if append else json.dumps(saved, indent=2), append)
        result["result_path"] = str(path)
        if not quiet:
            print(f"bench serve: result written to {path}", file=sys.stderr)
    return result
