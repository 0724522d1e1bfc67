"""Data-parallel ranks as engines (DP attention, vLLM v1 / SGLang style).

`DataParallelEngine` is the front end: it keeps no model. It starts every rank as a process;
the first rank of each DP rank (its TP 0 / PP 0 rank) runs an `EngineCore` with its own
scheduler, KV pool, sampler and `LLMEngine` (tokenization checks, detokenization and stop
handling for its requests); the other ranks of the DP rank run the steps their core
publishes to them. The front end places each request on the least-loaded DP rank (fewest
unfinished sequences, then KV use; a rank that recently got the same prompt prefix keeps it
unless much busier: `RankPlacement`) and merges the cores' outputs.

Front end and cores talk over ZeroMQ (PUSH/PULL over ipc:// sockets, pickled messages): a
request goes to one core; each core pushes its outputs and a few gauges after every step.
With expert parallel the cores meet in the MoE collectives, so before every step they agree
(one all-reduce MAX of a fixed 5-int vector, `DPSync`) on whether anyone has work, the
largest batch and the longest sequence; a core with nothing to do runs a one-token dummy
step. What a rank sends per step (its step inputs to its own TP/PP peers, its output deltas
to the front end, the sync vector) does not grow with the number of DP ranks
(DEEPSERVE_COUNT_STEP_BYTES=1 counts it: `DataParallelEngine.step_bytes`). Without expert
parallel the DP ranks are plain replicas and never synchronise.

Idle cores with expert parallel poll their socket between sync rounds, backing off from 1
to 50 ms, so a request arriving at an idle server waits at most that long for its first step.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import tempfile
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch
import torch.distributed as dist

from deepserve.config import EngineArgs
from deepserve.distributed.parallel_state import destroy_distributed, init_distributed, rank_layout
from deepserve.engine.executor import (STOP, Stop, WorkerProcs, check_no_live_group, die_with_parent,
                                       dist_timeout_s, free_port, report_errors, start_timeout_s)
from deepserve.engine.llm_engine import LLMEngine, RequestError, RequestState, load_tokenizer
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.step_inputs import DPSync
from deepserve.platforms import get_platform

logger = logging.getLogger("deepserve")

IDLE_POLL_S = (0.001, 0.05)   # an idle core's wait between sync rounds: first, longest


def _count_bytes() -> bool:
    return os.environ.get("DEEPSERVE_COUNT_STEP_BYTES") == "1"


# ---------------------------------------------------------------- messages
@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    prompt: Optional[str]
    params: object              # SamplingParams


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class ScorePrompt:
    prompt: object


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


def _connect(ctx, kind, address: str, bind: bool):
    import zmq
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    (sock.bind if bind else sock.connect)(address)
    return sock


# ---------------------------------------------------------------- placement
class RankPlacement:
    """Which DP rank a new request goes to: the least loaded (unfinished sequences, then KV
    use, then the lowest rank), unless a rank was recently given a request with the same
    prompt prefix (whole KV blocks) and is at most `slack` sequences busier than the least
    loaded: it likely still holds that prefix in its cache. Prefixes are remembered by a
    chained hash per block (placement only: a collision costs a cache miss, never a wrong
    output), the most recent `remember` blocks."""

    def __init__(self, dp_size: int, block_size: int, slack: int = 4, remember: int = 1 << 16):
        self.load = [0] * dp_size
        self.block_size, self.slack, self.remember = block_size, slack, remember
        self._prefix: OrderedDict[int, int] = OrderedDict()   # chained block hash -> rank

    def _chain(self, prompt_ids: list[int]) -> list[int]:
        keys, key, bs = [], 0, self.block_size
        for start in range(0, len(prompt_ids) - bs + 1, bs):
            key = hash((key, tuple(prompt_ids[start:start + bs])))
            keys.append(key)
        return keys

    def choose(self, prompt_ids: list[int], n: int, kv_usage: list[float]) -> int:
        """Place a request of `n` sequences; returns its rank."""
        least = min(range(len(self.load)), key=lambda r: (self.load[r], kv_usage[r], r))
        keys = self._chain(prompt_ids)
        holder = next((self._prefix[k] for k in reversed(keys) if k in self._prefix), None)
        rank = holder if holder is not None and self.load[holder] <= self.load[least] + self.slack else least
        for k in keys:
            self._prefix[k] = rank
            self._prefix.move_to_end(k)
        while len(self._prefix) > self.remember:
            self._prefix.popitem(last=False)
        self.load[rank] += n
        return rank

    def finished(self, rank: int, n: int) -> None:
        self.load[rank] -= n


# ---------------------------------------------------------------- where ranks run
@dataclass
class DPLayout:
    """Which ranks this node runs, and where cores, front end and process group meet.

    One node: ipc:// sockets in a private folder and a free loopback port. Several nodes
    (vLLM's --data-parallel-address / --data-parallel-rpc-port): the front end's node listens
    on rpc_port (outputs), rpc_port + 1 (the process group) and rpc_port + 2 + r (DP rank r's
    requests); the other nodes (--headless) run their ranks and connect there."""
    inboxes: list[str]
    outbox: str
    init_method: str
    local_ranks: list[int]
    run_dir: Optional[str] = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> "DPLayout":
        dp, span = args.data_parallel_size, args.tensor_parallel_size * args.pipeline_parallel_size
        local = args.data_parallel_size_local or dp
        start = args.data_parallel_start_rank
        ranks = list(range(start * span, (start + local) * span))
        if local == dp and not args.data_parallel_address:
            run_dir = tempfile.mkdtemp(prefix="deepserve-dp-")
            tag = uuid.uuid4().hex[:8]
            return cls([f"ipc://{run_dir}/core{r}-{tag}" for r in range(dp)], f"ipc://{run_dir}/out-{tag}",
                       f"tcp://127.0.0.1:{free_port()}", ranks, run_dir)
        host, port = args.data_parallel_address or "127.0.0.1", args.data_parallel_rpc_port
        return cls([f"tcp://{host}:{port + 2 + r}" for r in range(dp)], f"tcp://{host}:{port}",
                   f"tcp://{host}:{port + 1}", ranks)

    def cleanup(self) -> None:
        if self.run_dir and os.path.isdir(self.run_dir):
            for name in os.listdir(self.run_dir):
                os.unlink(os.path.join(self.run_dir, name))
            os.rmdir(self.run_dir)


def start_ranks(args: EngineArgs, layout: DPLayout) -> WorkerProcs:
    timeout = dist_timeout_s()
    first = layout.local_ranks[0]
    return WorkerProcs(_rank_main, lambda r: (r, r - first, args, layout.init_method, timeout,
                                              (layout.inboxes, layout.outbox)),
                       layout.local_ranks, label="rank")


def run_headless(args: EngineArgs) -> int:
    """A node that only runs engine cores (and their TP/PP peers) for the DP ranks from
    --data-parallel-start-rank; returns when the front end stops them."""
    layout = DPLayout.from_args(args)
    procs = start_ranks(args, layout)
    logger.info("headless: ranks %s for DP ranks %d..%d, front end at %s", layout.local_ranks,
                args.data_parallel_start_rank, args.data_parallel_start_rank + len(layout.local_ranks) // (
                    args.tensor_parallel_size * args.pipeline_parallel_size) - 1, layout.outbox)
    try:
        while any(p.is_alive() for p in procs.procs):
            if procs.failure:
                raise RuntimeError(procs.failure)
            time.sleep(0.2)
    finally:
        procs.stop(graceful_s=5.0)
    return 0


# ---------------------------------------------------------------- rank processes
class DPRankExecutor:
    """The executor inside a core: this DP rank's driver runner, publishing to its peers."""

    scheduled_dp_ranks = 1
    failure: Optional[str] = None

    def __init__(self, runner_factory, group, src: int, peers: bool):
        self.group, self.src, self.peers = group, src, peers
        self.sent_bytes, self.count = 0, _count_bytes()
        self.runner = runner_factory(self._publish)

    def _publish(self, msg) -> None:
        if self.peers:
            if self.count:
                self.sent_bytes += len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
            dist.broadcast_object_list([msg], src=self.src, group=self.group)

    def explain(self, exc: BaseException) -> str:
        return str(exc)

    def shutdown(self) -> None:
        pass


def _groups(dp_size: int, span: int, dp_rank: int):
    """Per-DP-rank gloo groups (a core publishes steps to its peers) and the cores' group
    (the per-step sync); created in the same order on every rank."""
    local = None
    for d in range(dp_size):
        g = dist.new_group(list(range(d * span, (d + 1) * span)), backend="gloo")
        if d == dp_rank:
            local = g
    cores = dist.new_group([d * span for d in range(dp_size)], backend="gloo")
    return local, cores


def _rank_main(rank: int, local_rank: int, args: EngineArgs, init_method: str, timeout_s: float,
               addresses: tuple[list[str], str], status=None) -> None:
    die_with_parent()

    def body():
        from deepserve.engine.driver_runner import DriverRunner
        from deepserve.engine.model_runner import WorkerRunner
        config = args.create_engine_config()
        platform = get_platform(args.device)
        par = config.parallel
        status.send(("joining",))
        pctx = init_distributed(rank, par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
                                platform.dist_backend, init_method, timeout_s, par.enable_expert_parallel,
                                local_rank, par.data_parallel_size, par.all2all_backend)
        span = par.tensor_parallel_size * par.pipeline_parallel_size
        dp_rank, pp_rank, tp_rank = rank_layout(rank, par.tensor_parallel_size, par.pipeline_parallel_size)
        local, cores = _groups(par.data_parallel_size, span, dp_rank)
        leader = dp_rank * span
        if rank != leader:
            runner = WorkerRunner(config, platform, pctx, local_rank=local_rank)
            while True:
                box = [None]
                dist.broadcast_object_list(box, src=leader, group=local)
                if isinstance(box[0], Stop):
                    break
                runner.run_published(box[0])
        else:
            _, eos = load_tokenizer(config)
            executor = DPRankExecutor(
                lambda publish: DriverRunner(config, platform, pctx, local_rank=local_rank, eos_token_ids=eos,
                                             publish=publish, own_dp_rank_only=True),
                local, leader, span > 1)
            engine = LLMEngine(args, executor=executor)
            EngineCore(engine, executor, dp_rank, cores if pctx.moe_dp_exchange else None, addresses).run()
        destroy_distributed()

    report_errors(status, rank, body)


class EngineCore:
    """One DP rank's engine loop: take requests from the front end, step, push outputs."""

    def __init__(self, engine: LLMEngine, executor: DPRankExecutor, dp_rank: int, sync_group, addresses):
        import zmq
        self.engine, self.executor, self.runner = engine, executor, engine.runner
        self.dp_rank, self.sync_group = dp_rank, sync_group
        self.ctx = zmq.Context()
        self.inbox = _connect(self.ctx, zmq.PULL, addresses[0][dp_rank], bind=False)
        self.outbox = _connect(self.ctx, zmq.PUSH, addresses[1], bind=False)
        self.work: list[Work] = []
        self.deltas = DeltaWriter()
        self.stopping = False
        self._send(CoreOutputs(dp_rank, [], self.gauges()))  # ready: the front end learns the pool size

    def gauges(self) -> dict:
        g = self.engine.gauges()
        g["load"] = len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)
        return g

    def _send(self, msg: CoreOutputs) -> None:
        if self.executor.count:  # the count travels with the message it counts (give or take its own size)
            msg.step_bytes += len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        self.outbox.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), copy=False)

    def _receive(self, timeout_s: Optional[float]) -> None:
        import zmq
        wait_ms = None if timeout_s is None else int(timeout_s * 1000)
        while self.inbox.poll(wait_ms, zmq.POLLIN):
            self._apply(pickle.loads(self.inbox.recv()))
            wait_ms = 0

    def _apply(self, msg) -> None:
        if isinstance(msg, Stop):
            self.stopping = True
        elif isinstance(msg, AddRequest):
            if msg.params.prompt_logprobs is not None and self.sync_group is not None:
                # scoring the prompt runs a forward: in a sync round, as other work
                self.work.append(Work(len(msg.prompt_ids), lambda: self._add(msg)))
            else:
                self._add(msg)
        elif isinstance(msg, AbortRequest):
            self.engine.abort_request(msg.request_id)
            self.deltas.forget(msg.request_id)
        elif isinstance(msg, ScorePrompt):
            _, ids = self.engine.tokenize_prompt(msg.prompt)
            self.work.append(Work(len(ids), lambda: self._score(msg)))

    def _add(self, msg: AddRequest) -> bool:
        try:
            self.engine.add_request(msg.request_id, {"prompt_token_ids": msg.prompt_ids, "prompt": msg.prompt},
                                    msg.params)
            return True
        except ValueError as exc:  # refused by its checks, before any forward
            self._send(CoreOutputs(self.dp_rank, [], self.gauges(), error=str(exc),
                                   failed_requests=[msg.request_id]))
            return False

    def _has_work(self) -> bool:
        return bool(self.work) or self.engine.has_unfinished_requests()

    def run(self) -> None:
        if self.sync_group is None:
            self._run_alone()
        else:
            self._run_in_sync()
        self.executor.runner.publish(STOP)
        self.ctx.destroy(linger=0)

    def _run_alone(self) -> None:
        """Without expert parallel: a replica that steps whenever it has work."""
        while not self.stopping:
            self._receive(None if not self._has_work() else 0)
            while self.work and not self.stopping:
                self.work.pop(0).run()
            if self.engine.has_unfinished_requests() and not self.stopping:
                self._step(None)

    def _run_in_sync(self) -> None:
        """With expert parallel: every round, the cores agree whether anyone has work (and
        the batch shape); a core without a batch then runs a dummy step."""
        idle = IDLE_POLL_S[0]
        while True:
            self._receive(0 if self._has_work() else idle)
            work = self.work.pop(0) if self.work else None
            batch = None if work or self.stopping or not self._has_work() else self.engine.scheduler.schedule()
            if work:
                mine = DPSync(True, work.num_tokens, True, work.num_tokens, self.stopping)
            elif batch:
                inputs = self.runner.host_inputs(batch)
                # (verify steps of speculative decoding run eagerly)
                mixed = not inputs.decode_only or self.engine.spec is not None
                mine = DPSync(True, inputs.num_tokens, mixed, max(inputs.seq_lens), self.stopping)
            else:
                mine = DPSync(False, 1, False, 1, self.stopping)
            v = torch.tensor(mine.to_list(), dtype=torch.int64)
            dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.sync_group)
            agreed = DPSync.from_list(v.tolist())
            if agreed.stop:
                return
            if not agreed.has_work:
                idle = min(IDLE_POLL_S[1], idle * 2)
                continue
            idle = IDLE_POLL_S[0]
            self.runner.graph_size = self.runner.dp_graph_size(agreed.num_tokens, not agreed.mixed, agreed.longest)
            ran = work.run() if work else bool(batch) and self._step(batch)
            if not ran:  # the other cores' MoE layers wait for this one
                self.runner.run_dummy()
            self.runner.finish_mtp_round()

    def _score(self, score: ScorePrompt) -> bool:
        try:
            logits = self.engine.prompt_logits(score.prompt)
        except ValueError as exc:  # refused before the forward (too long, no free blocks)
            self._send(CoreOutputs(self.dp_rank, [], self.gauges(), error=str(exc)))
            return False
        self._send(CoreOutputs(self.dp_rank, [], self.gauges(), logits=logits))
        return True

    def _step(self, batch) -> bool:
        """Run one step (`batch`, or the engine's own schedule when None) and push its outputs;
        False when no forward ran (under async scheduling, what the previous step's tokens
        finished may leave nothing of `batch`)."""
        self.executor.sent_bytes = 0
        steps = self.engine.stats["steps"]
        try:
            if batch is None:
                outputs = self.engine.step()
            elif self.engine.async_scheduling:
                outputs = self.engine._step_async(batch)
            else:
                outputs = self.engine._run_sync(batch)
        except Exception as exc:  # a failing step fails its requests, not the core
            logger.exception("DP rank %d: step failed", self.dp_rank)
            failed = list(self.engine.requests)
            for rid in failed:
                self.engine.abort_request(rid)
            self._send(CoreOutputs(self.dp_rank, [], self.gauges(), error=f"{type(exc).__name__}: {exc}",
                                   failed_requests=failed))
            return True
        if outputs:
            self._send(CoreOutputs(self.dp_rank, [self.deltas(o) for o in outputs], self.gauges(),
                                   step_bytes=self.executor.sent_bytes))
        return self.engine.stats["steps"] > steps


