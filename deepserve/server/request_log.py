"""The server's log lines about its work, as vLLM writes them: each request as it arrives (and
its output as it ends) with --enable-log-requests / --enable-log-outputs, and every
VLLM_LOG_STATS_INTERVAL seconds a stats line (vLLM's LoggingStatLogger, vllm/v1/metrics/loggers.py)
unless --disable-log-stats:

    Engine 000: Avg prompt throughput: 812.4 tokens/s, Avg generation throughput: 95.1 tokens/s,
    Running: 12 reqs, Waiting: 0 reqs, GPU KV cache usage: 3.1%, Prefix cache hit rate: 41.0%

With data parallel the line covers every DP rank ("2 Engines Aggregated: ..."). An idle
server logs it at DEBUG only, so a quiet server's log stays quiet.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import AsyncIterator, Callable, Optional

logger = logging.getLogger("deepserve")

INTERVAL_ENV = "VLLM_LOG_STATS_INTERVAL"


def stats_interval() -> float:
    """Seconds between stats lines: VLLM_LOG_STATS_INTERVAL (vLLM's variable; 10 when unset or
    not above 0, as vLLM reads it)."""
    text = os.environ.get(INTERVAL_ENV, "").strip() or "10"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {text!r}") from None
    return value if value > 0 else 10.0


class RequestLogger:
    """--enable-log-requests: a line per generation request as it arrives; with
    --enable-log-outputs a line per sample as the request ends. `max_log_len` cuts prompts,
    outputs and their token ids."""

    def __init__(self, max_log_len: Optional[int], log_outputs: bool):
        self.max_log_len, self.log_outputs = max_log_len, log_outputs

    def _cut(self, value):
        return value if value is None or self.max_log_len is None else value[:self.max_log_len]

    def log_inputs(self, request_id: str, prompt, params) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
            ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
            logger.debug("Request %s details: prompt: %r, prompt_token_ids: %s.", request_id,
                         self._cut(text), self._cut(ids))
        logger.info("Received request %s: params: %s.", request_id, params)

    async def logged(self, outputs: AsyncIterator, request_id: str, prompt, params) -> AsyncIterator:
        """`outputs` (AsyncLLM.generate's), logged as they start and end."""
        self.log_inputs(request_id, prompt, params)
        last = None
        try:
            async for out in outputs:
                last = out
                yield out
        finally:   # a client gone: the request's abort is AsyncLLM.generate's own close
            await outputs.aclose()
        if self.log_outputs and last is not None:
            for sample in last.outputs:
                logger.info("Generated response %s: output: %r, output_token_ids: %s, finish_reason: %s",
                            request_id if len(last.outputs) == 1 else f"{request_id} (sample {sample.index})",
                            self._cut(sample.text), self._cut(list(sample.token_ids)), sample.finish_reason)


class StatsLogger:
    """vLLM's periodic stats line from the engine's gauges (`snapshot`): throughput since
    the last line, requests running and waiting, KV cache usage, prefix-cache hit rate."""

    def __init__(self, snapshot: Callable[[], dict], num_engines: int = 1):
        self.snapshot = snapshot
        self.prefix = "Engine 000: " if num_engines == 1 else f"{num_engines} Engines Aggregated: "
        snap = snapshot()
        self.last_time = time.monotonic()
        self.last = {k: snap.get(k, 0) for k in self._COUNTED}
        self.was_idle = True

    _COUNTED = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits",
                "num_preemptions", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                "spec_decode_num_accepted_tokens")

    def log(self, now: Optional[float] = None) -> str:
        """Write the line (INFO, DEBUG while idle now and at the last line); returns it."""
        now = time.monotonic() if now is None else now
        snap = self.snapshot()
        new = {k: snap.get(k, 0) - self.last[k] for k in self._COUNTED}
        self.last = {k: snap.get(k, 0) for k in self._COUNTED}
        elapsed, self.last_time = max(now - self.last_time, 1e-9), now
        prompt_tps, gen_tps = new["prompt_tokens"] / elapsed, new["generation_tokens"] / elapsed
        queries, hits = snap.get("prefix_cache_queries", 0), snap.get("prefix_cache_hits", 0)
        parts = [f"Avg prompt throughput: {prompt_tps:.1f} tokens/s",
                 f"Avg generation throughput: {gen_tps:.1f} tokens/s",
                 f"Running: {int(snap.get('num_requests_running', 0))} reqs",
                 f"Waiting: {int(snap.get('num_requests_waiting', 0))} reqs"]
        if new["num_preemptions"]:
            parts.append(f"Preemptions: {new['num_preemptions']}")
        parts += [f"GPU KV cache usage: {100 * snap.get('kv_cache_usage', 0.0):.1f}%",
                  f"Prefix cache hit rate: {100 * hits / queries if queries else 0.0:.1f}%"]
        line = self.prefix + ", ".join(parts)
        idle = not (new["prompt_tokens"] or new["generation_tokens"])
        level = logging.DEBUG if idle and self.was_idle else logging.INFO
        self.was_idle = idle
        logger.log(level, "%s", line)
        drafts, drafted, accepted = (new["spec_decode_num_drafts"], new["spec_decode_num_draft_tokens"],
                                     new["spec_decode_num_accepted_tokens"])
        if drafts:
            logger.log(level, "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f "
                       "tokens/s, Drafted throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d tokens, "
                       "Avg Draft acceptance rate: %.1f%%", 1 + accepted / drafts, accepted / elapsed,
                       drafted / elapsed, accepted, drafted, 100 * accepted / drafted if drafted else 0.0)
        return line

    async def run(self, interval: float, running: Callable[[], bool]) -> None:
        """A line every `interval` seconds while `running()`."""
        while running():
            await asyncio.sleep(interval)
            if running():
                self.log()
