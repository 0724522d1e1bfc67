"""What the engine core's own process adds to TTFT (issue 17): two `deepserve serve` of the same
model side by side, the engine core apart (the default) and in the API server's process
(DEEPSERVE_ENGINE_CORE_PROCESS=0), sent the same sequential streamed requests in alternation
(so both see the same machine load); prints each one's time to the first SSE data frame (p50,
p90, mean) and the difference of the medians. With --engine, the two engines run behind
AsyncLLM in this process instead (no HTTP) and each request's way is split at the engine's
own arrival and first-token times: API -> engine, the engine's step, engine -> API.

    python benchmarks/ttft_hop.py --requests 200                       # the demo model on CPU
    python benchmarks/ttft_hop.py --model r1-distill-llama-8b --engine-args "--load-format dummy" \
        --tokenizer ../shared/tokenizers/deepseek-r1-distill-llama-8b --prompt-len 1024 --requests 64
    python benchmarks/ttft_hop.py --engine --requests 200 --max-tokens 1   # the hops alone
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_path import DEMO, free_port  # noqa: E402


def start(args, apart: bool, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    extra = ["--tokenizer", args.tokenizer] if args.tokenizer else []
    env = dict(os.environ, DEEPSERVE_ENGINE_CORE_PROCESS="1" if apart else "0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "deepserve", "serve", args.model, *extra, *args.engine_args.split(),
                             "--port", str(port), "--log-level", "warning"], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}/v1/completions"


def wait_ready(servers, logs, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    for (proc, _), log in zip(servers, logs):
        while "deepserve: serving" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)


def first_frame_s(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                first = time.perf_counter() - start
                break
        for _ in lines:  # the rest of the stream
            pass
    return first


async def _engine_hops(args) -> list[list[tuple[float, float, float]]]:
    """Per request and engine (core apart, in-process): (API -> engine, engine's first token,
    engine -> API) in seconds, from the engine's own arrival and first-token times (one
    monotonic clock for every process of a Linux host)."""
    from deepserve.config import EngineArgs
    from deepserve.engine.async_llm import AsyncLLM
    from deepserve.engine.llm_engine import LLMEngine
    from deepserve.engine.sampling_params import SamplingParams

    engine_args = dict(model=args.model, tokenizer=args.tokenizer, **json.loads(args.engine_kwargs))
    llms = []
    for apart in (True, False):
        os.environ["DEEPSERVE_ENGINE_CORE_PROCESS"] = "1" if apart else "0"
        llms.append(AsyncLLM(LLMEngine(EngineArgs(**engine_args))))
        llms[-1].start()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    hops: list[list[tuple[float, float, float]]] = [[], []]
    try:
        for i in range(args.requests + 4):
            prompt = {"prompt_token_ids": [1 + (i * 7 + j) % 250 for j in range(args.prompt_len)]}
            for k in ((0, 1) if i % 2 else (1, 0)):
                start = time.monotonic()
                async for out in llms[k].generate(prompt, params, f"r{i}"):
                    got = time.monotonic()
                    m = out.metrics
                    if i >= 4:
                        hops[k].append((m["arrival_time"] - start, m["first_token_time"] - m["arrival_time"],
                                        got - m["first_token_time"]))
                    break
    finally:
        for llm in llms:
            llm.shutdown()
    return hops


def engine_level(args) -> None:
    import asyncio

    hops = asyncio.run(_engine_hops(args))
    print(f"{args.requests} sequential requests of {args.prompt_len} prompt tokens through AsyncLLM "
          "(no HTTP); p50 ms of:")
    print("| engine | API -> engine (add) | first token in the engine | engine -> API (output) | hops |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in zip(("core apart", "in-process"), hops):
        cols = [statistics.median(1000 * r[c] for r in rows) for c in range(3)]
        print(f"| {name} | {cols[0]:.3f} | {cols[1]:.3f} | {cols[2]:.3f} | {cols[0] + cols[2]:.3f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEMO))
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--engine-args", default="")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt token ids per request")
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--engine", action="store_true",
                   help="through AsyncLLM in this process (no HTTP): each hop timed on its own")
    p.add_argument("--engine-kwargs", default="{}", help="with --engine: EngineArgs fields, JSON")
    args = p.parse_args()
    if args.engine:
        engine_level(args)
        return 0
    out = Path(tempfile.mkdtemp(prefix="ttft_hop-"))
    logs = [out / "apart.log", out / "inproc.log"]
    servers = [start(args, True, logs[0]), start(args, False, logs[1])]
    try:
        wait_ready(servers, logs)
        times: list[list[float]] = [[], []]
        with httpx.Client(timeout=120) as client:
            for i in range(args.requests + 4):
                prompt = [1 + (i * 7 + j) % 250 for j in range(args.prompt_len)]  # distinct: no prefix-cache hits
                body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                        "ignore_eos": True}
                for k in ((0, 1) if i % 2 else (1, 0)):
                    t = first_frame_s(client, servers[k][1], body)
                    if i >= 4:  # warm-up
                        times[k].append(t)
        print(f"{args.requests} sequential requests of {args.prompt_len} prompt tokens, {args.max_tokens} out; "
              f"time to the first SSE frame, ms (logs in {out}):")
        med = []
        for name, ts in zip(("core apart", "in-process"), times):
            ms = sorted(1000 * t for t in ts)
            med.append(statistics.median(ms))
            print(f"  {name:11s} p50 {med[-1]:.3f}  p90 {ms[int(0.9 * len(ms))]:.3f}  mean {statistics.fmean(ms):.3f}")
        print(f"  apart - in-process (p50): {med[0] - med[1]:+.3f} ms")
        (out / "ttft.json").write_text(json.dumps({"apart": times[0], "inproc": times[1]}))
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