# ---------------------------------------------------------------- front end
class _Placement:
    """The front end's stand-in for a scheduler: `add` places a request's sequences on a DP
    rank (siblings of an n > 1 request follow the first) and sends the request there."""

    running: list = []
    waiting: list = []

    def __init__(self, engine: "DataParallelEngine"):
        self.engine = engine

    def add(self, seq) -> None:
        self.engine._place(seq)

    def finish(self, seq, reason: str) -> None:
        pass


class DataParallelEngine(LLMEngine):
    """The LLMEngine API over one engine core per DP rank (see the module docstring)."""

    def __init__(self, args: EngineArgs, executor=None):
        import zmq
        self.args = args
        self.config = args.create_engine_config()
        par = self.config.parallel
        self.async_scheduling = self.config.async_scheduling
        self.platform = get_platform(args.device)
        self.tokenizer, self.eos_token_ids = load_tokenizer(self.config)
        self.dp_size = par.data_parallel_size
        self.requests: dict[str, RequestState] = {}
        self.max_model_len = self.config.model.max_model_len
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        self.scheduler = _Placement(self)
        self._rank_of: dict[str, int] = {}
        self.placement = RankPlacement(self.dp_size, self.config.cache.block_size)
        self._gauges: list[dict] = [{} for _ in range(self.dp_size)]
        self._outs: dict[str, RequestOutput] = {}       # each unfinished request's latest output
        self._pending: list[CoreOutputs] = []          # read while waiting for something else
        self.step_bytes: list[int] = [0] * self.dp_size  # what each rank sent for its last step

        check_no_live_group()
        layout = DPLayout.from_args(args)
        self._ctx = zmq.Context()
        self._pull = _connect(self._ctx, zmq.PULL, layout.outbox, bind=True)
        self._push = [_connect(self._ctx, zmq.PUSH, a, bind=True) for a in layout.inboxes]
        self.executor = start_ranks(args, layout)
        self._finalizer = weakref.finalize(self, _shutdown, self.executor, self._push, self._ctx, layout)
        try:
            self.executor.wait_joining(start_timeout_s())
            ready, deadline = set(), time.monotonic() + start_timeout_s()
            while len(ready) < self.dp_size:  # the cores of other nodes too
                msg = self._next(timeout_s=max(0.0, deadline - time.monotonic()))
                if msg is None:
                    raise RuntimeError(f"DP ranks {sorted(set(range(self.dp_size)) - ready)} did not report "
                                       f"ready within {start_timeout_s():.0f} s (headless nodes started? "
                                       f"--data-parallel-address {args.data_parallel_address})")
                ready.add(msg.dp_rank)
        except BaseException:
            self._finalizer()
            raise
        blocks = min(g["num_blocks"] for g in self._gauges)
        self.block_managers = [SimpleNamespace(num_blocks=blocks)]
        self.runner = SimpleNamespace(vocab_size=self.config.model.hf_config.vocab_size)

    # ------------------------------------------------------------------ requests
    def _place(self, seq) -> None:
        """Send a request to a DP rank once (with its first sequence; the core makes all n)."""
        if seq.index == 0:
            kv = [g.get("kv_cache_usage", 0.0) for g in self._gauges]
            rank = self._rank_of[seq.request_id] = self.placement.choose(seq.token_ids, seq.params.n, kv)
            params = seq.params
            if getattr(params, "guided", None) is not None and params.guided.compiled is not None:
                import dataclasses  # the core compiles its own grammar (compiled ones do not pickle)
                params = dataclasses.replace(params, guided=dataclasses.replace(params.guided, compiled=None))
            state = self.requests.get(seq.request_id)
            self._send(rank, AddRequest(seq.request_id, list(seq.token_ids), state.prompt if state else None, params))

    def prompt_logprobs(self, ids, k):
        return None  # the core that serves the request computes them

    def _send(self, rank: int, msg) -> None:
        if self.executor.failure:
            raise RuntimeError(self.executor.failure)
        self._push[rank].send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    def _forget(self, request_id: str) -> None:
        rank = self._rank_of.pop(request_id, None)
        state = self.requests.pop(request_id, None)
        self._outs.pop(request_id, None)
        if rank is not None and state is not None:
            self.placement.finished(rank, len(state.seqs))

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        rank = self._rank_of.get(request_id)
        if rank is None:
            return None
        self._send(rank, AbortRequest(request_id))
        state = self.requests.get(request_id)
        last = self._outs.get(request_id)
        self._forget(request_id)
        if last is None:
            return state.output() if state else None
        for c in last.outputs:
            c.finish_reason = c.finish_reason or "abort"
        last.finished = True
        return last

    def prompt_logits(self, prompt):
        """Scored by DP rank 0 (the others run dummy steps with expert parallel)."""
        self._send(0, ScorePrompt(prompt))
        while True:
            msg = self._next(timeout_s=None)
            if msg.logits is not None:
                return msg.logits
            if msg.error and not msg.failed_requests:
                raise RequestError(msg.error)
            self._pending.append(msg)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ outputs
    def _next(self, timeout_s: Optional[float]) -> Optional[CoreOutputs]:
        """The next message from any core; None when none came within `timeout_s`."""
        import zmq
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.executor.failure:
                raise RuntimeError(self.executor.failure)
            left = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
            if self._pull.poll(int(left * 1000), zmq.POLLIN):
                msg: CoreOutputs = pickle.loads(self._pull.recv())
                self._gauges[msg.dp_rank] = msg.gauges
                self.step_bytes[msg.dp_rank] = msg.step_bytes
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def step(self) -> list[RequestOutput]:
        msgs, self._pending = self._pending, []
        first = self._next(timeout_s=0.0 if msgs else 0.05)
        while first is not None:
            msgs.append(first)
            first = self._next(timeout_s=0.0)
        outputs = []
        for msg in msgs:
            if msg.error and msg.failed_requests:
                for rid in msg.failed_requests:
                    self._forget(rid)
                raise RuntimeError(f"DP rank {msg.dp_rank}: {msg.error}")
            for delta in msg.outputs:
                state = self.requests.get(delta.request_id)
                if state is None:
                    continue  # aborted meanwhile
                prev = self._outs.get(delta.request_id) or RequestOutput(
                    state.request_id, state.prompt, state.prompt_ids,
                    [CompletionOutput(i, "", []) for i in range(len(state.seqs))], False)
                out = self._outs[delta.request_id] = apply_delta(prev, delta)
                if out.finished:
                    self._forget(delta.request_id)
                outputs.append(out)
        return outputs

    def gauges(self) -> dict:
        total = {}
        for g in self._gauges:
            for k, v in g.items():
                total[k] = total.get(k, 0) + v
        blocks = total.get("num_blocks", 0)
        total["kv_cache_usage"] = 1.0 - total.get("num_free_blocks", 0) / blocks if blocks else 0.0
        return total

    def shutdown(self) -> None:
        self._finalizer()


def _shutdown(workers: WorkerProcs, pushes, ctx, layout: DPLayout) -> None:
    workers.closing = True
    for sock in pushes:
        try:
            sock.send(pickle.dumps(STOP), flags=1)  # zmq.NOBLOCK
        except Exception:  # noqa: BLE001 - a core that is gone cannot be told
            pass
    workers.stop()
    ctx.destroy(linger=0)
    layout.cleanup()
