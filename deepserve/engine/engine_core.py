"""The engine-core process of one DP rank (vLLM v1's EngineCoreProc, SGLang's Scheduler process).

`start_ranks` starts every rank of the DP ranks this node runs as processes (over Ray, every
rank is an actor that Ray places: engine/ray_executor.RayRanks). The first rank of each DP
rank (its TP 0 / PP 0 rank) runs an `EngineCore`: an `LLMEngine` with its own scheduler, KV
pool and sampler (tokenization checks, detokenization and stop handling for its requests),
whose `DPRankExecutor` publishes each step to the DP rank's other ranks; those run the steps
as workers. The core takes requests from the front end (engine/dp_engine.py) on a PULL
socket and pushes its outputs and a few gauges after every step (engine/core_messages.py).

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

import logging
import os
import pickle
import signal
import sys
import tempfile
import time
import uuid
import copy
import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from deepserve.config import EngineArgs
from deepserve.distributed.parallel_state import destroy_distributed, init_distributed, rank_layout
from deepserve.distributed.peer_watch import watch
from deepserve.engine.core_messages import (AbortRequest, AddRequest, CoreOutputs, DeltaWriter, ProfileRequest,
                                            ResetPrefixCache, ScorePrompt, Work, connect)
from deepserve.engine.executor import (STOP, WorkerProcs, die_with_parent, dist_timeout_s, free_port,
                                       free_ports, report_errors)
from deepserve.engine.llm_engine import LLMEngine, chunk_logprobs, load_tokenizer
from deepserve.engine.profiler import run_worker_steps
from deepserve.engine.step_channel import PeerLost, StepChannel, lost_a_peer
from deepserve.engine.step_inputs import DPSync, Stop
from deepserve.platforms import get_platform

logger = logging.getLogger("deepserve")

IDLE_POLL_S = (0.001, 0.05)   # an idle core's wait between sync rounds: first, longest
FRONT_END_STOP_WAIT_S = 1.0   # after the front end's connection ends: how long its stop may still take
GAUGES_EVERY_S = 0.25         # how stale a front end's gauges get while the core steps without outputs for it


def _count_bytes() -> bool:
    return os.environ.get("DEEPSERVE_COUNT_STEP_BYTES") == "1"


# ---------------------------------------------------------------- where ranks run
def front_ends(args: EngineArgs) -> int:
    """How many front ends the cores serve: one, or with --api-server-count N > 1 the
    launcher (front end 0: it starts and stops the cores) and the N API servers."""
    return 1 if args.api_server_count == 1 else args.api_server_count + 1


@dataclass
class DPLayout:
    """Which ranks this node runs, and where cores, front ends and process group meet.

    Every front end ("client": the API server, the `LLM`, or with --api-server-count N > 1
    the launcher as client 0 and the N API servers as clients 1..N) binds one socket for the
    cores' outputs and one per DP rank for its requests; every core connects to all of them.
    One node: ipc:// sockets in a private folder and a free loopback port. Several nodes
    (vLLM's --data-parallel-address / --data-parallel-rpc-port): the front ends' node listens
    on rpc_port + 1 (the process group) and, for client c from base = rpc_port + c * (dp + 2),
    on base (outputs) and base + 2 + r (DP rank r's requests); the other nodes (--headless, given
    the same client count) run their ranks and connect there."""
    inboxes: list[list[str]]     # [client][dp rank]
    outboxes: list[str]          # [client]
    init_method: str
    local_ranks: list[int]
    run_dir: Optional[str] = None

    @classmethod
    def from_args(cls, args: EngineArgs) -> "DPLayout":
        clients = front_ends(args)
        dp, span = args.data_parallel_size, args.tensor_parallel_size * args.pipeline_parallel_size
        local = args.data_parallel_size_local or dp
        start = args.data_parallel_start_rank
        ranks = list(range(start * span, (start + local) * span))
        if local == dp and not args.data_parallel_address:
            run_dir = tempfile.mkdtemp(prefix="deepserve-dp-")
            tag = uuid.uuid4().hex[:8]
            return cls([[f"ipc://{run_dir}/c{c}-core{r}-{tag}" for r in range(dp)] for c in range(clients)],
                       [f"ipc://{run_dir}/c{c}-out-{tag}" for c in range(clients)],
                       f"tcp://127.0.0.1:{free_port()}", ranks, run_dir)
        host, port = args.data_parallel_address or "127.0.0.1", args.data_parallel_rpc_port
        bases = [port + c * (dp + 2) for c in range(clients)]
        return cls([[f"tcp://{host}:{b + 2 + r}" for r in range(dp)] for b in bases],
                   [f"tcp://{host}:{b}" for b in bases], f"tcp://{host}:{port + 1}", ranks)

    @classmethod
    def on_host(cls, args: EngineArgs, host: str, init_method: str) -> "DPLayout":
        """Every rank placed by Ray, on any node: the front ends listen on free tcp ports of
        `host`, this node's cluster address; the process group meets at `init_method`."""
        clients, dp = front_ends(args), args.data_parallel_size
        ports = iter(free_ports(clients * (dp + 1), host))
        return cls([[f"tcp://{host}:{next(ports)}" for _ in range(dp)] for _ in range(clients)],
                   [f"tcp://{host}:{next(ports)}" for _ in range(clients)], init_method, [])

    def cleanup(self) -> None:
        if self.run_dir and os.path.isdir(self.run_dir):
            for name in os.listdir(self.run_dir):
                os.unlink(os.path.join(self.run_dir, name))
            os.rmdir(self.run_dir)


def start_ranks(args: EngineArgs, layout: DPLayout) -> WorkerProcs:
    timeout = dist_timeout_s()
    first = layout.local_ranks[0]
    return WorkerProcs(_rank_main, lambda r: (r, r - first, args, layout.init_method, timeout,
                                              (layout.inboxes, layout.outboxes)),
                       layout.local_ranks, label="rank")


def run_headless(args: EngineArgs) -> int:
    """A node that only runs engine cores (and their TP/PP peers) for the DP ranks from
    --data-parallel-start-rank; returns when the front end stops them."""
    layout = DPLayout.from_args(args)
    procs = start_ranks(args, layout)
    logger.info("headless: ranks %s for DP ranks %d..%d, front ends at %s", layout.local_ranks,
                args.data_parallel_start_rank, args.data_parallel_start_rank + len(layout.local_ranks) // (
                    args.tensor_parallel_size * args.pipeline_parallel_size) - 1, ", ".join(layout.outboxes))
    try:
        # ranks the front end stops exit 0; one that exits otherwise ends the node
        while any(p.is_alive() for p in procs.procs) and not any(p.exitcode for p in procs.procs):
            time.sleep(0.2)
        failed = [(r, p) for r, p in zip(procs.ranks, procs.procs) if p.exitcode]
        if failed:
            rank, proc = failed[0]
            deadline = time.monotonic() + 1.0   # its error, if it sent one, is read by the monitor thread
            while rank not in procs.errors and time.monotonic() < deadline:
                time.sleep(0.05)
            why = f"failed: {procs.errors[rank]}" if rank in procs.errors else f"exited with code {proc.exitcode}"
            raise RuntimeError(f"rank {rank} (pid {proc.pid}) {why} (the front end's node: --data-parallel-address "
                               f"{args.data_parallel_address} --data-parallel-rpc-port {args.data_parallel_rpc_port})")
    finally:
        procs.stop(graceful_s=5.0)
    return 0


