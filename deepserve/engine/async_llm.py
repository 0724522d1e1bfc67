"""AsyncLLM: the engine for an asyncio server. `LLMEngine.step()` runs in a background thread
so a forward never blocks the event loop; each request streams its RequestOutputs through
its own asyncio.Queue, fed from that thread with `loop.call_soon_threadsafe`.

Only the engine thread touches the engine. Adds and aborts are queued and applied between
steps (in order, so an abort that follows an add always finds it); an abort frees the
request's KV blocks before the next step. A step that raises fails the requests it held
and the loop goes on serving the others; an error anywhere else ends the thread and fails
every request, those in flight and those still to come (EngineDeadError), rather than leave
them waiting. Gauges the server reports (running / waiting
requests, KV usage, prefix-cache counters) are copied into `self.snapshot` (and each DP
rank's into `self.rank_snapshots`) by the engine thread after each round, so readers never race
the scheduler's containers.

Follows the shape of vLLM's AsyncLLM (generate as an async generator, abort on cancel),
with a thread instead of a separate engine-core process.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Protocol

from deepserve.config import EngineArgs
from deepserve.engine.llm_engine import LLMEngine, PromptType, RequestError, sum_gauges
from deepserve.engine.outputs import RequestOutput
from deepserve.engine.profiler import frontend_profiler
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.step_channel import lost_a_peer

logger = logging.getLogger("deepserve")

IDLE_GAUGES_S = 0.1   # an idle server's refresh of gauges that come from engine-core processes


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the server answers 503 with Retry-After."""


class EngineDeadError(RuntimeError):
    """The engine is not running or is shutting down; the server answers 503."""


class EngineStepError(RuntimeError):
    """A step failed while this request was in it; the server answers 500."""


@dataclass
class FinishedRequest:
    """An ended request as the listener sees it (vLLM's FinishedRequestStats)."""

    prompt_tokens: int
    generation_tokens: int       # all its samples'
    max_sample_tokens: int       # its longest sample's
    cached_tokens: int           # prompt tokens found in the prefix cache
    n: int
    max_tokens: Optional[int]
    reason: str                  # "stop" | "length" | "abort" | "error"
    timings: dict                # RequestOutput.metrics: the engine's time.monotonic() of each phase
    engine: int = 0              # the DP rank that served it
    samples: tuple = ()          # each sample's (tokens, finish reason); () is one sample of the above

    def each_sample(self) -> tuple:
        """(tokens, finish reason) of each of its samples, which vLLM counts as requests of their own."""
        return self.samples or ((self.generation_tokens, self.reason),)


class RequestListener(Protocol):
    """Optional observer of request timing (the server's metrics implement it)."""

    def on_output(self, request_id: str, arrival: float, now: float, new_tokens: list[int],
                  first: bool, engine: int = 0) -> None:
        """`new_tokens`: the tokens each sample gained since the request's last output;
        `engine`: the DP rank serving the request."""

    def on_finish(self, request_id: str, arrival: float, now: float, finished: FinishedRequest) -> None: ...


