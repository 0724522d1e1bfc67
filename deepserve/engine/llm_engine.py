"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

    batch = scheduler.schedule()
    seqs, sampled = runner.execute(batch)
    outputs = self._postprocess(batch, seqs, sampled)

The engine owns tokenization, detokenization and stop handling; the scheduler owns the
block manager; the runner owns the model, KV pool and sampler. With pipeline_parallel_size
P > 1 a step launches one micro-batch and finishes the oldest once P are in flight
(engine/micro_batches.py). With data_parallel_size > 1
each DP rank runs one of these as its engine core (engine/engine_core.py) behind a front end
(engine/dp_engine.py).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import logging
import math
import operator
import time
import weakref
from typing import Optional, Union

from deepserve.config import EngineArgs, async_scheduling_plan, engine_core_apart, served_names
from deepserve.engine.block_manager import BlockManager, prefix_salt
from deepserve.engine.executor import make_executor
from deepserve.engine.llm_inputs import refuse_unsupported
from deepserve.engine.micro_batches import MicroBatchPipeline
from deepserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from deepserve.engine.profiler import DriverProfiler, driver_profiler
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.sampler import SamplerOutput, top_logprobs
from deepserve.engine.scheduler import ScheduledBatch, Scheduler
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import make_spec_decoder, needs_sync_step, run_speculative_step
from deepserve.engine.tokenizer import Tokenizer
from deepserve.ops.profile import OpsProfiler
from deepserve.platforms import get_platform

logger = logging.getLogger("deepserve")

PromptType = Union[str, dict, list]


class RequestError(ValueError):
    """A request the engine cannot serve (e.g. too long); carries the offending numbers."""