# ---------------------------------------------------------------- rank processes
class DPRankExecutor:
    """The executor inside a core: this DP rank's driver runner, publishing to its peers."""

    failure: Optional[str] = None

    def __init__(self, runner_factory, group, src: int, peers: bool):
        self.channel = StepChannel(group, src) if peers else None
        self.sent_bytes, self.count = 0, _count_bytes()
        self.runner = runner_factory(self._publish)

    def _publish(self, msg) -> None:
        if self.channel is None:
            return
        if isinstance(msg, Stop):  # the pipeline's last logits in, then every peer gets the stop
            self.runner.finish_sends()
        n = self.channel.send(msg)
        if self.count:
            self.sent_bytes += n
        if isinstance(msg, Stop):
            self.channel.flush()

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


def run_rank(rank: int, local_rank: int, args: EngineArgs, init_method: str, timeout_s: float,
             addresses: tuple[list[list[str]], list[str]], status=None) -> None:
    """Global rank `rank` of a data-parallel engine until the front end stops it: join the
    process group, then run its DP rank's engine core (the DP rank's first rank) or the steps
    that core publishes (its TP/PP peers). `status` (a pipe, spawned processes only) hears
    when the rank is about to join the group."""
    from deepserve.engine.driver_runner import DriverRunner
    from deepserve.engine.model_runner import WorkerRunner
    config = args.create_engine_config()
    platform = get_platform(args.device)
    par = config.parallel
    if status is not None:
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
        run_worker_steps(runner, StepChannel(local, leader), config.profiler)
        runner.finish_sends()
    else:
        _, eos = load_tokenizer(config)
        executor = DPRankExecutor(
            lambda publish: DriverRunner(config, platform, pctx, local_rank=local_rank, eos_token_ids=eos,
                                         publish=publish),
            local, leader, span > 1)
        engine = LLMEngine(args, executor=executor)
        EngineCore(engine, executor, dp_rank, cores if pctx.moe_dp_exchange else None, addresses,
                   watch_front_end=args.headless).run()
    destroy_distributed()


