"""Paged attention module and the per-step batch metadata every attention layer reads.

`AttentionMetadata` is built by the model runner once per step and passed down the model
as an argument (DESIGN invariant 1: no module globals carry per-step state). Sequences are
ordered decodes first: the first `num_decodes` sequences have exactly one new token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional, Sequence

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor   # [B+1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor          # [B] int32, tokens in each sequence after this step
    block_tables: torch.Tensor      # [B, max_blocks] int32, pool blocks of each sequence
    slot_mapping: torch.Tensor      # [T] int64, flat cache slot of each new token (-1: padding)
    logits_indices: torch.Tensor    # [N] int64, rows of the batch whose logits are needed
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0            # leading sequences with one new token each
    # seq_lens on the host (the runner's copy, so layers that size buffers by the lengths need
    # no device sync); None: read from the device once per step (`host_seq_lens`)
    seq_lens_host: Optional[Sequence[int]] = None
    # [Bp+1] int32: `prefill_query_start_loc` as the runner sends it (None: computed once per step)
    prefill_starts: Optional[torch.Tensor] = None
    # what layers derive from the metadata once per step and share across layers, by key
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @cached_property
    def prefill_query_start_loc(self) -> torch.Tensor:
        """query_start_loc of the sequences after the decodes, from 0 (once per step, for every layer)."""
        if self.prefill_starts is not None:
            return self.prefill_starts
        return self.query_start_loc[self.num_decodes:] - self.query_start_loc[self.num_decodes]

    @cached_property
    def decode_part(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(query_start_loc, seq_lens, block_tables) of the first num_decodes sequences: views made
        once per step, not once per layer."""
        n = self.num_decodes
        return self.query_start_loc[:n + 1], self.seq_lens[:n], self.block_tables[:n]

    @cached_property
    def prefill_part(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq_lens, block_tables) of the sequences after the decodes (once per step)."""
        n = self.num_decodes
        return self.seq_lens[n:], self.block_tables[n:]

    @cached_property
    def host_seq_lens(self) -> list[int]:
        """seq_lens as host ints: `seq_lens_host` where the builder gave it, else a device read
        (a sync: metadata built off the serving path, e.g. tests and calibration)."""
        lens = self.seq_lens.tolist() if self.seq_lens_host is None else [int(n) for n in self.seq_lens_host]
        if len(lens) != self.num_seqs:
            raise ValueError(f"seq_lens_host has {len(lens)} entries for {self.num_seqs} sequences")
        return lens


class Attention(nn.Module):
    """Multi-head / grouped-query attention over a paged KV pool.

    The model runner allocates the pool from `kv_cache_shapes` and sets `self.kv_cache`
    to [k_cache, v_cache], each [num_blocks, block_size, num_kv_heads, dim]."""

    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 v_head_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.v_head_dim = v_head_dim or head_dim
        self.scale = scale
        self.kv_cache: list[torch.Tensor] = []
        # an fp8 pool holds key / k_scale and value / v_scale (the checkpoint's, 1.0 without)
        self.k_scale = self.v_scale = 1.0

    def set_kv_scale(self, name: str, value: float) -> None:
        """A checkpoint's fp8 KV scale of this layer: k_scale, v_scale, or kv_scale for both."""
        if name in ("k_scale", "kv_scale"):
            self.k_scale = value
        if name in ("v_scale", "kv_scale"):
            self.v_scale = value

    def kv_cache_shapes(self, block_size: int) -> list[tuple[int, ...]]:
        return [(block_size, self.num_kv_heads, self.head_dim),
                (block_size, self.num_kv_heads, self.v_head_dim)]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q [T, H, D], k [T, Hk, D], v [T, Hk, Dv] -> [T, H * Dv] (written into `out` [T, H * Dv]
        when given: the piecewise graphs' static buffer, so no copy follows)."""
        k_cache, v_cache = self.kv_cache
        # the scales apply to e4m3 pools only (vLLM's rule); a 16-bit pool holds K/V as they are
        ks, vs = (self.k_scale, self.v_scale) if k_cache.dtype == torch.float8_e4m3fn else (1.0, 1.0)
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, ks, vs)
        n_dec = meta.num_decodes
        shape = (q.shape[0], q.shape[1], v_cache.shape[-1])
        out = q.new_empty(shape) if out is None else out.view(shape)
        if 0 < n_dec < meta.num_seqs and meta.max_query_len > 1:
            # a mixed step: the decode rows on the decode kernel (split over the context), the
            # prompt chunks on the prefill kernel, whose query tiles a one-token row would waste;
            # both write their rows of one output
            self.ops.paged_attention(q[:n_dec], k_cache, v_cache, *meta.decode_part, self.scale, 1,
                                     meta.max_seq_len, k_scale=ks, v_scale=vs, out=out[:n_dec])
            self.ops.paged_attention(q[n_dec:], k_cache, v_cache, meta.prefill_query_start_loc, *meta.prefill_part,
                                     self.scale, meta.max_query_len, meta.max_seq_len, k_scale=ks, v_scale=vs,
                                     out=out[n_dec:])
            return out.flatten(1)
        self.ops.paged_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                 self.scale, meta.max_query_len, meta.max_seq_len, k_scale=ks, v_scale=vs, out=out)
        return out.flatten(1)
