"""What the front end and the engine cores send each other over ZeroMQ (engine/dp_engine.py,
engine/engine_core.py): requests in, per-step output deltas and gauges out.

Messages are dataclasses, pickled (they carry SamplingParams and, for scoring, a logits
tensor; msgspec would need a schema for both). A core sends each request only what it gained
since the last message (`DeltaWriter`); the front end rebuilds the cumulative RequestOutput
(`apply_delta`), so the bytes per step grow with the tokens generated, not with the text so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from deepserve.engine.outputs import CompletionOutput, RequestOutput


@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    prompt: Optional[str]
    params: object              # SamplingParams
    client: int = 0             # which front end sent it: its outputs go back there


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class ScorePrompt:
    prompt: object
    client: int = 0


@dataclass
class Work:
    """Something a core runs in a sync round instead of a scheduled batch (it runs a forward,
    so with expert parallel the other cores must step with it)."""
    num_tokens: int
    run: object                 # () -> bool: whether a forward ran (False: refused before it)


@dataclass
class CompletionDelta:
    """What one sample gained in a step (its text, tokens and logprobs only grow)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: Optional[list]
    cumulative_logprob: Optional[float]
    finish_reason: Optional[str]
    stop_reason: Optional[object]


@dataclass
class OutputDelta:
    """A request's output since the last one the core sent (the prompt stays at the front end)."""
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int
    metrics: dict
    prompt_logprobs: Optional[list] = None   # in the first delta only


class DeltaWriter:
    """Core side: cumulative RequestOutputs -> deltas, remembering what each request was sent."""

    def __init__(self):
        self.sent: dict[str, list[tuple[int, int, int]]] = {}   # (chars, tokens, logprobs) per sample

    def __call__(self, out: RequestOutput) -> OutputDelta:
        first = out.request_id not in self.sent
        marks = self.sent.setdefault(out.request_id, [(0, 0, 0)] * len(out.outputs))
        completions = []
        for i, c in enumerate(out.outputs):
            chars, toks, lps = marks[i]
            completions.append(CompletionDelta(c.index, c.text[chars:], c.token_ids[toks:],
                                               None if c.logprobs is None else c.logprobs[lps:],
                                               c.cumulative_logprob, c.finish_reason, c.stop_reason))
            marks[i] = (len(c.text), len(c.token_ids), len(c.logprobs or ()))
        if out.finished:
            del self.sent[out.request_id]
        return OutputDelta(out.request_id, completions, out.finished, out.num_cached_tokens, out.metrics,
                           out.prompt_logprobs if first else None)

    def forget(self, request_id: str) -> None:
        self.sent.pop(request_id, None)


def apply_delta(prev: RequestOutput, d: OutputDelta) -> RequestOutput:
    """Front end side: the next cumulative RequestOutput (fresh objects; `prev` is unchanged)."""
    outs = []
    for c, dc in zip(prev.outputs, d.completions):
        outs.append(CompletionOutput(
            index=c.index, text=c.text + dc.text, token_ids=c.token_ids + dc.token_ids,
            cumulative_logprob=dc.cumulative_logprob,
            logprobs=None if dc.logprobs is None else (c.logprobs or []) + dc.logprobs,
            finish_reason=dc.finish_reason, stop_reason=dc.stop_reason))
    return RequestOutput(prev.request_id, prev.prompt, prev.prompt_token_ids, outs, d.finished,
                         num_cached_tokens=d.num_cached_tokens, metrics=d.metrics,
                         prompt_logprobs=d.prompt_logprobs if d.prompt_logprobs is not None else prev.prompt_logprobs)


@dataclass
class CoreOutputs:
    """A core's outputs of one step, with its gauges after it."""
    dp_rank: int
    outputs: list[OutputDelta]
    gauges: dict
    step_bytes: int = 0          # bytes this rank sent for the step (its peers' inputs + this message)
    error: Optional[str] = None  # a request the core refused, or a failed step
    failed_requests: list[str] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None


def connect(ctx, kind, address: str, bind: bool):
    import zmq
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(address)
    return sock