class RequestState:
    """One request: its n sequences, their detokenizers and the text seen so far."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_ids: list[int],
                 params: SamplingParams, seqs: list[Sequence], tokenizer: Optional[Tokenizer]):
        self.request_id, self.prompt, self.prompt_ids, self.params = request_id, prompt, prompt_ids, params
        self.seqs = seqs
        self.detoks = [tokenizer.decode_stream(prompt_ids, params.skip_special_tokens)
                       if tokenizer else None for _ in seqs]
        self.texts = [""] * len(seqs)
        self.prompt_logprobs: Optional[list] = None  # computed at add time when asked for
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars a stop string may still need
        self.arrival = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def visible_text(self, i: int) -> str:
        """Sample i's text so far, less the characters a stop string may still claim (never
        show a stop string's start)."""
        text = self.texts[i]
        if self.hold and not self.seqs[i].is_finished:
            return text[:max(0, len(text) - self.hold)]
        return text

    def output(self) -> RequestOutput:
        outs = []
        for i, seq in enumerate(self.seqs):
            outs.append(CompletionOutput(
                index=seq.index, text=self.visible_text(i), token_ids=seq.output_token_ids,  # a fresh slice
                cumulative_logprob=seq.cumulative_logprob if self.params.logprobs is not None else None,
                logprobs=list(seq.logprobs) if self.params.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs, self.finished,
                             num_cached_tokens=max(s.num_cached_tokens for s in self.seqs),
                             metrics=self.timings(), prompt_logprobs=self.prompt_logprobs)

    def timings(self) -> dict:
        """time.monotonic() of its arrival, first admission to run, first and last token (None
        until then): vLLM's RequestStateStats, from which /metrics takes queue, prefill and
        decode times."""
        scheduled = [s.first_scheduled_time for s in self.seqs if s.first_scheduled_time is not None]
        return {"arrival_time": self.arrival, "first_scheduled_time": min(scheduled, default=None),
                "first_token_time": self.first_token_time, "last_token_time": self.last_token_time}


def load_tokenizer(config) -> tuple[Optional[Tokenizer], set[int]]:
    """The model's tokenizer (None for token-id-only folders) and its EOS token ids."""
    tok_path = config.model.tokenizer
    tokenizer = Tokenizer(tok_path) if tok_path else None
    eos = set(tokenizer.eos_token_ids) if tokenizer else set()
    cfg_eos = config.model.hf_config.get("eos_token_id")
    if not eos and cfg_eos is not None:
        eos = set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return tokenizer, eos


def chunk_logprobs(ids: list[int], start: int, logits, k: int) -> list:
    """top_logprobs rows of one scoring chunk: `logits` [n, V] at positions start.. of `ids`,
    row i predicting token start + i + 1 (the prompt's last position predicts none)."""
    import torch

    targets = ids[start + 1:start + 1 + len(logits)]
    return top_logprobs(logits[:len(targets)].log_softmax(dim=-1), torch.tensor(targets), k)


def prompt_length_error(prompt_len: int, limit: int) -> Optional[str]:
    """vLLM's words for a prompt that leaves no room for an output token in `limit`, or None."""
    if prompt_len > limit:
        return (f"The decoder prompt (length {prompt_len}) is longer than the maximum model length of {limit}. "
                f"Make sure that `max_model_len` is no smaller than the number of text tokens.")
    if prompt_len == limit:
        return (f"The decoder prompt (length {prompt_len}) plus the number of requested output tokens (at least 1) "
                f"is longer than the maximum model length of {limit}.")
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


class LLMEngine:
    # whether gauges() changes while this engine has no unfinished request (true where they
    # come from engine-core processes), so that an idle server re-reads them
    gauges_change_when_idle = False
    # what a step returns for each request it touched: its cumulative RequestOutput, or (an
    # engine core, which sends only what each request gained: engine/core_messages.py) the
    # RequestState itself
    output_of = staticmethod(RequestState.output)
    # whether this engine turns tokens into text (a front end of engine-core processes does not)
    detokenizes = True
    # set by shutdown(): the driver's model and KV pool are freed, no request is taken after
    shut_down = False
    # --profiler-config: the driver's side of vLLM's profiler (engine/profiler.py; a front end
    # of engine cores has none, its cores do)
    profiler: Optional[DriverProfiler] = None

    def __new__(cls, args: EngineArgs, executor=None):
        if cls is LLMEngine and executor is None and engine_core_apart(args, default=False):
            from deepserve.engine.dp_engine import DataParallelEngine
            return super().__new__(DataParallelEngine)
        return super().__new__(cls)

    def __init__(self, args: EngineArgs, executor=None):
        """`executor`: given by a DP rank's engine core (engine/engine_core.py); by default the
        executor for the configured layout is started here."""
        self.args = args
        self.config = args.create_engine_config()
        self.platform = get_platform(args.device)
        self.async_scheduling, note = async_scheduling_plan(self.config, self.platform.device_type)
        if executor is None:  # a DP rank's core: its front end said it
            logger.info("%s", note)
        self.tokenizer, eos = load_tokenizer(self.config)
        self.eos_token_ids = eos
        self.executor = executor or make_executor(self.config, self.platform, eos)
        # workers, process groups and ports go when the engine does, even without shutdown()
        self._finalizer = weakref.finalize(self, self.executor.shutdown)
        self.runner = self.executor.runner  # the driver's runner (rank 0)
        cache = self.config.cache
        # of the size every rank agreed on (the smallest pool that fits on each)
        self.block_manager = BlockManager(self.runner.num_blocks, cache.block_size, cache.enable_prefix_caching,
                                          cache.prefix_caching_hash_algo, prefix_salt(cache.prefix_caching_salt))
        self.scheduler = Scheduler(self.config.scheduler, self.block_manager)
        self.requests: dict[str, RequestState] = {}
        self.max_model_len = self._context_the_pool_holds()
        self._inflight = None  # async scheduling: the launched step whose tokens are not read yet
        self._settled: list[RequestOutput] = []  # outputs of micro-batches a reset finished early
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}
        # speculative decoding (engine/spec_decode.py): drafting steps run synchronously
        self.spec = make_spec_decoder(self.config, self.runner)
        # pipeline parallel: up to one micro-batch in flight per stage (with DP x EP the engine
        # core launches them in rounds with the other cores)
        pp = self.config.parallel.pipeline_parallel_size
        self.micro_batches = (MicroBatchPipeline(pp, self.config.scheduler.max_num_seqs)
                              if pp > 1 and self.spec is None else None)
        self.profiler = driver_profiler(self.config, self.runner, self.executor)
        self.ops_profiler: Optional[OpsProfiler] = None
        if args.ops_profile:
            self.ops_profiler = self._profile_ops_at_start()

    def _context_the_pool_holds(self) -> int:
        """max_model_len against the KV pool, by vLLM's rules: a pool that cannot hold one request
        of the --max-model-len given is an error at start, and -1 (auto) fits it to the pool.
        Without the flag (vLLM raises the same error) the pool's length is served, with a
        warning. Never more than the pool: a sequence longer than the whole pool could never be
        scheduled again once it preempted itself."""
        cache, model = self.config.cache, self.config.model
        want, pool_tokens = model.max_model_len, self.runner.num_blocks * cache.block_size
        if pool_tokens >= want:
            return want
        if model.original_max_model_len == -1:
            logger.info("max_model_len auto: %d tokens, what the KV cache holds (the model's is %d)",
                        pool_tokens, want)
            return pool_tokens
        if model.original_max_model_len is None:
            logger.warning("the KV cache holds %d tokens, fewer than max_model_len %d: serving contexts "
                           "of at most %d tokens (give the KV cache more memory or lower --max-model-len)",
                           pool_tokens, want, pool_tokens)
            return pool_tokens
        per_block = self.runner.bytes_per_block()
        need, have = math.ceil(want / cache.block_size) * per_block, self.runner.num_blocks * per_block
        raise ValueError(f"To serve at least one request with the model's max seq len ({want}), {_size(need)} "
                         f"KV cache is needed, which is larger than the available KV cache memory "
                         f"({_size(have)}). Based on the available memory, the estimated maximum model "
                         f"length is {pool_tokens}. Try to {self.runner.more_kv_cache_hint()}, or lower "
                         f"--max-model-len (-1 or auto: the longest the KV cache holds)")

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, usage_context=None, stat_loggers=None,
                         enable_multiprocessing: bool = False) -> "LLMEngine":
        """vLLM's: the engine of these arguments (as `LLMEngine(engine_args)`). `usage_context`
        only tags vLLM's usage reports, which deepserve does not send; the engine core runs in a
        process of its own as the arguments' layout says (DEEPSERVE_ENGINE_CORE_PROCESS=1 for one
        DP rank), not as `enable_multiprocessing` asks."""
        if stat_loggers is not None:
            raise NotImplementedError("stat_loggers are not supported: deepserve's engine keeps its own "
                                      "counters (LLMEngine.gauges(), LLM.get_metrics())")
        if enable_multiprocessing:
            raise NotImplementedError("enable_multiprocessing is not supported: set DEEPSERVE_ENGINE_CORE_PROCESS=1 "
                                      "to run the engine core in a process of its own")
        return cls(engine_args)

    def _profile_ops_at_start(self) -> OpsProfiler:
        """--ops-profile: a short greedy generation of random prompts (prefill, then decode
        steps as served: CUDA graphs, async scheduling, speculative decoding as configured) under
        the profiler, logged; the counters it moved are put back. With data parallel the cores
        step together, so only the serving windows are profiled."""
        profiler = OpsProfiler(self.platform.device().type == "cuda")
        if self.config.parallel.data_parallel_size > 1:
            return profiler
        import torch

        sched = self.config.scheduler
        n, prompt_len = min(sched.max_num_seqs, 4), max(1, min(32, self.max_model_len // 4))
        new_tokens = max(1, min(8, self.max_model_len - prompt_len - 1))
        g = torch.Generator().manual_seed(0)
        bm = self.block_manager
        saved = copy.deepcopy((self.stats, (bm.prefix_queries, bm.prefix_hits), self.scheduler.num_preemptions,
                               getattr(self.spec, "stats", None), self.scheduler.step_tokens))
        with profiler.profiling(lambda: self.stats["steps"] - saved[0]["steps"]):
            params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
            for _ in range(n):
                ids = torch.randint(0, self.runner.vocab_size, (prompt_len,), generator=g).tolist()
                self.add_request(None, {"prompt_token_ids": ids}, params)
            while self.has_unfinished_requests():
                self.step()
        self.stats.update(saved[0])
        self.scheduler.num_preemptions, self.scheduler.step_tokens = saved[2], saved[4]
        bm.prefix_queries, bm.prefix_hits = saved[1]
        if self.spec is not None:
            self.spec.stats = saved[3]
        logger.info("%s", profiler.report.summary(f"start-up: {n} x {prompt_len}-token prompts, "
                                                  f"{new_tokens} tokens each"))
        return profiler

    # ------------------------------------------------------------------ requests
    def tokenize_prompt(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: give prompt_token_ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self.tokenize_prompt(prompt["prompt"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise RequestError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: Optional[str], prompt: PromptType, params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None, lora_request=None,
                    tokenization_kwargs: Optional[dict] = None, trace_headers=None, priority: int = 0,
                    prompt_text: Optional[str] = None) -> str:
        """vLLM's arguments, in its order. `arrival_time`: when the request arrived (time.time()),
        for its latency metrics; `priority` (lower runs first) needs scheduling_policy "priority".
        Tokenization options belong to LLM.generate (here the prompt is tokenized as given), and
        there is no request tracing: those arguments are refused unless empty."""
        if self.shut_down:
            raise RuntimeError("this engine was shut down (its model and KV cache are freed); start a new one")
        refuse_unsupported(lora_request=lora_request)
        for name, value in (("tokenization_kwargs", tokenization_kwargs), ("trace_headers", trace_headers),
                            ("prompt_text", prompt_text)):
            if value:
                raise RequestError(f"add_request's {name} is not supported (LLM.generate takes tokenization_kwargs; "
                                   f"deepserve has no request tracing)")
        params = (params or SamplingParams()).with_vocab_logprobs(self.runner.vocab_size)
        if priority:
            if self.config.scheduler.policy != "priority":
                raise RequestError(f"Got priority {priority} but priority scheduling is not enabled "
                                   f"(scheduling_policy=\"priority\")")
            params = dataclasses.replace(params, priority=priority)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        if not ids:
            raise RequestError("The decoder prompt cannot be empty")
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise RequestError(f"cache_salt must be a non-empty string if given, got {cache_salt!r}")
        self._check_prompt_ids(ids)
        vocab = self.runner.vocab_size
        too_long = prompt_length_error(len(ids), self.max_model_len)
        if too_long:
            raise RequestError(too_long)
        if params.max_tokens is None or len(ids) + params.max_tokens > self.max_model_len:
            # as vLLM's engine: the output stops at max_model_len (finish_reason "length"), min_tokens
            # or not; the API server refuses such a request with a 400 before it gets here
            params = params.with_max_tokens(self.max_model_len - len(ids))
        capacity = self.block_manager.num_blocks * self.config.cache.block_size  # one DP rank's pool
        if len(ids) + 1 > capacity:
            raise RequestError(f"the prompt has {len(ids)} tokens but the KV cache holds only {capacity}")
        if params.bad_words and params.bad_words_token_ids is None:   # AsyncLLM tokenizes them before
            if self.tokenizer is None:
                raise RequestError("bad_words needs the model's tokenizer (this model has none)")
            params.update_from_tokenizer(self.tokenizer)
        for name, given in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids),
                            ("allowed_token_ids", params.allowed_token_ids or []),
                            ("logprob_token_ids", params.logprob_token_ids or []),
                            ("reasoning_token_ids", sum(params.reasoning_token_ids or (), ())),
                            ("bad_words", [t for w in params.bad_words_token_ids or () for t in w])):
            bad = next((t for t in given if t >= vocab), None)
            if bad is not None:
                raise RequestError(f"{name} token id {bad} is outside the vocabulary [0, {vocab})")
        if params.thinking_token_budget is not None and params.reasoning_token_ids is None:
            raise RequestError("thinking_token_budget needs to know where reasoning starts and ends: serve with "
                               "--reasoning-parser deepseek_r1 (offline: LLM(..., reasoning_parser=\"deepseek_r1\")), "
                               "or give SamplingParams.reasoning_token_ids")
        if params.guided is not None and params.guided.compiled is None:
            self.grammar_compiler().compile(params.guided)
        prompt_logprobs = self.prompt_logprobs(ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None
        seqs = [Sequence(request_id, i, ids, params, cache_salt) for i in range(params.n)]
        state = RequestState(request_id, text, ids, params, seqs, self.tokenizer if self.detokenizes else None)
        state.prompt_logprobs = prompt_logprobs
        if arrival_time is not None:   # on the monotonic clock the metrics use
            state.arrival = time.monotonic() - max(0.0, time.time() - arrival_time)
        self.requests[request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)
        self.stats["prompt_tokens"] += len(ids) * params.n   # each sample prefills it, as each of vLLM's n children
        return request_id

    def abort_request(self, request_id: Union[str, list[str]]) -> Optional[RequestOutput]:
        """Stop a request now and free its KV blocks; returns its last output. A list of ids
        (vLLM's form) stops each of them and returns None."""
        if isinstance(request_id, str):
            return self._abort(request_id)
        for rid in request_id:
            self._abort(rid)
        return None

    def _abort(self, request_id: str) -> Optional[RequestOutput]:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq, "abort")
        return state.output()

    def prompt_logits(self, prompt: PromptType):
        """Logits [len, V] at every position of one prompt, computed through the paged cache
        (a prefill in chunks of at most --max-num-batched-tokens; the blocks are freed afterwards)."""
        _, ids = self.tokenize_prompt(prompt)
        import torch

        self._check_prompt_ids(ids)
        with contextlib.closing(self.score_chunks(ids)) as chunks:
            return torch.cat(list(chunks))

    def _check_prompt_ids(self, ids: list[int]) -> None:
        vocab = self.runner.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")

    def score_chunks(self, ids: list[int]):
        """Yield the logits [n, V] (fp32, CPU) of one prompt's positions a prefill chunk at a
        time, as a request's chunked prefill: each chunk of at most --max-num-batched-tokens
        reads the KV the earlier ones wrote to the paged cache; the blocks are freed at the end
        (or when the generator is closed)."""
        step = self.config.scheduler.max_num_batched_tokens
        if len(ids) > self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens is longer than --max-model-len {self.max_model_len}: "
                               f"prompt logprobs and scores need the whole prompt in the context")
        seq = Sequence("score", 0, ids, SamplingParams(max_tokens=1))
        bm = self.block_manager
        # running sequences make room as for a step (recomputed later): what else runs must not
        # decide whether a prompt can be scored
        if not self.scheduler.make_room(bm.blocks_needed(seq, len(ids))):
            raise RequestError("not enough free KV blocks to score the prompt now (the sequences "
                               "holding them are in flight)")
        bm.allocate(seq, len(ids))  # no prefix hits: every position is computed
        seq.num_computed_tokens = 0
        try:
            while seq.num_computed_tokens < len(ids):
                n = min(step, len(ids) - seq.num_computed_tokens)
                logits = self.runner.all_logits(seq, n)
                seq.num_computed_tokens += n
                yield logits
        finally:
            bm.free_seq(seq)

    def prompt_logprobs(self, ids: list[int], k: int) -> list[Optional[dict[int, Logprob]]]:
        """vLLM's prompt_logprobs: None for the first token, then each token's logprob (and the
        k most likely) given the tokens before it, from one extra (chunked) prefill of the
        prompt; only those k of each chunk's rows are kept."""
        rows = []
        with contextlib.closing(self.score_chunks(ids)) as chunks:
            for logits in chunks:
                rows += chunk_logprobs(ids, len(rows), logits, k)
        return self.prompt_logprob_entries(ids, rows)

    def prompt_logprob_entries(self, ids: list[int], rows: list) -> list[Optional[dict[int, Logprob]]]:
        """The prompt logprobs of `ids` from each token's `chunk_logprobs` row (from the second)."""
        special = self.tokenizer.special_ids if self.tokenizer else frozenset()
        text_before = [False] + list(itertools.accumulate((t not in special for t in ids[:-1]), operator.or_))
        return [None] + [self._logprob_entry(t, lp, at_start=not text_before[i])
                         for i, (t, lp) in enumerate(zip(ids[1:], rows), start=1)]

    def grammar_compiler(self):
        """The structured-output compiler for this model's tokenizer (built on first use)."""
        if getattr(self, "_grammar_compiler", None) is None:
            from deepserve.engine.grammar import GrammarCompiler
            if self.tokenizer is None:
                raise RequestError("structured outputs need a model with a tokenizer")
            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.runner.vocab_size, self.eos_token_ids)
        return self._grammar_compiler

    def wake(self) -> None:
        """End a step's wait for outputs from other processes (a front end of engine cores:
        engine/dp_engine.py); this engine's steps never wait on anyone."""

    def has_unfinished_requests(self) -> bool:
        """Requests not finished, or pipeline micro-batches still to finish (those of aborted
        requests, whose steps drain them)."""
        return bool(self.requests) or bool(self.micro_batches) or bool(self._settled)

    def gauges(self) -> dict:
        """What the server reports: requests running / waiting, KV use, prefix-cache counters."""
        sched, bm = self.scheduler, self.block_manager
        return {
            "num_requests_running": len({s.request_id for s in sched.running}),
            "num_requests_waiting": len({s.request_id for s in sched.waiting}),
            "num_preemptions": sched.num_preemptions,
            "kv_cache_usage": bm.usage(),
            "num_free_blocks": bm.num_free_blocks,
            "num_blocks": bm.num_blocks,
            "kv_cache_capacity_tokens": bm.num_blocks * bm.block_size,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            **sched.step_tokens.gauges(),
            **(self.spec.stats.counters() if self.spec is not None else {}),
            **({"pp_most_micro_batches_in_flight": self.micro_batches.most_in_flight}
               if self.micro_batches is not None else {}),
            **self.runner.ops.call_totals(),  # this rank's counted op calls, all and as Triton kernels
            **(self.ops_profiler.gauges() if self.ops_profiler is not None else {}),
            **self.stats,
        }

    def rank_gauges(self) -> list[dict]:
        """gauges() of each DP rank, in rank order (/metrics' per-engine series); one here."""
        return [self.gauges()]

    def engine_index(self, request_id: str) -> int:
        """The DP rank that serves the request (/metrics' `engine` label): 0, the only one here."""
        return 0

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's: forget every cached prefix block (in every DP rank's engine core, where they
        run apart); True when done. While a request holds KV blocks: False, nothing changed,
        unless `reset_running_requests`, which first preempts the running requests (they wait
        and recompute their KV later, as after a step short of blocks). KV connectors are not
        supported."""
        if reset_connector:
            raise NotImplementedError("reset_connector is not supported: deepserve has no KV connector")
        return self._reset_cached_blocks(reset_running_requests)

    def _reset_cached_blocks(self, preempt_running: bool = False) -> bool:
        if preempt_running:
            # a micro-batch in flight holds its sequences' blocks: finish them first (their
            # outputs come with the next step), so that every running sequence can be preempted
            while self.micro_batches is not None and self.micro_batches.in_flight:
                self._settled += self.micro_batches.finish_oldest(self)
            self.scheduler.make_room(self.block_manager.num_blocks)   # a step in flight keeps its rows
        return self.block_manager.reset_prefix_cache()

    def take_settled(self) -> list[RequestOutput]:
        """The outputs of the micro-batches that a reset_prefix_cache finished, once."""
        outputs, self._settled = self._settled, []
        return outputs

    def get_metrics(self) -> list:
        """vLLM's: gauges() as vLLM's metric records (Gauge, Counter, Vector of
        engine/metrics_reader.py) under vLLM's names: running / waiting requests, KV cache usage,
        preemptions, prompt / generation tokens, prefix-cache queries / hits, speculative
        decoding's counters. No latency histograms: those are the API server's (/metrics)."""
        from deepserve.engine.metrics_reader import metrics_snapshot
        return metrics_snapshot(self.gauges(), served_names(self.args)[0])

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (its folder holds none)")
        return self.tokenizer

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def is_sleeping(self) -> bool:
        return False   # sleep mode is not supported

    def sleep(self, level: int = 1, mode: str = "abort"):
        raise NotImplementedError("sleep mode is not supported: deepserve keeps the weights and KV cache on the "
                                  "device until shutdown()")

    def wake_up(self, tags: Optional[list[str]] = None):
        raise NotImplementedError("sleep mode is not supported (wake_up): deepserve keeps the weights and KV cache "
                                  "on the device until shutdown()")

    def collective_rpc(self, method, timeout: Optional[float] = None, args: tuple = (), kwargs: Optional[dict] = None):
        raise NotImplementedError("collective_rpc is not supported: deepserve's workers take no calls from outside "
                                  "the engine")

    def apply_model(self, func):
        raise NotImplementedError("apply_model is not supported: deepserve's workers take no calls from outside "
                                  "the engine")

    def _lora(self, *args, **kwargs):
        raise NotImplementedError("LoRA adapters are not supported")

    add_lora = remove_lora = list_loras = pin_lora = _lora

    # ------------------------------------------------------------------ profiler
    def start_profile(self, profile_prefix: Optional[str] = None) -> None:
        """vLLM's start_profile: record the steps from now on in every rank (--profiler-config)."""
        self._check_profiler()
        self.profiler.start(profile_prefix)

    def stop_profile(self) -> None:
        """vLLM's stop_profile: returns once every rank has written its trace."""
        self._check_profiler()
        self.profiler.stop()

    def _check_profiler(self) -> None:
        if self.config.profiler is None:
            raise RuntimeError("profiling is not enabled: start the engine with profiler_config "
                               "(--profiler-config '{\"profiler\": \"torch\", \"torch_profiler_dir\": \"/abs/dir\"}')")

    def profile_step(self, batch: Optional[ScheduledBatch]):
        """The profiler's range around one step's forward (vLLM's per-step annotation)."""
        if self.profiler is None or not batch:
            return contextlib.nullcontext()
        return self.profiler.step(batch.seqs, batch.num_new_tokens)

    def shutdown(self) -> None:
        """Stop worker processes and free the process groups (multi-process layouts); another
        engine can start in this process afterwards."""
        if getattr(self, "ops_profiler", None) is not None:
            self.ops_profiler.close()
        if self.profiler is not None and self.profiler.active and not self.executor.failure:
            try:   # profiling still: the traces are written, as vLLM's shutdown does
                self.profiler.stop()
            except (OSError, RuntimeError) as exc:
                logger.warning("profiler: the traces were not written at shutdown: %s", exc)
        self._finalizer()
        # the driver's weights, KV pool and graphs go now, though this engine may still be
        # referenced (a later engine in the process then has the memory); an engine dropped
        # without shutdown() frees them with its last reference
        self.runner.release()
        self.shut_down = True

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        if self._settled:
            return self.take_settled()
        if self.micro_batches is not None:
            try:
                return self.micro_batches.step(self)
            except RuntimeError as exc:  # a collective broke: name the worker behind it
                raise RuntimeError(self.executor.explain(exc)) from exc
        if self.async_scheduling:
            return self._step_async()
        batch = self.scheduler.schedule()
        return self._run_sync(batch) if batch else []

    def _run_sync(self, batch) -> list[RequestOutput]:
        """Run one scheduled step and wait for its tokens."""
        if self.ops_profiler is not None:
            self.ops_profiler.tick(self.stats["steps"])
        with self.profile_step(batch):
            if self.spec is not None:
                return run_speculative_step(self, batch)
            try:
                seqs, sampled = self.runner.execute(batch)
            except RuntimeError as exc:  # a collective broke: name the worker behind it
                raise RuntimeError(self.executor.explain(exc)) from exc
        self.stats["steps"] += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
        return self._postprocess(seqs, sampled)

    # ------------------------------------------------------------------ async scheduling
    def _step_async(self, batch: Optional[ScheduledBatch] = None) -> list[RequestOutput]:
        """Schedule and launch this step, then read the previous step's tokens while the
        device runs it. A sequence sampled by the previous step counts its pending token
        (Sequence.num_pending), so it is scheduled as a decode whose input id the runner takes
        on the device. A sequence that the previous step's token finishes has been launched
        once more: that row's result is dropped (its blocks are freed; later steps that reuse
        them run after it on the same stream). Steps that need the host's token history
        (logprobs, penalties, min_tokens) run synchronously, after the previous tokens land,
        and so do speculative steps that draft (`needs_sync_step`: the next step's positions
        depend on how many drafts this one accepts, and n-gram drafts read the last token).
        `batch`: already scheduled (a DP engine core schedules before the DP ranks agree)."""
        if self.ops_profiler is not None:
            self.ops_profiler.tick(self.stats["steps"])
        prev, self._inflight = self._inflight, None
        batch = self.scheduler.schedule() if batch is None else batch
        launched = None
        if batch and all(self._async_ok(seq) for seq in batch.seqs) and not needs_sync_step(self.spec, batch):
            with self.profile_step(batch):
                launched = self.runner.launch(batch, prev)
            self.stats["steps"] += 1
            for seq, n in zip(batch.seqs, batch.num_new_tokens):
                seq.num_computed_tokens += n
            for seq in launched.seqs:
                seq.num_pending += 1
        outputs = self._resolve(prev) if prev is not None else []
        if launched is not None:
            for seq in batch.seqs:
                if not seq.is_finished:  # token ids are all on the host now: hash full blocks
                    self.block_manager.register_full_blocks(seq)
            self._inflight = launched
        elif batch:
            # synchronous step, less what the previous tokens just finished
            batch = batch.without_finished()
            if batch:
                outputs += self._run_sync(batch)
        return outputs

    @staticmethod
    def _async_ok(seq: Sequence) -> bool:
        return not seq.params.needs_host_history

    def _resolve(self, inflight) -> list[RequestOutput]:
        """The launched step's tokens, now on the host: append, detokenize, check stops."""
        tokens = inflight.token_ids()
        for seq in inflight.seqs:
            seq.num_pending = max(0, seq.num_pending - 1)
        outputs = self._postprocess(inflight.seqs, SamplerOutput(tokens, [None] * len(tokens)))
        for seq in inflight.seqs:
            if seq.is_finished:
                seq.num_pending = 0  # a step launched after this token computes a row we drop
        return outputs

    def _postprocess(self, seqs: list[Sequence], sampled) -> list[RequestOutput]:
        touched: dict[str, RequestState] = {}
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(seqs, sampled.token_ids)):
            state = self.requests.get(seq.request_id)
            if state is None or seq.is_finished:
                continue
            seq.token_ids.append(token)
            self.stats["generation_tokens"] += 1
            if state.first_token_time is None:
                state.first_token_time = now
            state.last_token_time = now
            lp = sampled.logprobs[i]
            if lp is not None:
                self._record_logprobs(seq, token, lp)
            self._detokenize_and_check_stop(state, seq, token)
            touched[seq.request_id] = state
        outputs = []
        for rid, state in touched.items():
            outputs.append(self.output_of(state))
            if state.finished:
                del self.requests[rid]
        return outputs

    def _logprob_entry(self, token: int, lp, at_start: bool = False) -> dict[int, Logprob]:
        """The logprob entry of one position; `at_start`: no text before it (the tokens'
        texts as a text's first token decodes)."""
        chosen, rank, top = lp
        text = (lambda t: self.tokenizer.token_text(t, at_start)) if self.tokenizer else str
        entry = {token: Logprob(chosen, rank, text(token))}
        for r, (tid, val, *own_rank) in enumerate(top, start=1):   # logprob_token_ids' come with their ranks
            entry.setdefault(tid, Logprob(val, own_rank[0] if own_rank else r, text(tid)))
        return entry

    def _record_logprobs(self, seq: Sequence, token: int, lp) -> None:
        seq.logprobs.append(self._logprob_entry(token, lp))
        seq.cumulative_logprob += lp[0]

    def _detokenize_and_check_stop(self, state: RequestState, seq: Sequence, token: int) -> None:
        p = seq.params
        idx = seq.index
        detok = state.detoks[idx]
        eos = token in self.eos_token_ids and not p.ignore_eos
        stop_token = seq.num_output_tokens >= p.min_tokens and (eos or token in p.stop_token_ids)
        # as vLLM: the text leaves out the EOS or stop token that ends it (its id and logprob stay)
        # unless include_stop_str_in_output
        if detok is not None and (p.include_stop_str_in_output or not stop_token):
            before = len(state.texts[idx])
            state.texts[idx] += detok.add(token)
            text = state.texts[idx]
            # as vLLM: stop strings count from the token after min_tokens on (in its text and the
            # stop string's length before it), as EOS and stop_token_ids do
            for stop in (p.stop if seq.num_output_tokens > p.min_tokens else ()):
                pos = text.find(stop, max(0, before - len(stop) + 1))
                if pos >= 0:
                    state.texts[idx] = text[:pos + len(stop)] if p.include_stop_str_in_output else text[:pos]
                    seq.stop_reason = stop
                    self.scheduler.finish(seq, "stop")
                    return
        if stop_token:
            if not eos:   # vLLM's stop_reason: the stop token's id, None for EOS
                seq.stop_reason = token
            self.scheduler.finish(seq, "stop")
            return
        if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self.scheduler.finish(seq, "length")


def sum_gauges(ranks: list[dict]) -> dict:
    """DP ranks' gauges as one engine's: counts summed, KV use over all their blocks."""
    total: dict = {}
    for g in ranks:
        for k, v in g.items():
            total[k] = total.get(k, 0) + v
    blocks = total.get("num_blocks", 0)
    total["kv_cache_usage"] = 1.0 - total.get("num_free_blocks", 0) / blocks if blocks else 0.0
    return total
