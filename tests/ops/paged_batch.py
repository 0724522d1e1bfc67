"""Random paged-attention batches for the op tests and the GPU microbenchmark.

Builds a flat batch of sequences (prefill chunks after cached context, or decode rows), a
shuffled paged pool holding their keys/values, and the metadata `paged_attention` takes,
so Triton and torch implementations can be run on identical inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int

    def args(self, scale: float):
        return (self.q, self.k_cache, self.v_cache, self.query_start_loc, self.seq_lens,
                self.block_tables, scale, self.max_query_len, self.max_seq_len)


def make_paged_batch(query_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int,
                     head_dim: int, v_head_dim: int | None = None, block_size: int = 16,
                     dtype: torch.dtype = torch.float32, device: str = "cpu", mla: bool = False,
                     seed: int = 0) -> PagedBatch:
    """mla=True: one pool of width head_dim whose first v_head_dim dims are the values (a view)."""
    assert len(query_lens) == len(seq_lens) and all(q <= s for q, s in zip(query_lens, seq_lens))
    g = torch.Generator().manual_seed(seed)
    v_head_dim = v_head_dim or head_dim
    blocks_per_seq = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3                 # a few never-referenced blocks
    perm = torch.randperm(num_blocks, generator=g)       # scatter sequences over the pool
    width = max(blocks_per_seq)
    block_tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    if mla:
        v_cache = k_cache[..., :v_head_dim]
    else:
        v_cache = torch.randn(num_blocks, block_size, num_kv_heads, v_head_dim, generator=g).to(dtype)
    total = sum(query_lens)
    q = torch.randn(total, num_heads, head_dim, generator=g).to(dtype)
    qsl = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(query_lens).cumsum(0)
    k_cache, q = k_cache.to(device), q.to(device)
    v_cache = k_cache[..., :v_head_dim] if mla else v_cache.to(device)
    return PagedBatch(q, k_cache, v_cache, qsl.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device),
                      block_tables.to(device), max(query_lens), max(seq_lens))