def _rank_main(rank: int, local_rank: int, args: EngineArgs, init_method: str, timeout_s: float,
               addresses: tuple[list[list[str]], list[str]], status=None) -> None:
    """A spawned rank process (`start_ranks`)."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front end stops us
    report_errors(status, rank, lambda: run_rank(rank, local_rank, args, init_method, timeout_s, addresses, status))
    # Stopped cleanly: sockets closed, process groups destroyed. Skip the interpreter's teardown
    # (a full garbage collection over the model's objects, seconds on a busy host) so that a
    # server's shutdown waits only for the step loop to end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _state_itself(state):
    return state


class EngineCore:
    """One DP rank's engine loop: take requests from the front ends, step, push each request's
    outputs to the front end that sent it.

    Each front end also gets the core's gauges (running / waiting requests, KV use, token
    counters) at least every GAUGES_EVERY_S while the core steps, and once more when it goes
    idle, so every API server's /metrics and placement see the whole core, not only their own
    requests, and see it during steps that output no token (a long prompt's chunks)."""

    def __init__(self, engine: LLMEngine, executor: DPRankExecutor, dp_rank: int, sync_group, addresses,
                 watch_front_end: bool = False):
        """`watch_front_end`: this core runs on a headless node, where no process ends it when
        the front end's node goes away; it watches its connection to front end 0 instead."""
        import zmq
        self.engine, self.executor, self.runner = engine, executor, engine.runner
        self.dp_rank, self.sync_group = dp_rank, sync_group
        self.ctx = zmq.Context()
        inboxes, outboxes = addresses
        self.outbox_addresses = outboxes
        self.inbox = self.ctx.socket(zmq.PULL)   # fair-queued over every front end's requests
        self.inbox.setsockopt(zmq.LINGER, 0)
        for client_inboxes in inboxes:
            self.inbox.connect(client_inboxes[dp_rank])
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.front_end = None   # front end 0's disconnects (a monitor socket), when watched
        if watch_front_end:
            first = self.ctx.socket(zmq.PUSH)
            first.setsockopt(zmq.LINGER, 0)
            self.front_end = watch(first)   # before it connects: heartbeats apply to new connections
            first.connect(outboxes[0])
            self.poller.register(self.front_end, zmq.POLLIN)
        else:
            first = connect(self.ctx, zmq.PUSH, outboxes[0], bind=False)
        self.outboxes = [first] + [connect(self.ctx, zmq.PUSH, a, bind=False) for a in outboxes[1:]]
        self.client_of: dict[str, int] = {}       # request id -> the front end it came from
        self.gauges_sent = [0.0] * len(outboxes)   # when each front end last heard from this core
        self.work: list[Work] = []
        self.queued_adds: dict[str, AddRequest] = {}   # request id -> its add, queued as work (`_apply`)
        self.deltas = DeltaWriter()
        engine.output_of = _state_itself  # a step returns the requests it touched; self.deltas reads them
        self.stopping = False
        self._send(CoreOutputs(dp_rank, self.gauges()))  # ready: front end 0 learns the pool size

    def gauges(self) -> dict:
        g = self.engine.gauges()
        g["load"] = len(self.engine.scheduler.running) + len(self.engine.scheduler.waiting)
        return g

    def _send(self, msg: CoreOutputs, client: int = 0) -> None:
        if self.executor.count:  # the count travels with the message it counts (give or take its own size)
            msg.step_bytes += len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        # copied: zero-copy sends cost more at every size these messages have (30 us at 600 B, pyzmq 27)
        self.outboxes[client].send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        self.gauges_sent[client] = time.monotonic()

    def _share_gauges(self, sent: set[int]) -> None:
        """The gauges to the front ends this step sent nothing, when theirs are GAUGES_EVERY_S
        old or the core has just gone idle: those of other front ends' requests, and steps
        that output no token (a long prompt's chunks) keep /metrics and placement current."""
        now, idle = time.monotonic(), not self._has_work()
        stale = [c for c in range(len(self.outboxes))
                 if c not in sent and (idle or now - self.gauges_sent[c] >= GAUGES_EVERY_S)]
        if stale:
            gauges = self.gauges()
            for c in stale:
                self._send(CoreOutputs(self.dp_rank, gauges), c)

    def _receive(self, timeout_s: Optional[float]) -> None:
        wait_ms = None if timeout_s is None else int(timeout_s * 1000)
        aborted = False
        while True:
            ready = dict(self.poller.poll(wait_ms))
            if self.front_end in ready:
                self._front_end_gone()
            if self.inbox not in ready:
                break
            msg = pickle.loads(self.inbox.recv())
            aborted |= isinstance(msg, AbortRequest)
            self._apply(msg)
            wait_ms = 0
        if aborted and not self._has_work():  # no step will carry the freed blocks: say so now
            self._gauges_to_all()

    def _front_end_gone(self) -> None:
        """Front end 0's connection ended: a stop it sent just before closing may still be on
        the way; without one, its node is gone and this core ends."""
        import zmq
        self.poller.unregister(self.front_end)
        deadline = time.monotonic() + FRONT_END_STOP_WAIT_S
        while not self.stopping and self.inbox.poll(max(0, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            self._apply(pickle.loads(self.inbox.recv()))
        if not self.stopping:
            raise PeerLost(f"DP rank {self.dp_rank}: the front end at {self.outbox_addresses[0]} went away "
                           f"(its process or its node ended)")

    def _gauges_to_all(self) -> None:
        gauges = self.gauges()
        for client in range(len(self.outboxes)):
            self._send(CoreOutputs(self.dp_rank, gauges), client)

    def _apply(self, msg) -> None:
        if isinstance(msg, Stop):
            self.stopping = True
        elif isinstance(msg, AddRequest):
            self.client_of[msg.request_id] = msg.client
            if msg.params.prompt_logprobs is not None and self.sync_group is not None:
                # scoring the prompt runs forwards: a chunk per sync round, as other work
                self.work.append(self._add_scored(msg))
            elif msg.params.prompt_logprobs is not None:
                # scoring the prompt runs a forward over it at add time: queued as work, so that
                # steps and aborts (a client gone) come between such adds, not after all of them
                self.queued_adds[msg.request_id] = msg
                self.work.append(Work(len(msg.prompt_ids), lambda: self._add_queued(msg)))
            else:
                self._add(msg)
        elif isinstance(msg, AbortRequest):
            self.queued_adds.pop(msg.request_id, None)
            self.engine.abort_request(msg.request_id)
            self.deltas.forget(msg.request_id)
            self.client_of.pop(msg.request_id, None)
        elif isinstance(msg, ScorePrompt):
            _, ids = self.engine.tokenize_prompt(msg.prompt)
            if self.sync_group is None:
                self.work.append(Work(len(ids), lambda: self._score(msg)))
            else:
                parts: list = []
                self.work.append(self._in_rounds(
                    ids, lambda start, logits: parts.append(logits),
                    lambda: self._send(CoreOutputs(self.dp_rank, self.gauges(), logits=torch.cat(parts)), msg.client),
                    lambda exc: self._send(CoreOutputs(self.dp_rank, self.gauges(), error=str(exc)), msg.client)))
        elif isinstance(msg, ProfileRequest):
            self._profile(msg)
        elif isinstance(msg, ResetPrefixCache):
            reset = self.engine.reset_prefix_cache(msg.preempt_running)
            settled = self.engine.take_settled()   # micro-batches the reset finished: told now
            if settled:
                self._step(None, lambda: settled)
            self._send(CoreOutputs(self.dp_rank, self.gauges(), prefix_cache_reset=reset), msg.client)

    def _profile(self, msg: ProfileRequest) -> None:
        """start_profile / stop_profile (a stop returns once this DP rank's traces are written);
        the front end that asked hears when it is done."""
        error = None
        try:
            if msg.start:
                self.engine.start_profile(msg.prefix)
            else:
                self.engine.stop_profile()
        except (OSError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._send(CoreOutputs(self.dp_rank, self.gauges(), error=error, profiled=True), msg.client)

    def _add(self, msg: AddRequest) -> bool:
        try:
            self.engine.add_request(msg.request_id, {"prompt_token_ids": msg.prompt_ids, "prompt": msg.prompt,
                                                     "cache_salt": msg.cache_salt}, msg.params)
            return True
        except ValueError as exc:  # refused by its checks, before any forward
            self.client_of.pop(msg.request_id, None)
            self._send(CoreOutputs(self.dp_rank, self.gauges(), error=str(exc), failed_requests=[msg.request_id],
                                   refused=True),
                       msg.client)
            return False

    def _add_queued(self, msg: AddRequest) -> bool:
        """Add a request queued by `_apply`, unless it was aborted meanwhile."""
        if self.queued_adds.get(msg.request_id) is not msg:
            return False
        del self.queued_adds[msg.request_id]
        return self._add(msg)

    def _has_work(self) -> bool:
        return bool(self.work) or self.engine.has_unfinished_requests()

    def run(self) -> None:
        if self.sync_group is None:
            self._run_alone()
        else:
            self._run_in_sync()
        if self.engine.profiler is not None and self.engine.profiler.active:
            try:   # stopped while profiling: the traces are written, as vLLM's shutdown does
                self.engine.stop_profile()
            except (OSError, RuntimeError) as exc:
                logger.warning("profiler: the traces were not written at shutdown: %s", exc)
        try:
            self.executor.runner.publish(STOP)
        except RuntimeError as exc:   # a peer rank died, which the front end (watching every rank) names
            logger.debug("the stop did not reach every peer rank: %s", exc)
        self.ctx.destroy(linger=0)

    def _run_alone(self) -> None:
        """Without expert parallel: a replica that steps whenever it has work."""
        while not self.stopping:
            self._receive(None if not self._has_work() else 0)
            if self.work and not self.stopping:   # one item a turn: a step and new messages between
                self.work.pop(0).run()
                if not self._has_work():   # no step follows to carry the gauges (an aborted add ran)
                    self._gauges_to_all()
            if self.engine.has_unfinished_requests() and not self.stopping:
                self._step(None)

    def _run_in_sync(self) -> None:
        """With expert parallel: every round, the cores agree whether anyone has work (and
        the batch shape); a core without a batch then runs a dummy step. With pipeline
        parallel each round launches one micro-batch per core (a dummy without one) and a core
        finishes its oldest when its pipeline is full or it has nothing new to launch
        (engine/micro_batches.py)."""
        idle = IDLE_POLL_S[0]
        pipe = self.engine.micro_batches
        while True:
            self._receive(0 if self._has_work() else idle)
            if pipe is not None and pipe.full():
                self._step(None, lambda: pipe.finish_oldest(self.engine))
            work = self.work.pop(0) if self.work else None
            batch = None
            if not (work or self.stopping or not self._has_work()):
                batch = pipe.schedule(self.engine) if pipe is not None else self.engine.scheduler.schedule()
            if work:
                mine = DPSync(True, work.num_tokens, True, work.num_tokens, self.stopping)
            elif batch:
                # from the batch as scheduled: the step's own inputs are flattened once, when it runs
                mine = DPSync(True, self.runner.graph_rows(batch), not self.runner.runs_as_rows(batch),
                              max(batch.seq_lens()), self.stopping)
            else:
                mine = DPSync(False, 1, False, 1, self.stopping)
            v = torch.tensor(mine.to_list(), dtype=torch.int64)
            try:
                dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.sync_group)
            except RuntimeError as exc:
                raise PeerLost(f"the DP cores' per-step agreement failed: {exc}") from None
            agreed = DPSync.from_list(v.tolist())
            if agreed.stop:
                return
            if pipe is not None and not batch and pipe:   # nothing new of its own: drain what is in flight
                self._step(None, lambda: pipe.finish_oldest(self.engine))
            if not agreed.has_work:
                idle = min(IDLE_POLL_S[1], idle * 2)
                continue
            idle = IDLE_POLL_S[0]
            self.runner.graph_size = self.runner.dp_graph_size(agreed.num_tokens, not agreed.mixed, agreed.longest)
            if pipe is not None and not work:
                self._step(None, lambda: pipe.launch(self.engine, batch))
                continue
            ran = work.run() if work else bool(batch) and self._step(batch)
            if not ran:  # the other cores' MoE layers wait for this one
                self.runner.run_dummy()
            self.runner.finish_mtp_round()

    def _in_rounds(self, ids: list[int], chunk_done: Callable, done: Callable, refused: Callable) -> Work:
        """Scoring a prompt as sync-round work (expert parallel): one prefill chunk, one forward,
        a round, since the other cores' MoE layers meet this core's once a round. Each next
        chunk goes first in line, so no batch runs before the scoring ends and frees its blocks."""
        step = self.engine.config.scheduler.max_num_batched_tokens
        chunks = self.engine.score_chunks(ids)

        def run(start: int) -> bool:
            try:
                logits = next(chunks)
            except ValueError as exc:  # refused before the first forward (too long, no free blocks)
                refused(exc)
                return False
            chunk_done(start, logits)
            start += len(logits)
            if start < len(ids):
                self.work.insert(0, Work(min(step, len(ids) - start), lambda: run(start)))
            else:
                chunks.close()   # frees the scoring blocks
                done()
            return True
        return Work(min(step, len(ids)), lambda: run(0))

    def _add_scored(self, msg: AddRequest) -> Work:
        """A request with prompt_logprobs under sync rounds: added without them (its checks
        refuse it before any forward), then its prompt scored a chunk a round (engine.prompt_logprobs'
        rows); it steps only once they are in its state, since work goes before batches."""
        k, rows = msg.params.prompt_logprobs, []
        params = copy.copy(msg.params)   # as given (no __post_init__ again), less the prompt logprobs
        params.prompt_logprobs = None
        plain = dataclasses.replace(msg, params=params)

        def finish() -> None:
            state = self.engine.requests.get(msg.request_id)
            if state is not None:   # else aborted meanwhile
                state.prompt_logprobs = self.engine.prompt_logprob_entries(msg.prompt_ids, rows)

        def refuse(exc: ValueError) -> None:
            self.engine.abort_request(msg.request_id)
            self.client_of.pop(msg.request_id, None)
            self._send(CoreOutputs(self.dp_rank, self.gauges(), error=str(exc), failed_requests=[msg.request_id],
                                   refused=True), msg.client)

        scoring = self._in_rounds(msg.prompt_ids, lambda start, logits: rows.extend(
            chunk_logprobs(msg.prompt_ids, start, logits, k)), finish, refuse)
        return Work(scoring.num_tokens, lambda: self._add(plain) and scoring.run())

    def _score(self, score: ScorePrompt) -> bool:
        try:
            logits = self.engine.prompt_logits(score.prompt)
        except ValueError as exc:  # refused before the forward (too long, no free blocks)
            self._send(CoreOutputs(self.dp_rank, self.gauges(), error=str(exc)), score.client)
            return False
        self._send(CoreOutputs(self.dp_rank, self.gauges(), logits=logits), score.client)
        return True

    def _step(self, batch, run: Optional[Callable[[], list]] = None) -> bool:
        """Run one step (`batch`, the engine's own schedule when None, or what `run` does: a
        pipeline micro-batch's launch or finish) and push its outputs; False when no forward
        ran (under async scheduling, what the previous step's tokens finished may leave
        nothing of `batch`)."""
        self.executor.sent_bytes = 0
        steps = self.engine.stats["steps"]
        try:
            if run is not None:
                outputs = run()
            elif batch is None:
                outputs = self.engine.step()
            elif self.engine.async_scheduling:
                outputs = self.engine._step_async(batch)
            else:
                outputs = self.engine._run_sync(batch)
        except Exception as exc:  # a failing step fails its requests, not the core
            if lost_a_peer(exc):   # a peer rank died: the front end names it
                logger.debug("DP rank %d: step failed: %s", self.dp_rank, exc)
            else:
                logger.exception("DP rank %d: step failed", self.dp_rank)
            failed: dict[int, list[str]] = {}
            for rid in list(self.engine.requests):
                self.engine.abort_request(rid)
                self.deltas.forget(rid)
                failed.setdefault(self.client_of.pop(rid, 0), []).append(rid)
            for client, rids in failed.items():
                self._send(CoreOutputs(self.dp_rank, self.gauges(), error=f"{type(exc).__name__}: {exc}",
                                       failed_requests=rids), client)
            if self.sync_group is not None and not lost_a_peer(exc):
                # the other cores run this round's MoE exchanges (their dummy steps') to the end,
                # waiting for ones this core never reached: no round can follow, so the core
                # ends and the front end fails what is left as the engine's death (vLLM's
                # engine core dies on any step error)
                raise RuntimeError(f"DP rank {self.dp_rank}: a step failed with expert parallel, leaving the "
                                   f"other DP ranks' MoE exchanges unmatched: {type(exc).__name__}: {exc}") from exc
            return True
        states = dict.fromkeys(outputs)  # RequestStates (output_of), once each
        if len(self.outboxes) == 1:
            for state in states:
                if state.finished:
                    self.client_of.pop(state.request_id, None)
            by_client = {0: states} if states else {}
        else:
            by_client = {}
            for state in states:
                rid = state.request_id
                client = self.client_of.pop(rid, 0) if state.finished else self.client_of.get(rid, 0)
                by_client.setdefault(client, []).append(state)
        gauges = self.gauges() if by_client else None
        for client, touched in by_client.items():
            msg = CoreOutputs(self.dp_rank, gauges, step_bytes=self.executor.sent_bytes)
            self.deltas.write(msg, touched)
            self._send(msg, client)
        if not by_client and not self._has_work():
            # the step drained the micro-batches of aborted requests: it output nothing, and the
            # core now waits without stepping, so only this message tells that it is idle
            self._gauges_to_all()
        else:
            self._share_gauges(set(by_client))
        return self.engine.stats["steps"] > steps

