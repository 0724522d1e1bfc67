"""Vocab-parallel embedding and LM head: each TP rank holds a contiguous slice of the vocab.

Embedding: tokens outside the local slice give zeros, and an all-reduce assembles the rows.
LM head: each rank computes logits for its slice; an all-gather assembles the full vocab.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.distributed.parallel_state import ParallelContext, single_process
from deepserve.distributed.plan_bytes import vocab_slice_rows


class VocabParallelEmbedding(nn.Module):
    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, vocab_size: int, hidden_size: int, params_dtype: torch.dtype = torch.float32,
                 pctx: Optional[ParallelContext] = None):
        super().__init__()
        self.pctx = pctx or single_process()
        self.vocab_size = vocab_size
        # every rank holds the same number of rows, of a vocabulary padded to 64 (the LM head's GEMM width)
        self.per_rank = vocab_slice_rows(vocab_size, self.pctx.tp_size)
        self.start = self.pctx.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden_size, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None):
        expected = (self.vocab_size, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: checkpoint shape "
                             f"{tuple(loaded.shape)} does not match the model's {expected}")
        rows = loaded[self.start:self.start + self.per_rank]
        param.data[:rows.shape[0]].copy_(rows)
        param.data[rows.shape[0]:].zero_()     # the padding: logits cut off, ids never looked up

    def dummy_shards(self):
        yield self.weight, None, (self.vocab_size, self.weight.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pctx.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0.0)
        return self.pctx.tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = hidden @ W^T over the vocab; may share its weight with the embedding."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.ops.linear(hidden, self.weight)
        logits = self.pctx.tp_all_gather(logits)
        return logits[:, :self.vocab_size]
