"""CPU per streamed token of the bench client's HTTP stacks: the bench's HTTP/1.1 client
(deepserve/bench/http1.py), httpx (what `bench serve` used before, still its https path) and
aiohttp (vLLM's bench client; measured when installed), on the same requests and the same
SSE parsing (deepserve.bench.client.send_request).

Each run sends `--num-prompts` streaming completions at `--max-concurrency` to `--base-url`
and reads this process's CPU time (time.process_time) around them; kinds alternate, `--repeat`
rounds. With `--fake` it starts tests/bench/fake_openai.py (one " hello" frame every `--itl`
seconds per request) instead of using a server, which measures the client alone:

    python benchmarks/bench_client_cpu.py --fake --num-prompts 256 --max-concurrency 256 --output-len 64
    python benchmarks/bench_client_cpu.py --base-url http://127.0.0.1:8000 --model MODEL --ignore-eos

Prints one row per run: kind, output tokens, wall seconds, client CPU ms per output token, and
TTFT p50 / max (against --fake, what the client adds to the fake's known --ttft).
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deepserve.bench.client import RequestInput, api_url, send_request
from deepserve.bench.http1 import Http1Client

FAKE = Path(__file__).resolve().parents[1] / "tests" / "bench" / "fake_openai.py"


class _AiohttpResponse:
    def __init__(self, resp):
        self._resp, self.status_code = resp, resp.status

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self._resp.release()

    async def read(self) -> bytes:
        return await self._resp.read()

    async def chunks(self):
        async for chunk in self._resp.content.iter_any():
            yield time.perf_counter(), chunk


class AiohttpClient:
    """aiohttp as send_request's client: `request()` as Http1Client has it."""

    def __init__(self, timeout_s: float):
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_s))

    async def request(self, method: str, url: str, body: bytes, headers: dict) -> _AiohttpResponse:
        return _AiohttpResponse(await self._session.request(method, url, data=body, headers=headers))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self._session.close()


def make_client(kind: str, timeout_s: float):
    if kind == "http1":
        return Http1Client(timeout_s)
    if kind == "httpx":
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, trust_env=False)
    return AiohttpClient(timeout_s)


async def one_run(kind: str, inputs: list[RequestInput], concurrency: int) -> dict:
    async with make_client(kind, 600.0) as client:
        slots = asyncio.Semaphore(concurrency)

        async def limited(req):
            async with slots:
                return await send_request(client, req)
        await limited(inputs[0])   # connect and import lazily loaded modules before timing
        cpu, wall = time.process_time(), time.perf_counter()
        outs = await asyncio.gather(*(limited(r) for r in inputs))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    failed = [o.error for o in outs if not o.success]
    if failed:
        raise RuntimeError(f"{kind}: {len(failed)} requests failed, first: {failed[0]}")
    tokens = sum(o.output_tokens or 0 for o in outs)
    ttfts = sorted(1000 * o.ttft for o in outs)
    return {"kind": kind, "tokens": tokens, "wall_s": wall, "cpu_ms_per_token": 1000 * cpu / tokens,
            "ttft_p50_ms": ttfts[len(ttfts) // 2], "ttft_max_ms": ttfts[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default=None)
    p.add_argument("--fake", action="store_true", help="serve with tests/bench/fake_openai.py")
    p.add_argument("--ttft", type=float, default=0.05, help="--fake: seconds to the first frame")
    p.add_argument("--itl", type=float, default=0.05, help="--fake: seconds between frames")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kinds", default="httpx,http1,aiohttp")
    args = p.parse_args()
    if args.fake == bool(args.base_url):
        p.error("give one of --base-url and --fake")
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in ("httpx", "http1", "aiohttp"):
            p.error(f"--kinds takes httpx,http1,aiohttp, got {kind!r}")
    if "aiohttp" in kinds:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            print("aiohttp is not installed: left out", file=sys.stderr)
            kinds.remove("aiohttp")
    fake = None
    if args.fake:
        fake = subprocess.Popen([sys.executable, str(FAKE), "--ttft", str(args.ttft), "--itl", str(args.itl)],
                                stdout=subprocess.PIPE, text=True)
        args.base_url = f"http://127.0.0.1:{fake.stdout.readline().strip()}"
    try:
        url = api_url(args.base_url, "/v1/completions")
        inputs = [RequestInput(prompt=f"Once upon a time {i}", prompt_len=0, output_len=args.output_len,
                               model=args.model, api_url=url, chat=False, ignore_eos=args.ignore_eos)
                  for i in range(args.num_prompts)]
        print("| kind | output tokens | wall s | client CPU ms / token | TTFT p50 ms | TTFT max ms |\n"
              "|---|---:|---:|---:|---:|---:|")
        for _ in range(args.repeat):
            for kind in kinds:
                r = asyncio.run(one_run(kind, inputs, args.max_concurrency))
                print(f"| {r['kind']} | {r['tokens']} | {r['wall_s']:.1f} | {r['cpu_ms_per_token']:.3f} | "
                      f"{r['ttft_p50_ms']:.1f} | {r['ttft_max_ms']:.1f} |", flush=True)
    finally:
        if fake is not None:
            fake.kill()
            fake.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
