"""The model runner owns the model, the KV cache pool and the sampler, and runs one step:
flatten the scheduled sequences into one token batch, forward, sample.

The pool is one preallocated tensor per cache of each attention layer, sized at start: on
GPU from free memory x gpu_memory_utilization after a profiling forward at the largest
batch; on CPU from `kv_cache_memory_bytes` (default 1 GiB), never beyond what
`max_num_seqs` full-length sequences could use.

Data-parallel attention (data_parallel_size > 1): the driver gets one batch per DP rank
(`DataParallelBatch`), publishes all of their host inputs to every rank (each runs its own,
and the token counts tell MoE layers how to exchange tokens), and a DP rank with nothing to
do runs a one-token dummy batch (slot -1: no cache write, logits discarded), because MoE
layers are collective. The first TP rank of every other DP rank sends its sampled rows'
logits to the driver (point-to-point), which samples all rows in one call, so seeds and
penalties behave as with one rank. With pipeline parallel too, each DP rank is its own
pipeline and the MoE exchange runs between the same stage of every DP rank. Decode steps run as
CUDA graphs when every DP rank's batch
is decode-only: all ranks replay the graph sized for the largest one (`_dp_graph_size`), as
the MoE exchange inside needs equal shapes (not with `--all2all-backend alltoall`, whose
per-step split sizes cannot be captured).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from deepserve import ops
from deepserve.config import EngineConfig
from deepserve.distributed.parallel_state import ParallelContext, control_group
from deepserve.engine.input_staging import InputStaging, to_device_async
from deepserve.engine.sampler import Sampler, SamplerOutput
from deepserve.engine.scheduler import DataParallelBatch, ScheduledBatch
from deepserve.layers.attention import AttentionMetadata
from deepserve.models.loader import load_model
from deepserve.platforms import Platform

logger = logging.getLogger("deepserve")

CPU_DEFAULT_KV_BYTES = 1 << 30


class InFlight:
    """A launched step's sampled tokens: on the device at once (the next step's inputs may
    come from them), on the host once the copy started at launch has landed."""

    def __init__(self, seqs: list, next_ids: Optional[torch.Tensor]):
        self.seqs = seqs
        self.next_ids = next_ids
        self.row_of = {s.seq_id: i for i, s in enumerate(seqs)}
        self._host, self._done = next_ids, None
        if next_ids is not None and next_ids.device.type == "cuda":
            self._host = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
            self._host.copy_(next_ids, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()

    def token_ids(self) -> list[int]:
        if self.next_ids is None:
            return []
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


class ModelRunner:
    def __init__(self, config: EngineConfig, platform: Platform, pctx: Optional[ParallelContext] = None,
                 local_rank: int = 0, eos_token_ids: set[int] = frozenset()):
        self.config = config
        self.platform = platform
        self.device = platform.device(local_rank)
        backend = platform.default_ops if config.ops == "auto" else config.ops
        ops.set_backend(backend)
        self.timings: dict[str, float] = {}
        torch.manual_seed(config.model.seed)

        t0 = time.perf_counter()
        self.pctx = pctx or ParallelContext()
        self.model = load_model(config.model, self.device, self.pctx)
        self.timings["load_s"] = time.perf_counter() - t0
        self.dtype = next(self.model.parameters()).dtype
        self.block_size = config.cache.block_size
        # the attention layers this rank holds (a pipeline stage holds a range of them)
        self.kv_layers = [m for m in self.model.modules() if hasattr(m, "kv_cache_shapes")
                          and all(p.device.type != "meta" for p in m.parameters())]
        if self.pctx.pp_size > 1:
            held = {id(m) for i in self.model.pp_layers for m in self.model.model.layers[i].modules()}
            self.kv_layers = [m for m in self.kv_layers if id(m) in held]
        self.vocab_size = config.model.hf_config.vocab_size
        self.sampler = Sampler(set(eos_token_ids), self.vocab_size)

        t0 = time.perf_counter()
        self.num_blocks = self._decide_num_blocks()
        if config.parallel.world_size > 1:  # (not dist.is_initialized(): another engine may hold a group)
            # every rank must agree on the pool size: the smallest wins
            n = torch.tensor([self.num_blocks], dtype=torch.int64)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=control_group())
            self.num_blocks = int(n.item())
        self.timings["profile_s"] = time.perf_counter() - t0
        self._allocate_kv_cache(self.num_blocks)
        # set by a multi-process executor: sends each step's host inputs to the other ranks
        self.publish = lambda host: None
        self.staging = InputStaging(self.device)
        self.graphs = None
        dynamic_exchange = self.pctx.moe_dp_exchange and self.pctx.all2all_backend == "alltoall"
        if (self.device.type == "cuda" and not config.enforce_eager and not dynamic_exchange
                and self.pctx.pp_size == 1):  # pipeline stages run eagerly
            from deepserve.engine.cuda_graphs import CudaGraphRunner
            t0 = time.perf_counter()
            self.graphs = CudaGraphRunner(self, config.cuda_graph_sizes)
            self.timings["cuda_graph_s"] = time.perf_counter() - t0
        logger.info("model %s on %s (%s, ops=%s, %.0f%% of op calls so far ran as Triton kernels): "
                    "%d KV blocks of %d tokens; %s", config.model.architecture, self.device, self.dtype,
                    ops.get_backend(), 100 * ops.triton_share(), self.num_blocks, self.block_size,
                    ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()))

    # ------------------------------------------------------------------ KV cache
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(s) * elem for m in self.kv_layers for s in m.kv_cache_shapes(self.block_size))

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        for m in self.kv_layers:
            m.kv_cache = [torch.zeros(num_blocks, *s, dtype=self.dtype, device=self.device)
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
            raise RuntimeError(f"no memory left for the KV cache ({budget / 2**30:.2f} GiB budget, "
                               f"{per_block} bytes per block): lower --max-num-batched-tokens or raise "
                               f"--gpu-memory-utilization")
        return int(blocks)

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Run the largest batch once on a scratch cache; the KV pool gets what is left."""
        sc = self.config.scheduler
        tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * sc.max_model_len)
        seq_len = min(sc.max_model_len, tokens)
        n_seqs = max(1, tokens // seq_len)
        blocks_per_seq = math.ceil(seq_len / self.block_size)
        self._allocate_kv_cache(n_seqs * blocks_per_seq)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(n_seqs * seq_len, dtype=torch.long, device=self.device)
        starts = torch.arange(n_seqs + 1, dtype=torch.int32, device=self.device) * seq_len
        tables = torch.arange(n_seqs * blocks_per_seq, dtype=torch.int32, device=self.device).view(n_seqs, -1)
        slots = torch.cat([torch.arange(seq_len, device=self.device) + b * blocks_per_seq * self.block_size
                           for b in range(n_seqs)])
        meta = AttentionMetadata(starts, torch.full((n_seqs,), seq_len, dtype=torch.int32, device=self.device),
                                 tables, slots, (starts[1:] - 1).long(), seq_len, seq_len, 0)
        positions = torch.arange(seq_len, device=self.device).repeat(n_seqs)
        if self.pctx.pp_size > 1:  # every stage profiles at once, through the pipeline
            self._pipeline_forward(ids, positions, meta)
        else:
            self.model.compute_logits(self.model(ids, positions, meta)[meta.logits_indices])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        for m in self.kv_layers:
            m.kv_cache = []
        torch.cuda.empty_cache()
        free, total = self.platform.memory_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.cache.gpu_memory_utilization - peak - max(0, used_by_others))

    # ------------------------------------------------------------------ one step
    def host_inputs(self, batch: ScheduledBatch) -> dict:
        """The step's inputs as plain lists (cheap to send to the other ranks).

        Work is per sequence (numpy over its new tokens), never per token in Python."""
        ids, positions, slots, q_lens, seq_lens, logits_rows = [], [], [], [], [], []
        bs = self.block_size
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            toks = seq.token_ids[start:start + n]
            # a token still on the device (async scheduling) goes in as 0; `launch` fills it in
            ids.append(toks if len(toks) == n else toks + [0] * (n - len(toks)))
            pos = np.arange(start, start + n)
            positions.append(pos)
            slots.append(np.asarray(seq.block_table)[pos // bs] * bs + pos % bs)
            q_lens.append(n)
            seq_lens.append(start + n)
            offset += n
            if start + n == seq.num_tokens:  # chunk reaches the end: sample a token
                logits_rows.append(offset - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        return dict(ids=list(itertools.chain.from_iterable(ids)), positions=np.concatenate(positions),
                    slots=np.concatenate(slots), q_lens=q_lens, seq_lens=seq_lens, tables=tables,
                    logits_rows=logits_rows, num_decodes=batch.num_decodes)

    def to_device(self, h: dict):
        """Host inputs -> (input ids, positions, attention metadata) on the device, in two
        packed transfers (engine/input_staging.py)."""
        q_lens = h["q_lens"]
        qsl = np.zeros(len(q_lens) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        tables = np.asarray(h["tables"], dtype=np.int32)
        (ids, positions, slots, rows), (qsl_t, seq_lens, tables_t) = self.staging.copy(
            (h["ids"], h["positions"], h["slots"], h["logits_rows"]), (qsl, h["seq_lens"], tables))
        meta = AttentionMetadata(
            query_start_loc=qsl_t, seq_lens=seq_lens, block_tables=tables_t.view(tables.shape),
            slot_mapping=slots, logits_indices=rows, max_query_len=max(q_lens),
            max_seq_len=int(max(h["seq_lens"])), num_decodes=h["num_decodes"])
        return ids, positions, meta

    @torch.inference_mode()
    def forward_logits(self, input_ids, positions, meta: AttentionMetadata,
                       dp_num_tokens: Optional[list[int]] = None, graph_size: int = 0) -> Optional[torch.Tensor]:
        """Logits of the rows in meta.logits_indices (None on pipeline stages but the first).
        `dp_num_tokens`: every DP rank's token count this step (DP attention only);
        `graph_size`: the CUDA graph every DP rank replays this step (0: eager), with DP + EP."""
        if self.pctx.pp_size > 1:
            return self._pipeline_forward(input_ids, positions, meta, dp_num_tokens)
        if self.graphs is not None and self.pctx.moe_dp_exchange:
            if graph_size:
                return self.graphs.run(input_ids, positions, meta, graph_size)
        elif self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run(input_ids, positions, meta)
        extra = {"dp_num_tokens": dp_num_tokens} if self.pctx.moe_dp_exchange else {}
        hidden = self.model(input_ids, positions, meta, **extra)
        return self.model.compute_logits(hidden[meta.logits_indices])

    def _pipeline_forward(self, input_ids, positions, meta, dp_num_tokens: Optional[list[int]] = None):
        """One step through the pipeline: each stage runs its layers and sends (hidden,
        residual) on; the last stage sends the logits back to the first, which samples.
        With DP, each DP rank is its own pipeline (ranks offset by dp_rank * tp * pp), and the
        MoE layers of a stage exchange tokens with the same stage of the other DP ranks."""
        m, p = self.model.model, self.pctx
        first, last = p.pp_rank == 0, p.pp_rank == p.pp_size - 1
        base = p.dp_rank * p.tp_size * p.pp_size
        stage_rank = lambda stage: base + stage * p.tp_size + p.tp_rank  # noqa: E731
        if p.moe_dp_exchange and dp_num_tokens is None:  # (the start-up profile's forward)
            dp_num_tokens = p.dp_token_counts(input_ids.shape[0], self.device)
        extra = {"dp_num_tokens": dp_num_tokens} if p.moe_dp_exchange else {}
        hidden_size = self.config.model.hf_config.hidden_size
        if first:
            x, residual = m.embed_tokens(input_ids), None
        else:
            buf = torch.empty(2, input_ids.shape[0], hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(buf, src=stage_rank(p.pp_rank - 1))
            x, residual = buf[0], buf[1]
        for i in self.model.pp_layers:
            x, residual = m.layers[i](positions, x, residual, meta, **extra)
        if not last:
            dist.send(torch.stack((x, residual)).contiguous(), dst=stage_rank(p.pp_rank + 1))
            if not first:
                return None
            logits = torch.empty(meta.logits_indices.shape[0], self.vocab_size, dtype=torch.float32,
                                 device=self.device)
            dist.recv(logits, src=stage_rank(p.pp_size - 1))
            return logits
        x, _ = m.norm(x, residual)
        logits = self.model.compute_logits(x[meta.logits_indices])[:, :self.vocab_size].float().contiguous()
        dist.send(logits, dst=stage_rank(0))
        return None

    @torch.inference_mode()
    def all_logits(self, seq) -> torch.Tensor:
        """Logits at every position of `seq`'s tokens (one prefill), fp32 on the CPU."""
        host = self.host_inputs(ScheduledBatch([seq], [seq.num_tokens], 0))
        host["logits_rows"] = list(range(seq.num_tokens))
        if self.pctx.dp_size > 1:  # DP rank 0 (the driver's) scores it; the others idle
            return self._dp_forward([host] + [self.dummy_host()] * (self.pctx.dp_size - 1))[0].cpu()
        self.publish(host)
        return self.forward_logits(*self.to_device(host))[:, :self.vocab_size].float().cpu()

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[list, SamplerOutput]:
        """Run one step; returns (sequences that got a token, their sampled tokens)."""
        if isinstance(batch, DataParallelBatch):
            return self._execute_dp(batch)
        host = self.host_inputs(batch)
        self.publish(host)
        logits = self.forward_logits(*self.to_device(host))
        sampling_seqs = batch.sampling_seqs()
        if not sampling_seqs:
            return [], SamplerOutput([], [])
        return sampling_seqs, self.sampler(logits, sampling_seqs)

    # ------------------------------------------------------------------ async scheduling
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: Optional[InFlight]) -> InFlight:
        """Start one step and return without waiting for it (one process only).

        A sequence whose last token is still pending (sampled by `prev`, not yet on the host)
        gets that token straight from prev's device tensor. The step's own samples stay on
        the device (the next step may read them) and start an asynchronous copy to the host;
        `InFlight.token_ids()` waits for it."""
        host = self.host_inputs(batch)
        ids, positions, meta = self.to_device(host)
        rows, where, offset = [], [], 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            offset += n
            if seq.num_pending and seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(prev.row_of[seq.seq_id])
                where.append(offset - 1)
        if rows:
            where_rows = to_device_async([where, rows], torch.long, self.device)   # one small copy, no sync
            ids[where_rows[0]] = prev.next_ids[where_rows[1]]
        logits = self.forward_logits(ids, positions, meta)
        seqs = batch.sampling_seqs()
        if not seqs:
            return InFlight([], None)
        return InFlight(seqs, self.sampler.sample_ids(logits, seqs))

    # ------------------------------------------------------------------ data parallel
    @staticmethod
    def dummy_host() -> dict:
        """One token at position 0 that writes no cache slot; its logits row is discarded."""
        return dict(ids=[0], positions=np.zeros(1, dtype=np.int64), slots=np.full(1, -1, dtype=np.int64),
                    q_lens=[1], seq_lens=[1], tables=[[0]], logits_rows=[0], num_decodes=1, dummy=True)

    def _logits_source(self, dp_rank: int) -> int:
        """Global rank that sends DP rank `dp_rank`'s logits: its first TP rank (see rank_layout)."""
        return dp_rank * self.pctx.tp_size * self.pctx.pp_size

    def _dp_graph_size(self, hosts: list[dict]) -> int:
        """The CUDA graph size all DP ranks replay this step, or 0 to run eagerly: every rank
        computes it from the same published batches, so they agree without talking."""
        g = self.graphs
        if g is None or not self.pctx.moe_dp_exchange:
            return 0
        decode_only = all(h["num_decodes"] == len(h["ids"]) and max(h["q_lens"]) == 1 for h in hosts)
        rows = max(len(h["ids"]) for h in hosts)
        longest = max(int(max(h["seq_lens"])) for h in hosts)
        return g.size_for(rows) if g.fits(rows, decode_only, longest) else 0

    def _dp_forward(self, hosts: list[dict]) -> list[Optional[torch.Tensor]]:
        """Driver: run one step on every DP rank; fp32 logits [rows, V] of each (None: no rows)."""
        self.publish({"dp_hosts": hosts})
        counts = [len(h["ids"]) for h in hosts]
        own = self.forward_logits(*self.to_device(hosts[self.pctx.dp_rank]), dp_num_tokens=counts,
                                  graph_size=self._dp_graph_size(hosts))
        out: list[Optional[torch.Tensor]] = []
        for r, h in enumerate(hosts):
            if h.get("dummy") or not h["logits_rows"]:
                out.append(None)
            elif r == self.pctx.dp_rank:
                out.append(own[:, :self.vocab_size].float())
            else:
                buf = torch.empty(len(h["logits_rows"]), self.vocab_size, dtype=torch.float32, device=self.device)
                dist.recv(buf, src=self._logits_source(r))
                out.append(buf)
        return out

    def _execute_dp(self, batch: DataParallelBatch) -> tuple[list, SamplerOutput]:
        hosts = [self.host_inputs(b) if b else self.dummy_host() for b in batch.batches]
        seqs, rows = [], []
        for b, logits in zip(batch.batches, self._dp_forward(hosts)):
            sampling = b.sampling_seqs()
            if sampling:
                seqs += sampling
                rows.append(logits)
        if not seqs:
            return [], SamplerOutput([], [])
        return seqs, self.sampler(torch.cat(rows), seqs)

    @torch.inference_mode()
    def run_published(self, msg: dict) -> None:
        """Worker: run one step the driver published (one host dict, or every DP rank's)."""
        if "dp_hosts" not in msg:
            self.forward_logits(*self.to_device(msg))
            return
        hosts = msg["dp_hosts"]
        own = hosts[self.pctx.dp_rank]
        logits = self.forward_logits(*self.to_device(own), dp_num_tokens=[len(h["ids"]) for h in hosts],
                                     graph_size=self._dp_graph_size(hosts))
        if self.pctx.tp_rank == 0 and self.pctx.pp_rank == 0 and not own.get("dummy") and own["logits_rows"]:
            dist.send(logits[:, :self.vocab_size].float().contiguous(), dst=0)
