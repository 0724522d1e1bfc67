"""benchmarks/bench_engine.weight_bytes, the bytes a decode step's roofline counts: an embedding
table is read one row a token (whole only where the LM head shares it), routed experts by the
share a uniformly routed batch touches, everything else whole."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tests.bench.conftest import benchmark_module

be = benchmark_module("bench_engine")


class Tiny(nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.config = SimpleNamespace(n_routed_experts=8, num_experts_per_tok=2)
        self.embed_tokens = nn.Embedding(100, 16)                  # 100 x 16 fp32: 6,400 B
        self.layer = nn.Module()
        self.layer.experts = nn.Module()
        self.layer.experts.w = nn.Parameter(torch.zeros(8, 4, 16))  # 2,048 B
        self.proj = nn.Linear(16, 16, bias=False)                   # 1,024 B
        self.lm_head = nn.Linear(16, 100, bias=False)               # 6,400 B
        if tied:
            self.lm_head.weight = self.embed_tokens.weight


def test_a_step_reads_one_embedding_row_a_token_and_the_touched_experts():
    model = Tiny(tied=False)
    # batch 1: one 64-byte row, 2 of 8 experts, the projection and the LM head whole
    assert be.weight_bytes(model, active=True, batch=1) == 64 + 2048 // 4 + 1024 + 6400
    # batch 3: three rows; experts touched 8 * (1 - (6/8)^3) of 8
    assert be.weight_bytes(model, active=True, batch=3) == int(3 * 64 + 2048 * (1 - 0.75 ** 3) + 1024 + 6400)
    assert be.weight_bytes(model, active=False) == 6400 + 2048 + 1024 + 6400


def test_a_table_the_lm_head_shares_is_read_whole():
    model = Tiny(tied=True)
    assert be.weight_bytes(model, active=True, batch=1) == 6400 + 2048 // 4 + 1024
