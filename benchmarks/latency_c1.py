"""One request at a time against a running server: p50 / mean latency of 1-token completions
(httpx, one keep-alive connection), after 10 unmeasured ones.

    python benchmarks/latency_c1.py http://localhost:8000 [REPEAT]     # prompt: a 33-character sentence x REPEAT
"""
from __future__ import annotations

import statistics
import sys
import time

import httpx


def main() -> int:
    url, repeat = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4
    prompt = "Once upon a time there was a dog " * repeat
    with httpx.Client(timeout=30) as c:
        for _ in range(10):
            c.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}).raise_for_status()
        lat = []
        for _ in range(150):
            t = time.perf_counter()
            c.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}).raise_for_status()
            lat.append((time.perf_counter() - t) * 1000)
    print(f"{len(prompt)}-character prompt: p50 {statistics.median(lat):.2f} ms, mean {statistics.mean(lat):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
