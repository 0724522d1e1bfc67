"""What the front end and the engine cores send each other over ZeroMQ (engine/dp_engine.py,
engine/engine_core.py): requests in, per-step output deltas and gauges out.

Messages are dataclasses, pickled (they carry SamplingParams and, for scoring, a logits
tensor; msgspec would need a schema for both). A step's outputs are one message per front end
whose fields are columns of plain values (`CoreOutputs`): a core sends each request only what
it gained since the last message (`DeltaWriter`); the front end rebuilds the cumulative
RequestOutput (`read_outputs`), so the bytes per step grow with the tokens generated, not with
the text so far.
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
    cache_salt: Optional[str] = None   # the request's prefix-cache salt (vLLM's cache_salt)


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class ScorePrompt:
    prompt: object
    client: int = 0


@dataclass
class ProfileRequest:
    """start_profile (`start`) or stop_profile (engine/profiler.py); the core answers with a
    CoreOutputs whose `profiled` is set once it is done."""
    start: bool
    prefix: Optional[str] = None
    client: int = 0


@dataclass
class ResetPrefixCache:
    """reset_prefix_cache: the core answers with a CoreOutputs whose `prefix_cache_reset` says
    whether it forgot its cached blocks (False: its requests hold blocks); `preempt_running`:
    it preempts its running requests first."""
    client: int = 0
    preempt_running: bool = False


@dataclass
class Work:
    """Something a core runs in a sync round instead of a scheduled batch (it runs a forward,
    so with expert parallel the other cores must step with it)."""
    num_tokens: int
    run: object                 # () -> bool: whether a forward ran (False: refused before it)


@dataclass
class CoreOutputs:
    """A core's outputs of one step for one front end, with the core's gauges after it.

    The outputs are columns with one row per sample of each request the step touched: what
    the sample gained since the core's last message (`DeltaWriter`), and the request's
    bookkeeping. Lists of strings, ints and token-id lists pickle and unpickle in C: 256 rows
    take about 0.3 ms both ways where a dataclass per row took 2.6 ms, on the engine core's
    step loop and in the API server. The front end rebuilds cumulative RequestOutputs
    (`OutputReader`), so the bytes per step grow with the tokens generated, not the text so far."""
    dp_rank: int
    gauges: Optional[dict] = None
    request_ids: list[str] = field(default_factory=list)
    indexes: list[int] = field(default_factory=list)            # the sample's index in its request
    texts: list[str] = field(default_factory=list)              # text gained
    token_ids: list[list[int]] = field(default_factory=list)    # token ids gained
    finish_reasons: list[Optional[str]] = field(default_factory=list)
    stop_reasons: list[object] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)          # the request (all its samples)
    num_cached_tokens: list[int] = field(default_factory=list)  # the request's prefix-cache hits
    arrival_times: list[float] = field(default_factory=list)    # the request's, on the core's clock
    first_token_times: list[Optional[float]] = field(default_factory=list)
    first_scheduled_times: list[Optional[float]] = field(default_factory=list)   # first admitted to run
    last_token_times: list[Optional[float]] = field(default_factory=list)
    # rows of requests that asked for logprobs: row -> (new Logprob entries, cumulative logprob)
    logprobs: dict[int, tuple[list, float]] = field(default_factory=dict)
    # request id -> its prompt logprobs, in the request's first message
    prompt_logprobs: dict[str, list] = field(default_factory=dict)
    step_bytes: int = 0          # bytes this rank sent for the step (its peers' inputs + this message)
    error: Optional[str] = None  # a request the core refused, or a failed step
    failed_requests: list[str] = field(default_factory=list)
    refused: bool = False        # the core refused `failed_requests` before any forward (bad input)
    logits: Optional[torch.Tensor] = None
    profiled: bool = False       # a ProfileRequest is done (`error`: why it failed)
    prefix_cache_reset: Optional[bool] = None   # the answer to a ResetPrefixCache


class DeltaWriter:
    """Core side: each touched request's RequestState -> rows of a CoreOutputs holding what its
    samples gained since the last message (remembered per request until it finishes)."""

    def __init__(self):
        self.sent: dict[str, list[list[int]]] = {}   # request id -> per sample [chars, tokens, logprobs]

    def write(self, msg: CoreOutputs, states) -> None:
        """Append the rows of `states` (RequestStates: engine/llm_engine.py) to `msg`."""
        ids, indexes, texts, tokens = msg.request_ids, msg.indexes, msg.texts, msg.token_ids
        finish, stops, done, cached = msg.finish_reasons, msg.stop_reasons, msg.finished, msg.num_cached_tokens
        arrivals, firsts = msg.arrival_times, msg.first_token_times
        scheduled, lasts = msg.first_scheduled_times, msg.last_token_times
        for state in states:
            rid, seqs = state.request_id, state.seqs
            marks = self.sent.get(rid)
            if marks is None:
                marks = self.sent[rid] = [[0, 0, 0] for _ in seqs]
                if state.prompt_logprobs is not None:
                    msg.prompt_logprobs[rid] = state.prompt_logprobs
            finished = state.finished
            num_cached = max(s.num_cached_tokens for s in seqs) if len(seqs) > 1 else seqs[0].num_cached_tokens
            timings = state.timings()
            wants_logprobs = state.params.logprobs is not None
            for i, seq in enumerate(seqs):
                mark = marks[i]
                text = state.visible_text(i)
                n_prompt = seq.num_prompt_tokens
                if wants_logprobs:
                    msg.logprobs[len(ids)] = (seq.logprobs[mark[2]:], seq.cumulative_logprob)
                    mark[2] = len(seq.logprobs)
                ids.append(rid)
                indexes.append(seq.index)
                texts.append(text[mark[0]:])
                tokens.append(seq.token_ids[n_prompt + mark[1]:])
                finish.append(seq.finish_reason)
                stops.append(seq.stop_reason)
                done.append(finished)
                cached.append(num_cached)
                arrivals.append(state.arrival)
                firsts.append(state.first_token_time)
                scheduled.append(timings["first_scheduled_time"])
                lasts.append(state.last_token_time)
                mark[0], mark[1] = len(text), len(seq.token_ids) - n_prompt
            if finished:
                del self.sent[rid]

    def forget(self, request_id: str) -> None:
        self.sent.pop(request_id, None)


def read_outputs(msg: CoreOutputs, latest: dict[str, RequestOutput], start) -> list[RequestOutput]:
    """Front end side: the cumulative RequestOutput of every request in `msg`, in order.
    `latest` maps request ids to their last RequestOutput and gets the new ones; `start(rid)`
    gives a request's empty output the first time (None: a request the front end no longer
    tracks, skipped). New objects each time: a reader in another thread may hold the old ones."""
    outs: dict[str, RequestOutput] = {}
    for row, rid in enumerate(msg.request_ids):
        out = outs.get(rid)
        if out is None:
            prev = latest.get(rid) or start(rid)
            if prev is None:
                continue
            timings = {"arrival_time": msg.arrival_times[row], "first_scheduled_time": msg.first_scheduled_times[row],
                       "first_token_time": msg.first_token_times[row], "last_token_time": msg.last_token_times[row]}
            out = outs[rid] = RequestOutput(
                rid, prev.prompt, prev.prompt_token_ids, list(prev.outputs), msg.finished[row],
                msg.num_cached_tokens[row], timings,
                msg.prompt_logprobs.get(rid, prev.prompt_logprobs))
        i = msg.indexes[row]
        c = out.outputs[i]
        lp = msg.logprobs.get(row)
        out.outputs[i] = CompletionOutput(i, c.text + msg.texts[row], c.token_ids + msg.token_ids[row],
                                          None if lp is None else lp[1],
                                          None if lp is None else (c.logprobs or []) + lp[0],
                                          msg.finish_reasons[row], msg.stop_reasons[row])
    latest.update(outs)
    return list(outs.values())


def connect(ctx, kind, address: str, bind: bool):
    import zmq
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(address)
    return sock

