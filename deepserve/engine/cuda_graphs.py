"""CUDA graphs for decode steps (one new token per sequence).

A decode step of a small batch is dominated by kernel launch overhead; replaying a graph
captured at a fixed batch size removes it. Graphs are captured at `--cuda-graph-sizes`
(largest first, sharing one memory pool); a batch of n decodes runs the graph of the
smallest captured size >= n, its extra rows padded (slot -1: nothing written; sequence
length 1 over block 0: a harmless read). Prefill and mixed steps run eagerly, or with
cudagraph_mode FULL_AND_PIECEWISE as piecewise graphs around eager attention
(engine/piecewise_graphs.py); cudagraph_mode PIECEWISE captures no whole graphs at all.

Capture needs ops without host syncs, so graphs are used only with the Triton backend.

Small mixed steps (decodes beside at most --mixed-graph-tokens prompt tokens) replay them the
same way, each prompt token a row (`CudaGraphRunner.fits_as_rows`, DriverRunner.runs_as_rows):
the piecewise graphs would run their attention eagerly, whose launches outlast such a step's
GPU work.

Verify steps of speculative decoding (each sequence's last token and its k drafts) replay the
same graphs as decode rows, one row per token (engine/spec_decode.as_decode_rows), so the
sizes count tokens, up to max_num_seqs * (k + 1) (plus --mixed-graph-tokens: a small mixed
step's prompt rows beside verify rows, by the same rule); the graphs keep their hidden states
too, which MTP drafting reads after the step. The MTP module's own forwards (its rows after a
step of decodes, and each later draft position) replay graphs of their own
(`MTPGraphRunner`), with the previous hidden state as one more input buffer.

With DP attention + expert parallel the MoE layers exchange tokens between DP ranks inside
the graph (all-gather / reduce-scatter of a fixed width), so every DP rank must replay a
graph of the same size in the same step: the model runner picks it from all ranks' batches
(`size_for` the largest) and passes it to `run`; a rank with fewer rows pads them.
"""
from __future__ import annotations

import logging
import math

import torch

from deepserve.layers.attention import AttentionMetadata
from deepserve.ops.registry import replays_graphs

logger = logging.getLogger("deepserve")


def decode_graph_sizes(config, sizes: list[int]) -> list[int]:
    """The decode graph sizes captured of `sizes` (--cuda-graph-sizes): those up to the most
    rows a graph step has (max_num_seqs, times 1 + the drafts with speculative decoding, plus
    --mixed-graph-tokens' prompt rows of a mixed step), ascending; [1] where none is."""
    spec = config.speculative
    rows = config.scheduler.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
    return sorted(s for s in sizes if s <= rows + config.mixed_graph_tokens) or [1]


MIXED_ROWS_CONTEXT = 1 << 20
"""The most (row, attended position) pairs a mixed step's prompt rows may hold to run as decode
rows: each such row reads its sequence's cache up to its own position, where the prefill path
reads a sequence's cached prefix once, so a chunk deep into a long prompt stays off this path."""


def step_rows(num_new_tokens: list[int], drafts: int) -> int:
    """The most one-token rows a scheduled step runs as: its tokens, and with speculative
    decoding up to `drafts` verify rows beside each one-token row (only a sequence that computes
    one token drafts; the step's token budget and the pool may give it fewer)."""
    return sum(num_new_tokens) + drafts * num_new_tokens.count(1)


