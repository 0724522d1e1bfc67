"""CUDA graphs of one pipeline stage's decode steps.

Each stage captures its own part of a decode step at the `--cuda-graph-sizes` (as
engine/cuda_graphs.py does for the whole model): the first stage from the input ids, a later
one from the (hidden, residual) pair [2, bs, D] the stage before sent, into a buffer of the
graph; up to the pair it sends on, or on the last stage the logits. The sends and receives
stay outside the graphs (engine/pipeline.py), so the micro-batches in flight meet the same
stream order as eager steps. Every stage sees the same step inputs, so all replay a graph
for the same steps (and all TP ranks of a stage the same size: their collectives are inside).
"""
from __future__ import annotations

import torch

from deepserve.engine.cuda_graphs import CudaGraphRunner
from deepserve.layers.attention import AttentionMetadata


class StageGraphRunner(CudaGraphRunner):
    def __init__(self, runner, sizes: list[int]):
        p = runner.pctx
        self.first, self.last = p.pp_rank == 0, p.pp_rank == p.pp_size - 1
        self.vocab_size = runner.vocab_size
        d = runner.config.model.hf_config.hidden_size
        # the previous stage's (hidden, residual), copied in before each replay
        self.hidden_in = torch.zeros(2, max(sizes), d, dtype=runner.dtype, device=runner.device)
        super().__init__(runner, sizes)

    def _forward(self, bs: int, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model.model
        if self.first:
            x, residual = m.embed_tokens(self.input_ids[:bs]), None
        else:
            x, residual = self.hidden_in[0, :bs], self.hidden_in[1, :bs]
        for i in self.model.pp_layers:
            x, residual = m.layers[i](self.positions[:bs], x, residual, meta)
        if not self.last:
            out = torch.stack((x, residual))                      # [2, bs, D]
            return out, out
        x, _ = m.norm(x, residual)
        return x, self.model.compute_logits(x)

    def run_stage(self, input_ids, positions, meta: AttentionMetadata, hidden=None) -> torch.Tensor:
        """Replay this stage's graph over a decode batch (`hidden`: the previous stage's pair
        [2, n, D]) -> the pair [2, n, D] for the next stage, or on the last stage the logits
        [rows, V] fp32 of meta.logits_indices; copies, since an asynchronous send may still
        read them while the next replay rewrites the graph's buffers."""
        n = input_ids.shape[0]
        if hidden is not None:
            self.hidden_in[:, :n].copy_(hidden)
        bs = self.load(input_ids, positions, meta)
        self.graphs[bs].replay()
        if not self.last:
            return self.outputs[bs][:, :n].clone()
        logits = self.outputs[bs][:n]
        if meta.logits_indices.shape[0] != n:
            logits = logits[meta.logits_indices]
        return logits[:, :self.vocab_size].to(torch.float32, copy=True)
