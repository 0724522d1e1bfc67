"""The model runner: the model, its KV cache pool and CUDA graphs, and one forward from
typed step inputs (engine/step_inputs.py). Jobs build on this core: `DriverRunner`
(engine/driver_runner.py) turns scheduled batches into step inputs, publishes them to the
other ranks and samples; `WorkerRunner` (here) runs what its driver publishes; a pipeline
stage's send/recv lives in engine/pipeline.py.

The pool is one preallocated tensor per cache of each attention layer, sized at start: on
GPU from free memory x gpu_memory_utilization after a profiling forward at the largest
batch and the sampling of its logits, less an estimate of what the CUDA graphs captured
after it will hold (their memory is logged after capture beside the estimate, and a sizable
part they did not take goes back to the pool, engine/graph_memory.py); on CPU from
`kv_cache_memory_bytes` (default 1 GiB), never beyond what `max_num_seqs` full-length
sequences could use.

With DP attention + expert parallel, decode steps run as CUDA graphs when every DP rank's
batch is decode-only: all ranks replay the graph sized for the largest one (`graph_size`,
agreed before the step), as the MoE exchange inside needs equal shapes (not with
`--all2all-backend alltoall`, whose per-step split sizes cannot be captured); their other
steps run eagerly, since piecewise graphs (cudagraph_mode PIECEWISE / FULL_AND_PIECEWISE,
engine/piecewise_graphs.py) would need the DP ranks to agree on their size too.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from deepserve.config import EngineConfig
from deepserve.distributed.parallel_state import ParallelContext, control_group
from deepserve.engine.graph_memory import (GraphPlan, estimate_graph_bytes, graph_plan, graphs_line, grown_blocks,
                                           grown_line, kept_row_bytes, kv_budget, overrun_warning,
                                           unused_estimate)
from deepserve.engine.input_staging import InputStaging, to_device_async
from deepserve.engine.mtp_proposer import MTPProposer
from deepserve.engine.piecewise_graphs import splittable
from deepserve.engine.pipeline import PipelineStage
from deepserve.engine.step_inputs import MTPStepMessage, StepInputs, StepMessage
from deepserve.engine.warm_up import WATCH, profile_inputs
from deepserve.layers.attention import AttentionMetadata
from deepserve.layers.mla import MLAAttention, prefill_gather_arrays, set_prefill_gather
from deepserve.models.loader import load_model
from deepserve.ops import OpTable
from deepserve.ops.registry import check_backend_runs_on
from deepserve.distributed.plan_bytes import Layout, weight_breakdown
from deepserve.platforms import Platform
from deepserve.quant.ignore import checkpoint_ignore

logger = logging.getLogger("deepserve")


def held_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds in memory (a tied weight once, meta ones not)."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")


def planned_weight_text(config: EngineConfig, pctx: ParallelContext, quantization: Optional[str],
                        dtype: torch.dtype) -> str:
    """What `deepserve plan` counts for this rank's weights, for the start-up log beside the
    bytes the engine allocated."""
    par = config.parallel
    layout = Layout(par.tensor_parallel_size, par.pipeline_parallel_size, par.data_parallel_size,
                    par.enable_expert_parallel)
    try:
        hf = config.model.hf_config
        stages = weight_breakdown(hf, layout, str(dtype).replace("torch.", ""), quantization,
                                  ignored=checkpoint_ignore(hf))
    except (ValueError, KeyError) as exc:
        return f"no plan arithmetic for it ({exc})"
    return f"{_bytes(sum(stages[pctx.pp_rank].values()))} planned"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB ({n:,} bytes)"

CPU_DEFAULT_KV_BYTES = 1 << 30


class ModelRunner:
    """The shared core of every rank: model, KV pool, CUDA graphs, and one forward from typed
    step inputs. `DriverRunner` (engine/driver_runner.py) adds batching and sampling."""

    def __init__(self, config: EngineConfig, platform: Platform, pctx: Optional[ParallelContext] = None,
                 local_rank: int = 0):
        self.config = config
        self.platform = platform
        self.device = platform.device(local_rank)
        # this model's op functions, resolved once (DESIGN invariant 6)
        check_backend_runs_on(platform.name, config.ops)
        self.ops = OpTable(platform.default_ops if config.ops == "auto" else config.ops)
        self.timings: dict[str, float] = {}
        torch.manual_seed(config.model.seed)
        if self.device.type == "cuda":
            WATCH.install()    # counts Triton's compiles; logs those after the warm-up (engine/warm_up.py)

        t0 = time.perf_counter()
        self.pctx = pctx or ParallelContext()
        self.model = load_model(config.model, self.device, self.pctx, self.ops)
        self.timings["load_s"] = time.perf_counter() - t0
        self.weight_bytes = held_weight_bytes(self.model)
        logger.info("weights on this rank: %s allocated, %s", _bytes(self.weight_bytes),
                    planned_weight_text(config, self.pctx, getattr(self.model, "quantization", None),
                                        next(self.model.parameters()).dtype))
        self.dtype = next(self.model.parameters()).dtype
        named = config.cache.kv_cache_dtype
        if named in ("bfloat16", "float16") and getattr(torch, named) != self.dtype:
            held = str(self.dtype).replace("torch.", "")
            raise ValueError(f"--kv-cache-dtype {named} names the model's own dtype, and this model runs in "
                             f"{held}: pass --dtype {named} too, or --kv-cache-dtype auto")
        # e4m3 KV (the layers' checkpoint scales, 1.0 without): written by the KV-write ops, read
        # by the attention kernels
        self.kv_dtype = torch.float8_e4m3fn if config.cache.fp8_kv else self.dtype
        if (config.model.hf_config.get("quantization_config") or {}).get("kv_cache_scheme") and not config.cache.fp8_kv:
            logger.warning("the checkpoint's quantization_config has a kv_cache_scheme (fp8 KV cache scales) and the "
                           "KV cache holds %s: pass --kv-cache-dtype fp8 to store it in fp8 with those scales (as vLLM "
                           "does unasked outside MLA models)", str(self.dtype).replace("torch.", ""))
        self.block_size = config.cache.block_size
        # the attention layers this rank holds (a pipeline stage holds a range of them)
        self.kv_layers = [m for m in self.model.modules() if hasattr(m, "kv_cache_shapes")
                          and all(p.device.type != "meta" for p in m.parameters())]
        if self.pctx.pp_size > 1:
            held = {id(m) for i in self.model.pp_layers for m in self.model.model.layers[i].modules()}
            self.kv_layers = [m for m in self.kv_layers if id(m) in held]
        self.mla_layers = any(isinstance(m, MLAAttention) for m in self.kv_layers)
        self.vocab_size = config.model.hf_config.vocab_size
        self.pipeline = PipelineStage(self) if self.pctx.pp_size > 1 else None
        # speculative decoding with mtp: the model's first MTP layer drafts on every rank (its
        # layers sharded like the target's), from the hidden states a verify step keeps
        spec = config.speculative
        self.mtp = (MTPProposer(self.model.mtp[0], spec.num_speculative_tokens, self.block_size,
                                config.scheduler.max_model_len)
                    if spec is not None and spec.method == "mtp" else None)
        self.hidden: Optional[torch.Tensor] = None
        self.mtp_forwards = 0   # MTP forwards since the last verify step (DP + EP: each DP rank runs k)

        # the CUDA graphs this rank captures after the pool: an estimate of their memory is kept
        # out of it (engine/graph_memory.py)
        self.graph_plan = graph_plan(config, self.device.type, self.ops.backend, self.pctx.pp_size,
                                     self.pctx.moe_dp_exchange, splittable(self.model), self.pctx.pp_rank)
        self.graph_estimate: Optional[int] = None   # bytes kept from the pool (None: the user sized it)
        t0 = time.perf_counter()
        self.staging = InputStaging(self.device)
        self.num_blocks = self._min_over_ranks(self._decide_num_blocks())   # every rank's pool the same size
        self.timings["profile_s"] = time.perf_counter() - t0
        self._allocate_kv_cache(self.num_blocks)
        self.graphs = None
        self.piecewise = None   # a PiecewiseGraphs (engine/piecewise_graphs.py) for the other steps
        self._count_op_calls()
        reserved_before = self._reserved_after_empty_cache()
        t0 = time.perf_counter()
        if self._capture_whole_graphs() | self._capture_piecewise_graphs():
            self.timings["cuda_graph_s"] = time.perf_counter() - t0
        captured = self._captured_graphs()
        taken = self._reserved_after_empty_cache() - reserved_before
        if captured.num_sizes:
            logger.info("%s", graphs_line(captured, self.timings["cuda_graph_s"], taken, self.graph_estimate))
        if self.graph_estimate is not None:
            if (overrun := overrun_warning(self.graph_estimate, taken)) is not None:
                logger.warning("%s", overrun)
            self._give_back_unused_estimate(taken)
        if (self.device.type == "cuda" and not config.enforce_eager
                and config.cudagraph_mode in ("PIECEWISE", "FULL_AND_PIECEWISE")):
            from deepserve.engine.piecewise_graphs import layout_reason
            reason = layout_reason(self.pctx.pp_size, self.pctx.moe_dp_exchange)
            if reason:
                logger.info("piecewise CUDA graphs off: %s; prefill and mixed steps run eagerly", reason)
        logger.info("model %s on %s (%s, ops=%s, %.0f%% of a counted step's op calls ran as Triton kernels): "
                    "%d KV blocks of %d tokens (%d tokens in %s); %s", config.model.architecture, self.device,
                    self.dtype, self.ops.name, 100 * self.ops.triton_share(), self.num_blocks, self.block_size,
                    self.num_blocks * self.block_size, str(self.kv_dtype).replace("torch.", ""),
                    ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))
        # vLLM's two lines, which operators grep for: requests of max_model_len tokens the pool holds at once;
        # once an engine (DP rank), as vLLM's engine core writes them, since its ranks' pools are one size
        if self.pctx.tp_rank == 0 and self.pctx.pp_rank == 0:
            max_len = config.scheduler.max_model_len
            concurrency = self.num_blocks / math.ceil(max_len / self.block_size)
            logger.info("GPU KV cache size: %s tokens", f"{int(concurrency * max_len):,}")
            logger.info("Maximum concurrency for %s tokens per request: %.2fx", f"{max_len:,}", concurrency)

    # ------------------------------------------------------------------ CUDA graphs
    def _capture_whole_graphs(self) -> bool:
        """Capture the whole decode graphs this layout runs (engine/graph_memory.graph_plan says
        which) over the current pool; False where it runs none."""
        config, p = self.config, self.pctx
        if self.device.type != "cuda" or config.enforce_eager or config.cudagraph_mode == "PIECEWISE":
            return False
        if p.pp_size > 1:
            if p.moe_dp_exchange:
                return False
            # each pipeline stage replays whole graphs of its own part for decode steps (DP x EP x
            # PP, and piecewise graphs, run eagerly)
            from deepserve.engine.pipeline_graphs import StageGraphRunner
            self.graphs = StageGraphRunner(self, config.cuda_graph_sizes)
            return True
        if p.moe_dp_exchange and p.all2all_backend == "alltoall":
            return False
        from deepserve.engine.cuda_graphs import CudaGraphRunner
        self.graphs = CudaGraphRunner(self, config.cuda_graph_sizes)
        if self.mtp is not None and self.graphs.enabled and not p.moe_dp_exchange:
            from deepserve.engine.cuda_graphs import MTPGraphRunner
            self.mtp.graphs = MTPGraphRunner(self, config.cuda_graph_sizes)
        return True

    def _capture_piecewise_graphs(self) -> bool:
        """Capture the piecewise graphs of prefill and mixed steps where this layout runs them;
        False where it does not."""
        config, p = self.config, self.pctx
        if (self.device.type != "cuda" or config.enforce_eager or p.pp_size > 1 or p.moe_dp_exchange
                or config.cudagraph_mode not in ("PIECEWISE", "FULL_AND_PIECEWISE")):
            return False
        from deepserve.engine.piecewise_graphs import capture_for
        self.piecewise = capture_for(self.model, self.ops, config.piecewise_max_tokens, self.device)
        return True

    def _captured_graphs(self) -> GraphPlan:
        """The sizes actually captured (a capture that failed leaves its steps eager)."""
        whole = self.graphs is not None and self.graphs.enabled
        mtp = self.mtp.graphs if self.mtp is not None else None
        return GraphPlan(sorted(self.graphs.graphs) if whole else [],
                         sorted(mtp.graphs) if mtp is not None and mtp.enabled else [],
                         list(self.piecewise.sizes) if self.piecewise is not None else [],
                         self.graph_plan.last_stage)

    def release(self) -> None:
        """Free this rank's device memory at shutdown: CUDA graphs (with their memory pools),
        the KV pool, the model's weights, the staging buffers; and let go of the process
        groups (each holds the rendezvous store, whose listening port stays open while any
        group is referenced). The runner runs no step after."""
        self.piecewise = self.pipeline = None
        self._drop_pool(graphs=True)
        self.mtp = None
        self.kv_layers = []
        self.model = None
        self.hidden = None
        self.staging = None
        self.pctx = dataclasses.replace(self.pctx, tp_group=None, ep_group=None, dp_group=None)
        gc.collect()
        self._reserved_after_empty_cache()

    def _drop_pool(self, graphs: bool) -> None:
        """Free the KV pool and, with `graphs`, the whole decode graphs that hold its addresses
        (with their memory pools), and give the freed memory back to the device."""
        if graphs:
            self.graphs = None
            if self.mtp is not None:
                self.mtp.graphs = None
        for m in self.kv_layers:
            m.kv_cache = []
        gc.collect()
        self._reserved_after_empty_cache()

    def _give_back_unused_estimate(self, taken: int) -> None:
        """Grow the pool by the part of the graph estimate the graphs did not take (`taken`:
        their measured bytes), where big enough (graph_memory.unused_estimate) and more blocks
        are of use. The pool is allocated anew, bigger, and the whole decode graphs, which hold
        its addresses, are captured again over it. Every rank grows by the same number of
        blocks, and only where all captured the same kinds of whole graphs (a capture again
        runs the collectives inside them on every rank)."""
        unused = unused_estimate(self.graph_estimate, taken)
        blocks = grown_blocks(self.num_blocks, unused, self.bytes_per_block(), self._max_useful_blocks())
        mtp = self.mtp.graphs if self.mtp is not None else None
        kinds = (int(self.graphs is not None and self.graphs.enabled)
                 + 2 * int(mtp is not None and mtp.enabled))
        blocks, low_kinds, neg_high_kinds = self._min_over_ranks(blocks, kinds, -kinds)
        if blocks <= self.num_blocks or low_kinds != -neg_high_kinds:
            return
        self._drop_pool(graphs=bool(kinds))   # the graphs over the old pool go before it
        old, self.num_blocks = self.num_blocks, blocks
        self._allocate_kv_cache(blocks)
        seconds = None
        if kinds:
            t0 = time.perf_counter()
            self._capture_whole_graphs()
            seconds = time.perf_counter() - t0
            self.timings["cuda_graph_s"] = self.timings.get("cuda_graph_s", 0.0) + seconds
        logger.info("%s", grown_line(old, blocks, self.graph_estimate, taken, seconds))

    def _min_over_ranks(self, *values: int):
        """The smallest of each value over every rank of the engine (all ranks call it
        together); the value itself with one rank. One value -> an int, several -> a tuple."""
        if self.config.parallel.world_size > 1:   # (not dist.is_initialized(): another engine may hold a group)
            t = torch.tensor(values, dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=control_group())
            values = tuple(int(v) for v in t.tolist())
        return values[0] if len(values) == 1 else tuple(values)

    # ------------------------------------------------------------------ KV cache
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return sum(math.prod(s) * elem for m in self.kv_layers for s in m.kv_cache_shapes(self.block_size))

    def _reserved_after_empty_cache(self) -> int:
        """Device memory this process's allocator holds once its unused cache is released
        (graph pools stay held: what the graphs take is the change of this over capture)."""
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        for m in self.kv_layers:
            m.kv_cache = [torch.zeros(num_blocks, *s, dtype=self.kv_dtype, device=self.device)
                          for s in m.kv_cache_shapes(self.block_size)]

    def _max_useful_blocks(self) -> int:
        sc = self.config.scheduler
        return sc.max_num_seqs * math.ceil(sc.max_model_len / self.block_size) + 1

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override
        per_block = self.bytes_per_block()
        if cache.kv_cache_memory_bytes:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cpu":
            budget = CPU_DEFAULT_KV_BYTES
        else:
            budget = self._profile_free_memory()
        blocks = min(budget // per_block, self._max_useful_blocks())
        if blocks < 1:
            raise ValueError(f"no room for one KV block ({budget / 2**20:.2f} MiB for the KV cache, "
                             f"{per_block / 2**20:.2f} MiB a block of {self.block_size} tokens): "
                             f"{self.more_kv_cache_hint()}")
        return int(blocks)

    def more_kv_cache_hint(self) -> str:
        """How to give the KV cache more room, by what sized it."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override:
            return "raise --num-gpu-blocks-override"
        if cache.kv_cache_memory_bytes:
            return "raise --kv-cache-memory-bytes"
        if self.device.type == "cpu":
            return "give --kv-cache-memory-bytes"
        return "lower --max-num-batched-tokens or raise --gpu-memory-utilization"

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Run the largest batch once on a scratch cache and sample from its logits (the
        sampler's temporaries over max_num_seqs x (1 + k) rows of the vocabulary can outgrow
        the activations); the KV pool gets what is left."""
        sc, spec = self.config.scheduler, self.config.speculative
        drafts = spec.num_speculative_tokens if spec is not None else 0
        inputs, scratch_blocks = profile_inputs(sc.max_num_batched_tokens, sc.max_num_seqs, sc.max_model_len,
                                                self.block_size, sc.max_num_seqs * (1 + drafts))
        self._allocate_kv_cache(scratch_blocks)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids, positions, meta = self.to_device(inputs)
        if self.pctx.pp_size > 1:  # every stage profiles at once, through the pipeline
            logits = self.pipeline.forward(ids, positions, meta)
        else:
            logits = self.model.compute_logits(self.model(ids, positions, meta)[meta.logits_indices])
        torch.cuda.synchronize(self.device)
        forward_peak = torch.cuda.max_memory_allocated(self.device)
        # sampling from these logits after the forward: its [rows, vocab] temporaries join the
        # peak the pool is sized by (not the activations the graph estimate scales)
        self._profile_sampling(logits, drafts)
        del logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for m in self.kv_layers:
            m.kv_cache = []
        torch.cuda.empty_cache()
        hf = self.config.model.hf_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        self.graph_estimate = estimate_graph_bytes(self.graph_plan, forward_peak - before, len(inputs.ids),
                                                   kept_row_bytes(self.graph_plan, self.vocab_size,
                                                                  int(hf.hidden_size), elem))
        free, total = self.platform.memory_info(self.device)
        return kv_budget(total, self.config.cache.gpu_memory_utilization, peak, free,
                         torch.cuda.memory_reserved(self.device), self.graph_estimate)

    def _profile_sampling(self, logits: Optional[torch.Tensor], drafts: int) -> None:
        """Sample from the profile run's logits as the heaviest served step may (the driver's
        job: `DriverRunner`); a worker rank samples nothing."""

    @torch.inference_mode()
    def _count_op_calls(self) -> None:
        """One step counted through the op table (`ops.call_totals`: the start-up log and
        /metrics): a decode row and a 3-token prompt chunk, the two paths of a mixed step. It
        writes no cache slot; every rank runs it (TP, PP and the MoE exchange need them all)."""
        chunk = min(3, self.config.scheduler.max_model_len)
        seq_lens = [min(2, chunk), chunk]
        table = [b % self.num_blocks for b in range(math.ceil(chunk / self.block_size))]
        positions = np.concatenate([np.arange(seq_lens[0] - 1, seq_lens[0]), np.arange(chunk)])
        inputs = StepInputs(ids=[0] * (1 + chunk), positions=positions, slots=np.full(1 + chunk, -1),
                            q_lens=[1, chunk], seq_lens=seq_lens, tables=[table, table],
                            logits_rows=[0, chunk], num_decodes=1)
        with self.ops.counting():
            self.forward_logits(*self.to_device(inputs))

    # ------------------------------------------------------------------ one forward
    def to_device(self, h: StepInputs):
        """Step inputs -> (input ids, positions, attention metadata) on the device, in two
        packed transfers (engine/input_staging.py)."""
        qsl = np.zeros(len(h.q_lens) + 1, dtype=np.int64)
        np.cumsum(h.q_lens, out=qsl[1:])
        tables = np.asarray(h.tables, dtype=np.int32)
        first = h.num_decodes
        # with prompt rows: their query starts from 0 and MLA's prefill gather (the same for every
        # layer), built here and sent with the rest instead of by launches in the first layer
        prompts = first < len(h.q_lens)
        gather = (prefill_gather_arrays(h.seq_lens[first:], tables[first:], self.block_size)
                  if self.mla_layers and prompts else ())
        starts = (qsl[first:] - qsl[first],) if prompts else ()
        (ids, positions, slots, rows, *g_blocks), (qsl_t, seq_lens, tables_t, *extra) = self.staging.copy(
            (h.ids, h.positions, h.slots, h.logits_rows, *gather[:1]), (qsl, h.seq_lens, tables, *starts, *gather[1:]))
        meta = AttentionMetadata(
            query_start_loc=qsl_t, seq_lens=seq_lens, block_tables=tables_t.view(tables.shape),
            slot_mapping=slots, logits_indices=rows, max_query_len=max(h.q_lens),
            max_seq_len=int(max(h.seq_lens)), num_decodes=first, seq_lens_host=h.seq_lens,
            prefill_starts=extra[0] if prompts else None)
        if gather:
            _, g_tables, g_valid = extra
            set_prefill_gather(meta, first, self.block_size, g_blocks[0], g_tables.view(gather[1].shape), g_valid)
        return ids, positions, meta

    @torch.inference_mode()
    def forward_logits(self, input_ids, positions, meta: AttentionMetadata,
                       dp_num_tokens: Optional[list[int]] = None, graph_size: int = 0,
                       keep_hidden: bool = False) -> Optional[torch.Tensor]:
        """Logits of the rows in meta.logits_indices (with pipeline parallel: on the first
        stage's first TP rank; None on the other ranks).
        `dp_num_tokens`: every DP rank's token count this step (DP attention + EP; the model
        gathers them when not given); `graph_size`: the CUDA graph every DP rank replays this
        step (0: eager), with DP + EP; `keep_hidden`: keep every row's hidden state in
        `self.hidden` for the MTP step that follows."""
        if self.pipeline is not None:
            return self.pipeline.forward(input_ids, positions, meta, dp_num_tokens)
        if self.graphs is not None and self.pctx.moe_dp_exchange:
            replay = graph_size
        else:
            replay = self.graphs is not None and self.graphs.can_run(meta)
        if replay:
            hidden, logits = self.graphs.run(input_ids, positions, meta, graph_size)
        elif self.piecewise is not None and self.piecewise.can_run(input_ids.shape[0]):
            hidden = self.piecewise.run(input_ids, positions, meta)
            logits = self.model.compute_logits(hidden[meta.logits_indices])
        else:
            extra = {"dp_num_tokens": dp_num_tokens} if self.pctx.moe_dp_exchange else {}
            hidden = self.model(input_ids, positions, meta, **extra)
            logits = self.model.compute_logits(hidden[meta.logits_indices])
        if keep_hidden:
            self.hidden, self.mtp_forwards = hidden, 0
        return logits

    def dp_graph_size(self, num_tokens: int, decode_only: bool, longest: int) -> int:
        """The CUDA graph size every DP rank replays this step (from the values all ranks
        agreed on: the largest batch, whether all are decode-only, the longest sequence), or 0."""
        g = self.graphs
        if g is None or not self.pctx.moe_dp_exchange:
            return 0
        return g.size_for(num_tokens) if g.fits(num_tokens, decode_only, longest) else 0

    def run_step(self, msg: StepMessage, device_inputs=None) -> Optional[torch.Tensor]:
        """Forward one published step; the logits of its sampled rows (None: not this stage).
        `device_inputs`: the step's (ids, positions, meta), already on the device (the driver's
        own under async scheduling)."""
        ids, positions, meta = device_inputs or self.to_device(msg.inputs)
        if msg.device_ids:
            self.share_ids(ids)
        return self.forward_logits(ids, positions, meta, dp_num_tokens=msg.dp_num_tokens,
                                   graph_size=msg.graph_size, keep_hidden=msg.keep_hidden)

    @torch.inference_mode()
    def run_mtp(self, msg: MTPStepMessage) -> Optional[torch.Tensor]:
        """The MTP module over a verify step's kept positions, fed by the hidden states that
        step kept -> draft ids [S, k] of the sequences that draft (None when none does: the
        module runs once, writing its KV). Every rank runs it on its shard; the logits are
        gathered over TP, so every rank drafts the same tokens. A dummy step (an idle DP rank's,
        DP + EP) runs the module once over one token that writes nothing."""
        ids, positions, meta = self.to_device(msg.inputs)
        drafting = bool(msg.inputs.logits_rows) and not msg.inputs.dummy
        self.mtp_forwards += self.mtp.k if drafting else 1
        if msg.inputs.dummy:
            self.mtp.mtp(ids, positions, torch.zeros(1, self.config.model.hf_config.hidden_size, dtype=self.dtype,
                                                     device=self.device), meta)
            return None
        rows = to_device_async(msg.target_rows, torch.int64, self.device)
        hidden, self.hidden = self.hidden[rows], None
        if not drafting:
            self.mtp.mtp(ids, positions, hidden, meta)
            return None
        return self.mtp.propose(hidden, ids, positions, meta, write_kv=not msg.warm_up)[0]

    def finish_sends(self) -> None:
        """Wait for this rank's pipeline sends and receives still in progress (before the
        process group goes)."""
        if self.pipeline is not None:
            self.pipeline.finish()

    def share_ids(self, ids: torch.Tensor) -> None:
        """The driver's input ids to its TP peers of the first pipeline stage (the stage that
        embeds them), in place: a device collective, no host sync."""
        p = self.pctx
        if p.tp_size > 1 and p.pp_rank == 0:
            dist.broadcast(ids, src=p.dp_rank * p.tp_size * p.pp_size, group=p.tp_group)


class WorkerRunner(ModelRunner):
    """A rank other than its DP rank's driver: runs each step its driver publishes."""

    warmed_up = False   # a warm-up step came: the compile watch logs from the first step after them

    @torch.inference_mode()
    def run_published(self, msg) -> None:
        if isinstance(msg, (StepMessage, MTPStepMessage)) and msg.warm_up:
            self.warmed_up = True
        elif self.warmed_up:
            WATCH.serving = True
        if isinstance(msg, MTPStepMessage):
            self.run_mtp(msg)
        else:
            self.run_step(msg)