class AsyncLLM:
    def __init__(self, engine: LLMEngine, listener: Optional[RequestListener] = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.runner.vocab_size
        self.max_waiting_requests = engine.config.scheduler.max_waiting_requests
        self.listener = listener
        self._cond = threading.Condition()
        self._ops: deque = deque()          # (kind, payload, future) applied between steps
        self._stop = False
        self._accepting = True
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._queues: dict[str, asyncio.Queue] = {}   # touched on the event loop only
        self._thread: Optional[threading.Thread] = None
        self.snapshot: dict = {}
        self.rank_snapshots: list[dict] = [{}]
        self.num_step_errors = 0
        self._thread_error: Optional[str] = None   # why the engine thread ended unexpectedly
        self._frontend_profiler = frontend_profiler(engine)   # vLLM's AsyncLLM trace (not ignore_frontend)
        self._take_snapshot()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, listener: Optional[RequestListener] = None) -> "AsyncLLM":
        return cls(LLMEngine(args), listener)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread; call from inside the running event loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="deepserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stop
                and self._thread_error is None and self.fatal_error is None)

    @property
    def fatal_error(self) -> Optional[str]:
        """Why the engine can no longer serve (a worker process died), or None."""
        return getattr(self.engine.executor, "failure", None)

    def stop_accepting(self) -> None:
        """Refuse new requests (503), letting the in-flight ones finish (thread-safe)."""
        self._accepting = False

    @property
    def num_in_flight(self) -> int:
        """Requests whose outputs are still awaited (read on the event loop)."""
        return len(self._queues)

    def begin_shutdown(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and end the in-flight ones with an error (thread-safe)."""
        self._accepting = False
        self._submit("abort_all", EngineDeadError(reason))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread after failing whatever is still in flight."""
        self._accepting = False
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine thread did not stop within %.0f s", timeout)
            self._thread = None
        self.engine.shutdown()  # worker processes of multi-process layouts

    # ------------------------------------------------------------------ requests
    def _submit(self, kind: str, payload) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._thread_error is not None:   # no thread will apply it
                fut.set_exception(EngineDeadError(self._thread_error))
                return fut
            self._ops.append((kind, payload, fut))
            self._cond.notify()
        self.engine.wake()  # a step waiting for engine-core outputs returns to apply it
        return fut

    def num_waiting_requests(self) -> int:
        pending = sum(1 for kind, _, _ in list(self._ops) if kind == "add")
        return self.snapshot.get("num_requests_waiting", 0) + pending

    def check_can_accept(self) -> None:
        """Raise EngineDeadError / QueueFullError when a new request would be refused."""
        if not self._accepting or self._thread is None or self.fatal_error:
            stopping = not self._accepting and self._thread is not None and "the server is shutting down"
            raise EngineDeadError(self._thread_error or self.fatal_error or stopping or "the engine is not running")
        limit = self.max_waiting_requests
        if limit is not None and self.num_waiting_requests() >= limit:
            raise QueueFullError(f"the server queue is full ({limit} requests waiting); retry later")

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs for one request until it finishes. Leaving the
        loop early (client gone, task cancelled) aborts the request and frees its blocks."""
        self.check_can_accept()
        if request_id in self._queues:  # its outputs would go to one of the two, the other waiting forever
            raise RequestError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        arrival = time.monotonic()
        finished = added = refused = failed = False
        tokens_seen = engine = 0
        sample_tokens: list[int] = []   # each sample's tokens so far
        out: Optional[RequestOutput] = None
        try:
            if params.bad_words and params.bad_words_token_ids is None and self.tokenizer is not None:
                # here, not on the engine thread between steps: thousands of words would hold every batch
                await asyncio.get_running_loop().run_in_executor(None, params.update_from_tokenizer, self.tokenizer)
            engine = await asyncio.wrap_future(self._submit("add", (request_id, prompt, params)))
            added = True
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                # outputs are cumulative: only the newest matters, and it is yielded before an
                # error that came after it (the listener counts its tokens)
                newest = next((i for i in reversed(items) if not isinstance(i, BaseException)), None)
                error = next((i for i in items if isinstance(i, BaseException)), None)
                if error is not None:
                    failed = isinstance(error, EngineStepError) or self.fatal_error is not None
                    refused = isinstance(error, RequestError)   # bad input an engine core found: a 400
                    if newest is None:
                        raise error
                    queue.put_nowait(error)   # raised on the next round
                out = newest
                now = time.monotonic()
                counts = [len(o.token_ids) for o in out.outputs]
                total = sum(counts)
                if self.listener is not None and total > tokens_seen:
                    before = sample_tokens + [0] * (len(counts) - len(sample_tokens))
                    self.listener.on_output(request_id, arrival, now, [c - b for c, b in zip(counts, before)],
                                            tokens_seen == 0, engine)
                tokens_seen, sample_tokens = total, counts
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)
            reason = "error" if failed else "abort"
            if self.listener is not None and out is not None:
                # a sample that ended has its own reason; the rest end with the request
                samples = tuple((len(o.token_ids), o.finish_reason or ("stop" if finished else reason))
                                for o in out.outputs) + ((0, reason),) * (params.n - len(out.outputs))
                self.listener.on_finish(request_id, arrival, time.monotonic(), FinishedRequest(
                    len(out.prompt_token_ids), tokens_seen, max(t for t, _ in samples), out.num_cached_tokens,
                    params.n, params.max_tokens, samples[0][1], out.metrics, engine, samples))
            elif self.listener is not None and added and not refused:   # ended before its first output
                ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
                self.listener.on_finish(request_id, arrival, time.monotonic(), FinishedRequest(
                    len(ids or ()), 0, 0, 0, params.n, params.max_tokens, reason, {}, engine,
                    ((0, reason),) * params.n))

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe); its blocks are freed before the next step."""
        self._submit("abort", request_id)

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's: forget every cached prefix block, between two steps; False (nothing changed)
        while requests hold blocks, unless `reset_running_requests` preempts them first."""
        return await asyncio.wrap_future(self._submit("reset_prefix_cache", reset_running_requests))

    # ------------------------------------------------------------------ profiler
    @property
    def profiler_config(self):
        """--profiler-config when a profiler is set (the server then routes /start_profile and
        /stop_profile), else None."""
        return self.engine.config.profiler

    async def start_profile(self, profile_prefix: Optional[str] = None) -> None:
        await asyncio.wrap_future(self._submit("start_profile", profile_prefix))
        if self._frontend_profiler is not None:   # on the event loop's thread, as its stop
            self._frontend_profiler.begin(profile_prefix)

    async def stop_profile(self) -> None:
        """Returns once every rank has written its trace (and this process its own)."""
        await asyncio.wrap_future(self._submit("stop_profile", None))
        if self._frontend_profiler is not None:
            prof = self._frontend_profiler.stop()
            if prof is not None:   # written off the event loop
                await asyncio.to_thread(self._frontend_profiler.write, prof)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:
            # a bug past the step's own error handling: without the thread nothing would ever
            # answer the requests in flight or those still to come, so all of them fail instead
            logger.exception("the engine thread failed; failing every request")
            self._fail_forever(f"the engine thread failed: {type(exc).__name__}: {exc}")

    def _fail_forever(self, reason: str) -> None:
        with self._cond:
            self._thread_error = reason
            self._accepting = False
            ops = list(self._ops)
            self._ops.clear()
        for _, _, fut in ops:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(EngineDeadError(reason))
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._fail_all_queues, EngineDeadError(reason))
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _fail_all_queues(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._ops and not self._stop and not engine.has_unfinished_requests():
                    if engine.gauges_change_when_idle:  # the cores' gauges, read every IDLE_GAUGES_S
                        if not self._cond.wait(IDLE_GAUGES_S):
                            break
                    else:
                        self._cond.wait()
                ops = list(self._ops)
                self._ops.clear()
                stop = self._stop
            for kind, payload, fut in ops:
                self._apply(kind, payload, fut)
            if ops:  # what the adds and aborts changed counts at once (the queue limit reads it)
                self._take_snapshot()
            if stop:
                self._abort_all(EngineDeadError("the server is shutting down"))
                self._take_snapshot()
                return
            outputs: list[RequestOutput] = []
            if engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as exc:  # a failing step must not kill the server
                    if self.fatal_error is None and lost_a_peer(exc):
                        self._await_fatal_error()   # its peers can notice a dead rank before the monitor
                    if self.fatal_error:  # a dead rank, which the owner names: nothing more can run
                        self._fail_step(exc, EngineDeadError(self.fatal_error))
                        self._abort_all(EngineDeadError(self.fatal_error))
                    else:
                        refused = getattr(exc, "refused", None)   # engine cores' checks refused them
                        if not refused or set(exc.request_ids) - set(refused):
                            self.num_step_errors += 1
                            logger.exception("engine step failed; failing the requests in it")
                        self._fail_step(exc)
            self._take_snapshot()
            if outputs:
                self._deliver([(o.request_id, o) for o in outputs])

    def _await_fatal_error(self, limit_s: float = 3.0) -> None:
        deadline = time.monotonic() + limit_s
        while self.fatal_error is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def _apply(self, kind: str, payload, fut: concurrent.futures.Future) -> None:
        # False: the caller stopped waiting (its client left, cancelling the future). Such an
        # add is dropped (the abort its generate() queued after it finds nothing): a batch of
        # requests whose client left is not added, each scoring its prompt_logprobs, first.
        # Other ops apply all the same.
        waiting = fut.set_running_or_notify_cancel()
        if kind == "add" and not waiting:
            return
        try:
            if kind == "add":
                request_id, prompt, params = payload
                self.engine.add_request(request_id, prompt, params)
                result = self.engine.engine_index(request_id)   # the DP rank it went to
            elif kind == "abort":
                result = self.engine.abort_request(payload)
            elif kind == "abort_all":
                result = self._abort_all(payload)
            elif kind == "start_profile":
                result = self.engine.start_profile(payload)
            elif kind == "stop_profile":
                result = self.engine.stop_profile()
            elif kind == "reset_prefix_cache":
                result = self.engine.reset_prefix_cache(reset_running_requests=payload)
            else:
                raise AssertionError(f"unknown engine op {kind!r}")
        except Exception as exc:  # handed back to the awaiting request (e.g. too-long prompt)
            if waiting:   # a rank that died: the engine is gone, which the error says (a 503)
                fut.set_exception(EngineDeadError(self.fatal_error) if self.fatal_error else exc)
            return
        if waiting:
            fut.set_result(result)

    def _abort_all(self, error: BaseException) -> None:
        ids = list(self.engine.requests)
        for rid in ids:
            self.engine.abort_request(rid)
        self._deliver([(rid, error) for rid in ids])

    def _fail_step(self, exc: Exception, error: Optional[BaseException] = None) -> None:
        """End the requests of the step that raised `exc` with `error` (default: the step's)."""
        named = getattr(exc, "request_ids", None)   # engine cores name the requests they failed
        if named is not None:
            ids = set(named)
            self._deliver([(o.request_id, o) for o in exc.outputs])
        else:
            ids = {s.request_id for s in self.engine.scheduler.running} or set(self.engine.requests)
        for rid in ids:
            self.engine.abort_request(rid)
        err = error or EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}")
        refused = {} if error is not None else getattr(exc, "refused", {})   # a core's checks: bad input
        self._deliver([(rid, RequestError(refused[rid]) if rid in refused else err) for rid in ids])

    def _deliver(self, items: list) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, items)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _dispatch(self, items: list) -> None:
        for rid, item in items:
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(item)

    def _take_snapshot(self) -> None:
        ranks = self.engine.rank_gauges()
        self.rank_snapshots, self.snapshot = ranks, ranks[0] if len(ranks) == 1 else sum_gauges(ranks)
