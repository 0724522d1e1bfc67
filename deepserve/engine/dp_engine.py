"""Data-parallel ranks as engines (DP attention, vLLM v1 / SGLang style): the front end.

`DataParallelEngine` keeps no model. It starts every rank as a process (engine/engine_core.py:
one engine core per DP rank, with its TP/PP peers; with --distributed-executor-backend ray
every rank is a Ray actor instead, engine/ray_executor.RayRanks), places each request on the
least-loaded DP rank (fewest unfinished sequences, then KV use; a rank that recently got the
same prompt prefix keeps it unless much busier: engine/placement.py) and merges the cores'
outputs. With one DP rank (DEEPSERVE_ENGINE_CORE_PROCESS=1) it is the engine core in its own
process.

Front end and cores talk over ZeroMQ (PUSH/PULL over ipc:// sockets on one node, tcp:// across
nodes or over Ray; pickled dataclasses, engine/core_messages.py): a request goes to one core; each core
pushes its outputs and a few gauges after every step.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import time
import weakref
from types import SimpleNamespace
from typing import Optional

from deepserve.config import EngineArgs, async_scheduling_plan
from deepserve.distributed.peer_watch import RemoteCores
from deepserve.engine.core_messages import (AbortRequest, AddRequest, CoreOutputs, ProfileRequest, ResetPrefixCache,
                                            ScorePrompt, connect, read_outputs)
from deepserve.engine.engine_core import DPLayout, start_ranks
from deepserve.engine.executor import STOP, check_no_live_group, ready_timeout_s, start_timeout_s
from deepserve.engine.llm_engine import LLMEngine, RequestError, RequestState, load_tokenizer, sum_gauges
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.placement import RankPlacement
from deepserve.platforms import get_platform

logger = logging.getLogger("deepserve")


class _Placement:
    """The front end's stand-in for a scheduler: `add` places a request's sequences on a DP
    rank (siblings of an n > 1 request follow the first) and sends the request there."""

    running: list = []
    waiting: list = []

    def __init__(self, engine: "DataParallelEngine"):
        self.engine = weakref.proxy(engine)   # no cycle: `del llm` shuts the engine down at once

    def add(self, seq) -> None:
        self.engine._place(seq)

    def finish(self, seq, reason: str) -> None:
        pass


class CoreStepError(RuntimeError):
    """Engine cores failed requests (a step that raised, or a request a core refused): those
    requests are gone; `outputs` are the other requests' outputs read in the same step();
    `refused` maps each refused request to the core's message (bad input, not a failed step)."""

    def __init__(self, message: str, request_ids: list[str], outputs: list[RequestOutput],
                 refused: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.request_ids, self.outputs, self.refused = request_ids, outputs, refused or {}


class CoreLink:
    """The executor of a front end attached to cores another process runs: it starts nothing,
    and `failure` says why the cores can no longer serve (set by that process's watcher)."""

    failure: Optional[str] = None

    def explain(self, exc: BaseException) -> str:
        return str(exc)

    def shutdown(self) -> None:
        pass


class DataParallelEngine(LLMEngine):
    """The LLMEngine API over one engine core per DP rank (see the module docstring)."""

    gauges_change_when_idle = True
    detokenizes = False  # the cores detokenize
    _remote: Optional[RemoteCores] = None   # the DP ranks of headless nodes, watched through their sockets

    def __init__(self, args: EngineArgs, executor=None):
        """Start the cores and be their front end 0 (with --api-server-count N > 1 the
        launcher, and the N API servers `attach` as front ends 1..N)."""
        self._init_front_end(args, client=0)
        check_no_live_group()
        if args.distributed_executor_backend == "ray":
            from deepserve.engine.ray_executor import RayRanks
            ranks = RayRanks(args)  # placed, not started: the front end listens first
            try:
                self.layout = layout = DPLayout.on_host(args, ranks.front_end_ip, ranks.init_method)
                self._bind(layout)
            except BaseException:
                ranks.stop(graceful_s=0.0)
                raise
            self.executor = ranks.start(args, layout)
        else:
            self.layout = layout = DPLayout.from_args(args)
            self._bind(layout)
            self._remote = self._watch_other_nodes(layout)
            self.executor = start_ranks(args, layout)
        self._finalizer = weakref.finalize(self, _shutdown, self.executor, self._pull, self._push, self._ctx, layout,
                                           self._remote)
        try:
            self.executor.wait_joining(start_timeout_s())
            ready, deadline = set(), time.monotonic() + ready_timeout_s()
            while len(ready) < self.dp_size:  # the cores of other nodes too
                msg = self._next(timeout_s=max(0.0, deadline - time.monotonic()))
                if msg is None:
                    raise RuntimeError(f"DP ranks {sorted(set(range(self.dp_size)) - ready)} did not report "
                                       f"ready within {ready_timeout_s():.0f} s (DEEPSERVE_ENGINE_READY_TIMEOUT; "
                                       f"headless nodes started? --data-parallel-address "
                                       f"{args.data_parallel_address})")
                ready.add(msg.dp_rank)
        except BaseException:
            # a core still starting has not connected its inbox, so it cannot hear the STOP of
            # the shutdown: end the ranks now rather than after the shutdown's grace period
            self.executor.stop(graceful_s=0.0)
            self._finalizer()
            raise
        self.executor.started()
        self._init_pool()

    @classmethod
    def attach(cls, args: EngineArgs, layout: DPLayout, client: int, gauges: list[dict]) -> "DataParallelEngine":
        """Front end `client` (>= 1) of cores that another process started and stops (the
        launcher of --api-server-count N); `gauges`: the cores' gauges as that process last saw
        them. Its executor is a `CoreLink`, whose `failure` that process's watcher sets."""
        self = cls.__new__(cls, args)
        self._init_front_end(args, client)
        self.layout = layout
        self._bind(layout)
        self.executor = CoreLink()
        self._gauges = [dict(g) for g in gauges]
        self._finalizer = weakref.finalize(self, _close_sockets, self._pull, self._push, self._ctx)
        self._init_pool()
        return self

    def _init_front_end(self, args: EngineArgs, client: int) -> None:
        self.args = args
        self.client = client
        self.config = args.create_engine_config()
        par = self.config.parallel
        self.platform = get_platform(args.device)
        self.async_scheduling, note = async_scheduling_plan(self.config, self.platform.device_type)
        if client == 0:  # the other API servers' front ends attach to the same cores
            logger.info("%s", note)
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
        self._unconfirmed = [0] * self.dp_size  # requests sent to each core since its last message
        # wake(): a pipe that ends step()'s wait for outputs, so a request or abort submitted
        # meanwhile goes to its core at once instead of after the core's next message
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    def _bind(self, layout: DPLayout) -> None:
        """This front end's sockets: its outputs, and one per DP rank for its requests."""
        import zmq
        self._ctx = zmq.Context()
        self._pull = connect(self._ctx, zmq.PULL, layout.outboxes[self.client], bind=True)
        self._push = [connect(self._ctx, zmq.PUSH, a, bind=True) for a in layout.inboxes[self.client]]

    def _watch_other_nodes(self, layout: DPLayout) -> Optional[RemoteCores]:
        """The DP ranks that headless nodes run, which no process monitor of this node sees."""
        span = self.config.parallel.tensor_parallel_size * self.config.parallel.pipeline_parallel_size
        remote = sorted(set(range(self.dp_size)) - {r // span for r in layout.local_ranks})
        if not remote:
            return None
        return RemoteCores({r: self._push[r] for r in remote}, {r: layout.inboxes[self.client][r] for r in remote})

    def _init_pool(self) -> None:
        blocks = min(g["num_blocks"] for g in self._gauges)
        self.block_manager = SimpleNamespace(num_blocks=blocks)  # the smallest core's pool (add_request's check)
        # a core serves contexts of at most what its pool holds (LLMEngine): so does the front end,
        # whose checks (and the API's /v1/models) must refuse what the cores would
        self.max_model_len = min(self.max_model_len, blocks * self.config.cache.block_size)
        self.runner = SimpleNamespace(vocab_size=self.config.model.hf_config.vocab_size)

    # ------------------------------------------------------------------ requests
    def _place(self, seq) -> None:
        """Send a request to a DP rank once (with its first sequence; the core makes all n)."""
        if seq.index == 0:
            kv = [g.get("kv_cache_usage", 0.0) for g in self._gauges]
            rank = self._rank_of[seq.request_id] = self.placement.choose(seq.token_ids, seq.params.n, kv,
                                                                         seq.cache_salt)
            params = seq.params
            if getattr(params, "guided", None) is not None and params.guided.compiled is not None:
                import dataclasses  # the core compiles its own grammar (compiled ones do not pickle)
                params = dataclasses.replace(params, guided=dataclasses.replace(params.guided, compiled=None))
            state = self.requests.get(seq.request_id)
            self._unconfirmed[rank] += 1
            self._send(rank, AddRequest(seq.request_id, list(seq.token_ids), state.prompt if state else None, params,
                                         self.client, seq.cache_salt))

    def prompt_logprobs(self, ids, k):
        return None  # the core that serves the request computes them

    def _send(self, rank: int, msg) -> None:
        """A PUSH socket whose core has gone holds the message until one connects again, so
        wait for room only while no rank is known to have failed."""
        import zmq
        data, sock = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL), self._push[rank]
        while True:
            self._check_ranks()
            try:
                sock.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                sock.poll(200, zmq.POLLOUT)

    def _check_ranks(self) -> None:
        """Raise when a rank has failed (a local one: its process monitor says so; one of a
        headless node: its socket's connection ended)."""
        if self._remote is not None and not self.executor.failure and not self.executor.closing:
            self.executor.failure = self._remote.lost()
        if self.executor.failure:
            raise RuntimeError(self.executor.failure)

    def _forget(self, request_id: str) -> None:
        rank = self._rank_of.pop(request_id, None)
        state = self.requests.pop(request_id, None)
        self._outs.pop(request_id, None)
        if rank is not None and state is not None:
            self.placement.finished(rank, len(state.seqs))

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        rank = self._rank_of.get(request_id)
        if rank is None:
            return None
        if not self.executor.failure:   # else a rank died: the cores are stopped, the request only forgotten
            try:
                self._send(rank, AbortRequest(request_id))
            except RuntimeError:   # a rank found dead now, which the executor's failure names
                pass
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
        self._send(0, ScorePrompt(prompt, self.client))
        while True:
            msg = self._next(timeout_s=None)
            if msg.logits is not None:
                return msg.logits
            if msg.error and not msg.failed_requests:
                raise RequestError(msg.error)
            self._pending.append(msg)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def start_profile(self, profile_prefix: Optional[str] = None) -> None:
        self._profile(ProfileRequest(True, profile_prefix, self.client))

    def stop_profile(self) -> None:
        self._profile(ProfileRequest(False, None, self.client))

    def _reset_cached_blocks(self, preempt_running: bool = False) -> bool:
        """Every DP rank's core forgets its cached prefix blocks (first preempting its running
        requests if `preempt_running`); whether all of them did."""
        answers = self._ask_every_core(ResetPrefixCache(self.client, preempt_running),
                                       lambda msg: msg.prefix_cache_reset is not None)
        return all(msg.prefix_cache_reset for msg in answers)

    def _profile(self, request: ProfileRequest) -> None:
        """Every DP rank's core starts (stops) its profiler; returns once all are done."""
        self._check_profiler()
        errors = [f"DP rank {msg.dp_rank}: {msg.error}"
                  for msg in self._ask_every_core(request, lambda msg: msg.profiled) if msg.error]
        if errors:
            raise RuntimeError("; ".join(errors))

    def _ask_every_core(self, request, is_answer) -> list[CoreOutputs]:
        """Send `request` to every DP rank's core; their answers (the messages `is_answer`
        picks), by rank. Step outputs that come meanwhile wait for step()."""
        for rank in range(self.dp_size):
            self._send(rank, request)
        answers: dict[int, CoreOutputs] = {}
        while len(answers) < self.dp_size:
            msg = self._next(timeout_s=None)
            if is_answer(msg):
                answers[msg.dp_rank] = msg
            else:
                self._pending.append(msg)
        return [answers[rank] for rank in range(self.dp_size)]

    # ------------------------------------------------------------------ outputs
    def wake(self) -> None:
        """End a step() waiting for outputs now (thread-safe; AsyncLLM calls it with each
        request or abort it queues for the engine thread)."""
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full of wakes already
            pass

    def _woken(self, timeout_ms: int) -> bool:
        """Wait up to `timeout_ms` for a core's message or a wake(); True for a wake (consumed)."""
        import zmq
        readable = zmq.select([self._pull, self._wake_r], [], [], timeout_ms / 1000)[0]
        if self._pull in readable:
            return False
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            return True
        return False

    def _next(self, timeout_s: Optional[float], wakeable: bool = False) -> Optional[CoreOutputs]:
        """The next message from any core; None when none came within `timeout_s` (or, when
        `wakeable`, as soon as wake() is called)."""
        import zmq
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            self._check_ranks()
            left = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
            if wakeable and self._woken(int(left * 1000)):
                return None
            if self._pull.poll(0 if wakeable else int(left * 1000), zmq.POLLIN):
                msg: CoreOutputs = pickle.loads(self._pull.recv())
                if msg.gauges is not None:
                    self._gauges[msg.dp_rank] = msg.gauges
                self._unconfirmed[msg.dp_rank] = 0
                self.step_bytes[msg.dp_rank] = msg.step_bytes
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def step(self) -> list[RequestOutput]:
        msgs, self._pending = self._pending, []
        first = self._next(timeout_s=0.0 if msgs else 0.05, wakeable=True)
        while first is not None:
            msgs.append(first)
            first = self._next(timeout_s=0.0)
        outputs, failed, errors, refused = [], [], [], {}
        for msg in msgs:
            if msg.error and msg.failed_requests:
                for rid in msg.failed_requests:
                    self._forget(rid)
                    if msg.refused:
                        refused[rid] = msg.error
                failed += msg.failed_requests
                errors.append(f"DP rank {msg.dp_rank}: {msg.error}")
                continue
            for out in read_outputs(msg, self._outs, self._start_output):
                if out.finished:
                    self._forget(out.request_id)
                outputs.append(out)
        if failed:  # after reading every message: the other requests' outputs are not lost
            raise CoreStepError("; ".join(errors), failed, outputs, refused)
        return outputs

    def _start_output(self, request_id: str) -> Optional[RequestOutput]:
        """A tracked request's output before any token (None: aborted meanwhile)."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        return RequestOutput(state.request_id, state.prompt, state.prompt_ids,
                             [CompletionOutput(i, "", []) for i in range(len(state.seqs))], False)

    def gauges(self) -> dict:
        """The cores' gauges summed (rank_gauges)."""
        return sum_gauges(self.rank_gauges())

    def rank_gauges(self) -> list[dict]:
        """Each core's gauges, as its latest message (read now, without waiting) gave them;
        requests sent to a core since its last message count as waiting there."""
        try:
            msg = self._next(timeout_s=0.0)
            while msg is not None:  # kept for step(), which handles what they carry
                self._pending.append(msg)
                msg = self._next(timeout_s=0.0)
        except RuntimeError:
            pass  # a failed core: AsyncLLM.fatal_error reports it
        ranks = []
        for g, unconfirmed in zip(self._gauges, self._unconfirmed):
            g = dict(g)
            g["num_requests_waiting"] = g.get("num_requests_waiting", 0) + unconfirmed
            ranks.append(g)
        return ranks

    def engine_index(self, request_id: str) -> int:
        return self._rank_of.get(request_id, 0)

    def shutdown(self) -> None:
        self._finalizer()
        self.shut_down = True


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _close_sockets(pull, pushes, ctx) -> None:
    """Close the front end's sockets, then their context. The finalizers take the sockets
    themselves: an engine collected as garbage may have its sockets collected with it, and
    the context's own (weak) list of them is cleared before this runs, so `ctx.destroy`
    alone would leave them open and wait for them forever."""
    for sock in (pull, *pushes):
        sock.close(linger=0)
    ctx.destroy(linger=0)


def _shutdown(workers, pull, pushes, ctx, layout: DPLayout, remote: Optional[RemoteCores] = None) -> None:
    """Tell the cores to stop, then end their ranks (`WorkerProcs` or `RayRanks`)."""
    workers.closing = True
    for sock in pushes:
        try:
            sock.send(pickle.dumps(STOP), flags=1)  # zmq.NOBLOCK
        except Exception:  # noqa: BLE001 - a core that is gone cannot be told
            pass
    workers.stop()
    if remote is not None:
        remote.close()
    _close_sockets(pull, pushes, ctx)
    layout.cleanup()