class CudaGraphRunner:
    def __init__(self, runner, sizes: list[int]):
        self.model = runner.model
        self.sizes = decode_graph_sizes(runner.config, sizes)
        self.enabled = replays_graphs(runner.ops.backend)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pctx = runner.pctx
        self.dp_size = pctx.dp_size if pctx.moe_dp_exchange else 1
        if not self.enabled:
            logger.info("CUDA graphs off: ops backend %s syncs with the host", runner.ops.name)
            return
        dev = runner.device
        self.max_bs = self.sizes[-1]
        self.max_len = runner.config.scheduler.max_model_len
        self.max_blocks = math.ceil(self.max_len / runner.block_size)
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.slots = torch.full((self.max_bs,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.zeros(self.max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(self.max_bs, dtype=torch.int64, device=dev)
        self.outputs: dict[int, torch.Tensor] = {}     # logits [bs, V]
        self.hidden: dict[int, torch.Tensor] = {}      # hidden states [bs, D]
        try:
            self._capture_all()
        except RuntimeError as exc:  # e.g. an op falls back to a path that syncs with the host
            logger.warning("CUDA graph capture failed, running decode eagerly: %s", exc)
            self.enabled = False
            self.graphs.clear()
            self.outputs.clear()
            self.hidden.clear()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.qsl[:bs + 1], self.seq_lens[:bs], self.tables[:bs], self.slots[:bs],
                                 self.rows[:bs], 1, self.max_len, bs)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            for _ in range(2):  # warm up: compile kernels, settle the allocator
                self._forward(bs, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[bs], self.outputs[bs] = self._forward(bs, meta)
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _forward(self, bs: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {"dp_num_tokens": [bs] * self.dp_size} if self.dp_size > 1 else {}
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], meta, **extra)
        return hidden, self.model.compute_logits(hidden)

    def can_run(self, meta: AttentionMetadata) -> bool:
        n = meta.num_seqs
        return self.fits(n, meta.num_decodes == n and meta.max_query_len == 1, meta.max_seq_len)

    def fits(self, num_seqs: int, decode_only: bool, max_seq_len: int) -> bool:
        """Whether a batch of `num_seqs` rows can replay a captured graph."""
        return self.enabled and decode_only and num_seqs <= self.max_bs and max_seq_len <= self.max_len

    def fits_as_rows(self, batch, mixed_tokens: int, drafts: int = 0) -> bool:
        """Whether a scheduled step with prompt tokens (ScheduledBatch: one-token rows first, then
        prompt chunks) runs as one-token decode rows (engine/spec_decode.as_decode_rows) in a captured
        graph: at most `mixed_tokens` prompt tokens, its rows (`step_rows`, counting up to
        `drafts` verify rows beside each one-token row) within a graph (`fits`), and its prompt
        rows' attended positions within MIXED_ROWS_CONTEXT. It reads the batch as scheduled,
        before any drafting, so a DP rank can tell the others before its step runs."""
        q, first = batch.num_new_tokens, batch.num_decodes
        prompt = sum(q[first:])
        if not mixed_tokens or not prompt or prompt > mixed_tokens:
            return False
        seq_lens = batch.seq_lens()
        if not self.fits(step_rows(q, drafts), True, max(seq_lens)):
            return False
        return sum(n * s for n, s in zip(q[first:], seq_lens[first:])) <= MIXED_ROWS_CONTEXT

    def size_for(self, num_seqs: int) -> int:
        """The captured size a decode batch of `num_seqs` rows runs at."""
        return next(s for s in self.sizes if s >= num_seqs)

    def run(self, input_ids, positions, meta: AttentionMetadata, bs: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph of size `bs` (default: the smallest that holds the batch) -> (hidden
        states [n, D] of every row, logits of the rows in meta.logits_indices), both views of
        the graph's buffers, valid until its next replay."""
        n = input_ids.shape[0]
        bs = self.load(input_ids, positions, meta, bs)
        self.graphs[bs].replay()
        logits = self.outputs[bs][:n]
        # (a one-token chunk that does not reach its sequence's end has no logits row)
        if meta.logits_indices.shape[0] != n:
            logits = logits[meta.logits_indices]
        return self.hidden[bs][:n], logits

    def load(self, input_ids, positions, meta: AttentionMetadata, bs: int = 0) -> int:
        """Copy a decode batch into the graphs' input buffers, padding up to the captured size
        `bs` (default: the smallest that holds it); returns that size."""
        n = input_ids.shape[0]
        bs = bs or self.size_for(n)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.slots[:n].copy_(meta.slot_mapping)
        width = meta.block_tables.shape[1]
        self.tables[:n, :width].copy_(meta.block_tables)
        if bs > n:  # padding rows: write nothing, read one slot
            self.seq_lens[n:bs].fill_(1)
            self.slots[n:bs].fill_(-1)
            self.tables[n:bs, 0].fill_(0)
        return bs


class MTPGraphRunner(CudaGraphRunner):
    """The MTP module's forwards over one-token rows as CUDA graphs (speculative decoding with
    mtp, engine/mtp_proposer.py): inputs the next token ids, positions, the previous hidden
    states [n, D] and decode metadata; outputs its hidden states and logits. Not under DP
    attention + EP, where the module's MoE exchange would need the DP ranks to agree on sizes."""

    def __init__(self, runner, sizes: list[int]):
        self.mtp = runner.mtp.mtp
        d = runner.config.model.hf_config.hidden_size
        self.previous = torch.zeros(max(sizes), d, dtype=runner.dtype, device=runner.device)
        super().__init__(runner, sizes)

    def _forward(self, bs: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mtp(self.input_ids[:bs], self.positions[:bs], self.previous[:bs], meta)
        return hidden, self.mtp.compute_logits(hidden)

    def run_mtp(self, input_ids, positions, previous: torch.Tensor, meta: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [n, D], logits of meta.logits_indices), copies the next replay leaves alone."""
        self.previous[:input_ids.shape[0]].copy_(previous)
        hidden, logits = self.run(input_ids, positions, meta)
        return hidden.clone(), logits.clone()
