"""Results shaped like vLLM's: a RequestOutput holds one CompletionOutput per sample."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)
    # with SamplingParams.prompt_logprobs: None for the first prompt token, then one entry each
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    lora_request: None = None   # vLLM's; no LoRA adapters are served
    # vLLM's, None for decoder-only models and without a KV / encoder-cache connector, as here
    encoder_prompt: None = None
    encoder_prompt_token_ids: None = None
    kv_transfer_params: None = None
    ec_transfer_params: None = None
