"""Results shaped like vLLM's: a RequestOutput holds one CompletionOutput per sample."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass
class Logprob:
    """vLLM's: a token's log-probability, its rank in the vocabulary (1 = most likely) and its
    text (None with detokenize=False)."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[dict[int, Logprob]]] = None
    finish_reason: Optional[str] = None   # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[object] = None  # the stop string or token id that ended it
    lora_request: None = None             # vLLM's; no LoRA adapters are served
    routed_experts: None = None           # vLLM's (enable_return_routed_experts); not served

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestStateStats:
    """vLLM's per-request timings, the offline LLM's RequestOutput.metrics when stats are logged
    (LLM(disable_log_stats=False)): arrival_time is wall-clock, the *_ts are time.monotonic()."""

    num_generation_tokens: int = 0
    arrival_time: float = 0.0
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0
    first_token_latency: float = 0.0
    is_corrupted: bool = False

    @classmethod
    def from_timings(cls, timings: dict, num_generation_tokens: int) -> "RequestStateStats":
        """From the engine's timings (time.monotonic() of arrival, first scheduling, first and
        last token; None for a phase not reached, 0.0 here as in vLLM). A request is queued
        as it arrives."""
        arrival = timings.get("arrival_time") or 0.0
        first = timings.get("first_token_time")
        return cls(num_generation_tokens=num_generation_tokens,
                   arrival_time=arrival + time.time() - time.monotonic(), queued_ts=arrival,
                   scheduled_ts=timings.get("first_scheduled_time") or 0.0, first_token_ts=first or 0.0,
                   last_token_ts=timings.get("last_token_time") or 0.0,
                   first_token_latency=first - arrival if first is not None else 0.0)


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # the engine's timings (LLMEngine.timings); the offline LLM gives vLLM's: None, or
    # RequestStateStats with disable_log_stats=False
    metrics: Union[dict, RequestStateStats, None] = field(default_factory=dict)
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then one entry each
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    lora_request: None = None   # vLLM's; no LoRA adapters are served
    # vLLM's, None for decoder-only models and without a KV / encoder-cache connector, as here
    encoder_prompt: None = None
    encoder_prompt_token_ids: None = None
    kv_transfer_params: None = None
    ec_transfer_params: None = None
