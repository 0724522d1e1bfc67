"""Multi-head Latent Attention (MLA, DeepSeek-V2 arXiv 2405.04434 section 2.1) over a paged
cache that holds only the compressed latent (DESIGN invariants 2 and 3).

Per token the cache stores [c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim)] = 512 + 64 for
R1, one "head" wide; per-head keys and values are never cached. With
kv_b_proj = [W_UK; W_UV] per head, a head's key is [W_UK c_kv | k_pe] and its value W_UV c_kv.

- Prefill sequences (chunks of any length, context > 0 on chunked prefill or prefix hits)
  gather their whole latent from the pool, expand k_nope / v through kv_b_proj and run
  ordinary causal attention (`ops.paged_attention` over temporary expanded blocks). With an
  fp8 pool the chunk's own tokens take their latent as computed, not its e4m3 copy: only the
  cached context goes through the cache's rounding (vLLM's MLA prefill attends the new tokens'
  kv_c_normed / k_pe and reads the context from the cache).
- Decode sequences (the first `meta.num_decodes`, one token each) absorb W_UK into the query,
  q_lat = q_nope W_UK (so q_lat . c_kv = q_nope . k_nope), attend over the latent directly
  as MQA with 576-wide q/k and the first 512 dims as v, then apply W_UV to the output.
- Every token's cache row (normed c_kv, rotated k_pe) is written by `ops.mla_kv_write`, the
  decode query built by `ops.mla_q_absorb` (both in one `ops.mla_decode_prep` when every row
  is a decode row) and W_UV applied by `ops.mla_v_up` (deepserve/ops/mla.py): on the triton
  backend two launches around the attention, where the unfused steps took eight per layer.

Both paths give the same numbers (tests/models/test_deepseek.py checks this); decode reads
kv_lora_rank + rope dims per cached token instead of H * (nope + rope + v).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.distributed.parallel_state import ParallelContext, divide, single_process
from deepserve.layers.attention import AttentionMetadata
from deepserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)

# DeepSeek's q_a_layernorm / kv_a_layernorm use RMSNorm's default eps, not config.rms_norm_eps
LATENT_NORM_EPS = 1e-6


@dataclass
class PrefillGather:
    """Where the latent of the prefill sequences lies, as the expanded attention reads it: their
    used pool blocks gathered one sequence after another into a buffer of Nb blocks."""
    blocks: torch.Tensor    # [Nb] int64: the pool block of each gathered block
    tables: torch.Tensor    # [Bp, W] int32: each sequence's blocks in the gathered buffer (W: the longest's)
    valid: torch.Tensor     # [Nb] int32: slots of each gathered block inside its sequence
    seq_lens: torch.Tensor  # [Bp] int32: the sequences' lengths (meta.seq_lens[first:])
    block_size: int

    @cached_property
    def stale(self) -> torch.Tensor:
        """[Nb, bs] bool: slots past their sequence's end (made only where a layer needs it)."""
        return torch.arange(self.block_size, device=self.valid.device) >= self.valid[:, None]


def _gather_key(first: int, block_size: int) -> tuple:
    return ("mla_prefill_gather", first, block_size)


def chunk_rows(meta: AttentionMetadata, first: int, gather: "PrefillGather", num_rows: int) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """(the prefill rows [Tp], the flat row of the gathered latent buffer each one's token lies
    at [Tp]) for the `num_rows` rows after the decodes: row j of sequence i is its token
    seq_len_i - q_len_i + (j - start_i). Padding rows past the last sequence's tokens stand for
    that last token (so writing them repeats its write). Made once per step, on the device."""
    key = ("mla_chunk_rows", first, gather.block_size)
    if key in meta.derived:
        return meta.derived[key]
    starts = meta.prefill_query_start_loc.long()                                  # [Bp+1]
    dev = starts.device
    rows = torch.minimum(torch.arange(num_rows, device=dev), starts[-1] - 1)      # [Tp]
    seq = torch.searchsorted(starts[1:], rows, right=True)                        # [Tp] its sequence
    q_lens = starts[1:] - starts[:-1]
    pos = gather.seq_lens.long()[seq] - q_lens[seq] + rows - starts[seq]          # [Tp] place in the sequence
    bs = gather.block_size
    flat = gather.tables.long()[seq, pos // bs] * bs + pos % bs
    meta.derived[key] = rows, flat
    return rows, flat


def fresh_slots(meta: AttentionMetadata, n: int, device: torch.device) -> torch.Tensor:
    """0 .. n-1: the slots of the prompt rows' own latents in the rows made for them (an fp8
    pool's prefill), made once a step."""
    key = ("mla_fresh_slots", n)
    if key not in meta.derived:
        meta.derived[key] = torch.arange(n, device=device)
    return meta.derived[key]


def prefill_gather_arrays(seq_lens: Sequence[int], tables: np.ndarray,
                          block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PrefillGather's blocks (int64), tables (int32 [Bp, W]) and valid (int32) on the host, from
    the prefill sequences' lengths and block tables (rows [Bp, >= W]): what the model runner
    sends with the step's other inputs, so the gather costs no launches of its own."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    counts = -(-lens // block_size)
    total = int(counts.sum())
    seq_of = np.repeat(np.arange(len(lens)), counts)                               # [Nb]
    block_idx = np.arange(total) - (np.cumsum(counts) - counts)[seq_of]           # [Nb]
    gathered = np.zeros((len(lens), int(counts.max())), dtype=np.int32)
    gathered[seq_of, block_idx] = np.arange(total)
    valid = np.minimum(lens[seq_of] - block_idx * block_size, block_size).astype(np.int32)
    return np.asarray(tables)[seq_of, block_idx].astype(np.int64), gathered, valid


def set_prefill_gather(meta: AttentionMetadata, first: int, block_size: int, blocks: torch.Tensor,
                       tables: torch.Tensor, valid: torch.Tensor) -> None:
    """The step's gather of sequences first.. from `prefill_gather_arrays`' arrays on the device."""
    meta.derived[_gather_key(first, block_size)] = PrefillGather(blocks, tables, valid, meta.seq_lens[first:],
                                                                 block_size)


def prefill_gather(meta: AttentionMetadata, first: int, block_size: int) -> PrefillGather:
    """The gather of sequences first.. of `meta`, made once per step and block size and shared by
    every MLA layer (meta.derived): the model runner's (`set_prefill_gather`), else built here on
    the device. Sizes come from the host's sequence lengths and every index is built on the
    device (repeat_interleave told its output size), so nothing waits for the device; the buffer
    holds the used blocks only, not Bp x the longest sequence's."""
    key = _gather_key(first, block_size)
    if key in meta.derived:
        return meta.derived[key]
    per_seq = [-(-n // block_size) for n in meta.host_seq_lens[first:]]
    total, width = sum(per_seq), max(per_seq)
    dev = meta.block_tables.device
    seq_lens = meta.seq_lens[first:].long()                                       # [Bp]
    counts = (seq_lens + block_size - 1) // block_size
    seq_of = torch.repeat_interleave(counts, output_size=total)                   # [Nb] sequence of each block
    starts = counts.cumsum(0) - counts
    block_idx = torch.arange(total, device=dev) - starts[seq_of]                  # [Nb] its index in the sequence
    blocks = meta.block_tables[first:].long()[seq_of, block_idx]
    tables = torch.zeros(len(per_seq), width, dtype=meta.block_tables.dtype, device=dev)
    tables[seq_of, block_idx] = torch.arange(total, dtype=tables.dtype, device=dev)
    valid = (seq_lens[seq_of] - block_idx * block_size).clamp_(max=block_size).int()
    gather = PrefillGather(blocks, tables, valid, meta.seq_lens[first:], block_size)
    meta.derived[key] = gather
    return gather


@dataclass
class MixedRows:
    """attend's inputs of a mixed step split at the decode rows: the decode rows' q, positions
    and output rows, the prompt rows' q, q_pe (their rope part, rotated in place), positions
    and output rows. Made once a step where every layer is given the same tensors (the piecewise
    pieces' static buffers), else once a layer."""
    q: torch.Tensor
    positions: torch.Tensor
    out: torch.Tensor          # [T, H * v], as given
    q_dec: torch.Tensor
    pos_dec: torch.Tensor
    out_dec: torch.Tensor
    q_pre: torch.Tensor
    q_pe: torch.Tensor
    pos_pre: torch.Tensor
    out_pre: torch.Tensor


_MIXED_ROWS = "mla_mixed_rows"


def mixed_rows(meta: AttentionMetadata, q: torch.Tensor, positions: torch.Tensor, out: torch.Tensor,
               nope: int, v_dim: int) -> MixedRows:
    """The MixedRows of q [T, H, nope + rope], positions [T] and out [T, H * v]: the step's
    (meta.derived) where the last layer's were of the same tensors, else new ones kept there."""
    rows = meta.derived.get(_MIXED_ROWS)
    if rows is not None and rows.q is q and rows.positions is positions and rows.out is out:
        return rows
    n = meta.num_decodes
    out3 = out.view(q.shape[0], q.shape[1], v_dim)
    q_pre = q[n:]
    rows = MixedRows(q, positions, out, q[:n], positions[:n], out3[:n], q_pre, q_pre[..., nope:], positions[n:],
                     out3[n:])
    meta.derived[_MIXED_ROWS] = rows
    return rows


class MLAAttention(nn.Module):
    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 rotary_emb: RotaryEmbedding, scale: float, attention_bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None):
        super().__init__()
        pctx = pctx or single_process()
        self.num_heads = divide(num_heads, pctx.tp_size, "num_attention_heads")
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.scale = scale
        dt = params_dtype
        if q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.qk_head_dim, False, dt, pctx)
        else:
            self.q_a_proj = ReplicatedLinear(hidden_size, q_lora_rank, attention_bias, dt)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS, dt)
            self.q_b_proj = ColumnParallelLinear(q_lora_rank, num_heads * self.qk_head_dim, False, dt, pctx)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, kv_lora_rank + qk_rope_head_dim,
                                                   attention_bias, dt)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS, dt)
        self.kv_b_proj = ColumnParallelLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim),
                                              False, dt, pctx)
        self.o_proj = RowParallelLinear(num_heads * v_head_dim, hidden_size, attention_bias, dt, pctx)
        self.rotary_emb = rotary_emb
        self.kv_cache = []
        # an fp8 pool holds the latent / kv_scale: the checkpoint's k_scale (or kv_scale) of the
        # layer, the one scale vLLM's MLA writes and reads its latent cache with (layer._k_scale)
        self.kv_scale = 1.0
        self.unused_v_scale: Optional[float] = None

    def set_kv_scale(self, name: str, value: float) -> None:
        """A checkpoint's fp8 KV scale of this layer (k_scale, v_scale or kv_scale). The latent is
        one tensor: k_scale / kv_scale is its scale; a v_scale has nothing to scale (kept to warn
        about when it differs)."""
        if name == "v_scale":
            self.unused_v_scale = value
        else:
            self.kv_scale = value

    def pool_scale(self, pool: torch.Tensor) -> float:
        """The latent's scale in `pool`: kv_scale for an e4m3 pool, 1.0 for a 16-bit one (as vLLM,
        whose scales apply to fp8 caches only)."""
        return self.kv_scale if pool.dtype == torch.float8_e4m3fn else 1.0

    def kv_cache_shapes(self, block_size: int) -> list[tuple[int, ...]]:
        return [(block_size, 1, self.kv_lora_rank + self.rope_dim)]

    def process_weights_after_loading(self) -> None:
        """Decided once the weights are in place: whether the first q projection and
        kv_a_proj_with_mqa run as one `ops.linear_pair` (both plain x W^T on this rank, so a
        single row needs one launch), and W_UK / W_UV as views of kv_b_proj's weight."""
        q_first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        self.q_kv_a_pair = (q_first.plain_weight() is not None
                            and self.kv_a_proj_with_mqa.plain_weight() is not None)
        self.q_kv_a_fp8 = self._join_fp8_q_kv_a() if self.q_lora_rank is not None else None
        # a plain GEMM computes each row from that row alone: stale rows of the prefill's gathered
        # latent then stay in rows the attention never reads
        self.kv_b_rowwise = self.kv_b_proj.plain_weight() is not None
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk, self.w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]    # [H, nope, C], [H, v, C]
        if self.unused_v_scale is not None and self.unused_v_scale != self.kv_scale:
            logger.warning("MLA layer: the checkpoint's v_scale %g is not used (the latent cache has one "
                           "scale, k_scale %g, as in vLLM)", self.unused_v_scale, self.kv_scale)

    def _join_fp8_q_kv_a(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """q_a_proj and kv_a_proj_with_mqa both block-fp8 (activations quantized per token
        group, not with a checkpoint's static input_scale each) and bias-free: their weights and
        row-expanded scales stacked into one [q_lora + C + rope, D] pair, each layer's parameters
        left as views of it (no memory added), so that one fp8 linear, one launch at a single
        row, computes both; each output row is computed as before."""
        from deepserve.layers.quantization import Fp8BlockLinearMethod
        pair = (self.q_a_proj, self.kv_a_proj_with_mqa)
        if not all(isinstance(m.quant_method, Fp8BlockLinearMethod) and m.bias is None
                   and not m.quant_method.weight_only and not m.quant_method.static_input for m in pair) \
                or pair[0].quant_method.block != pair[1].quant_method.block:
            return None
        joined = []
        for name in ("weight", "weight_scale_inv"):
            both = torch.cat([getattr(m, name).data for m in pair])
            rows = pair[0].out_features
            getattr(pair[0], name).data, getattr(pair[1], name).data = both[:rows], both[rows:]
            joined.append(both)
        return joined[0], joined[1]

    # ------------------------------------------------------------------ helpers

    @property
    def kv_cache(self) -> list[torch.Tensor]:
        """[pool [num_blocks, block_size, 1, kv_lora + rope]] once the runner has set it."""
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, pools: list[torch.Tensor]) -> None:
        self._kv_cache = pools
        # the decode's values, the latent part of the pool's rows: a view made once per pool,
        # not once a layer and step (dropped with the pool, so it keeps no freed pool alive)
        self._latent_values = pools[0][..., :self.kv_lora_rank] if pools else None

    def _decode(self, q_abs, w_uv, pool, scale: float, meta: AttentionMetadata, out: torch.Tensor) -> None:
        """Absorbed attention of the first meta.num_decodes sequences (one token each; q_abs
        [n, H, C + rope]) into out [n, H, v]."""
        out_lat = self.ops.paged_attention(q_abs, pool, self._latent_values, *meta.decode_part,
                                           self.scale, 1, meta.max_seq_len, k_scale=scale, v_scale=scale)
        self.ops.mla_v_up(out_lat, w_uv, out=out)                          # [n, H, v]

    def _prefill(self, q, pool, scale: float, meta: AttentionMetadata, first: int, out: torch.Tensor,
                 fresh: Optional[torch.Tensor] = None) -> None:
        """Expanded attention of sequences first.. = the ones after the decodes (their new tokens are
        q [Tp, H, qk]) into out [Tp, H, v]. `fresh` [Tp, C + rope] (an fp8 pool): the new tokens'
        latent as computed, which they attend instead of its e4m3 copy in the pool."""
        g = prefill_gather(meta, first, pool.shape[1])
        latent = pool.index_select(0, g.blocks)                       # [Nb, bs, 1, C + rope]
        # fp8 KV: e4m3 -> 16 bits is exact and the product rounds once, as it would in fp32
        if latent.dtype != q.dtype:
            latent = latent.to(q.dtype)
        if scale != 1.0:
            latent = latent * scale
        if fresh is not None:
            rows, flat = chunk_rows(meta, first, g, fresh.shape[0])
            latent.view(-1, latent.shape[-1])[flat] = fresh[rows]
        if not self.kv_b_rowwise:
            # zero the slots past each sequence's end: stale pool data must not reach a GEMM that
            # mixes rows (the attention never reads those slots' keys and values)
            latent = latent.masked_fill(g.stale[..., None, None], 0.0)
        kv_c, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(kv_c).view(*kv_c.shape[:2], self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)   # [Nb, bs, H, nope], [.., v] (strided)
        # keys [k_nope | k_pe]: the rope part one for every head, passed apart (no per-head copy)
        self.ops.paged_attention(q, k_nope, v, meta.prefill_query_start_loc, g.seq_lens, g.tables, self.scale,
                                 meta.max_query_len, meta.max_seq_len, out=out, k_pe=k_pe)

    # ------------------------------------------------------------------ forward
    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, D] (decode tokens first, then prefill tokens) -> [T, D]."""
        return self.o_proj(self.attend(positions, self.project(x), meta))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> the attention's inputs: q [T, H, nope + rope] (not rotated) and
        kv_a [T, C + rope] (the latent before its norm, k_pe before its rotation)."""
        q_first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        if self.q_kv_a_pair:
            q, kv_a = self.ops.linear_pair(x, q_first.weight, self.kv_a_proj_with_mqa.weight)
        elif self.q_kv_a_fp8 is not None:
            y = self.ops.fp8_block_linear(x, *self.q_kv_a_fp8)              # [T, q_lora + C + rope]
            q, kv_a = y.split([self.q_lora_rank, y.shape[-1] - self.q_lora_rank], dim=-1)
        else:
            q, kv_a = q_first(x), self.kv_a_proj_with_mqa(x)                # kv_a [T, C + rope]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        return q.view(-1, self.num_heads, self.qk_head_dim), kv_a

    def attend(self, positions: torch.Tensor, parts: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`project`'s parts -> [T, H * v], o_proj's input (written into `out` [T, H * v] when
        given: the piecewise graphs' static buffer, so no copy follows): the latent's norm,
        rotation and cache write, the absorbed decode and the expanded prefill. The part of a
        layer that piecewise CUDA graphs leave eager (engine/piecewise_graphs.py), as vLLM's MLA
        attention op. Views of the step's metadata come from `meta` once a step (decode_part,
        prefill_gather), not once a layer."""
        q, kv_a = parts
        (pool,) = self.kv_cache
        rope = self.rotary_emb
        norm = self.kv_a_layernorm
        scale = self.pool_scale(pool)
        n_dec = meta.num_decodes
        if out is None:
            out = q.new_empty(q.shape[0], self.num_heads * self.v_dim)       # [T, H * v]
        if n_dec == meta.num_seqs:  # decode only (every CUDA-graph step): no scatter into a buffer
            q_abs = self.ops.mla_decode_prep(q, kv_a, positions, rope.cos_sin_cache, rope.is_neox_style, self.w_uk,
                                             norm.weight, norm.eps, pool, meta.slot_mapping,
                                             kv_scale=scale)                                  # [n, H, C + rope]
            self._decode(q_abs, self.w_uv, pool, scale, meta, out.view(-1, self.num_heads, self.v_dim))
            return out
        self.ops.mla_kv_write(kv_a, positions, rope.cos_sin_cache, rope.is_neox_style, norm.weight, norm.eps, pool,
                              meta.slot_mapping, kv_scale=scale)
        rows = mixed_rows(meta, q, positions, out, self.nope_dim, self.v_dim)
        # the decode rows' output, then the prompt chunks' (the rows after them), written in place
        if n_dec:
            q_abs = self.ops.mla_q_absorb(rows.q_dec, rows.pos_dec, rope.cos_sin_cache, rope.is_neox_style, self.w_uk)
            self._decode(q_abs, self.w_uv, pool, scale, meta, rows.out_dec)
        # the prompt rows' q_pe rotated where it lies (their k_pe's rotation is in the cache),
        # so q[n_dec:] is the prefill attention's query as it stands
        rope.rotate_(rows.pos_pre, rows.q_pe)
        fresh = None
        if pool.dtype == torch.float8_e4m3fn:
            # as vLLM's MLA prefill: the chunk's tokens attend their own latent as computed, only
            # the cached context through e4m3; the same op as the cache write, into rows of q's dtype
            n_pre = rows.q_pre.shape[0]
            fresh = kv_a.new_empty(n_pre, 1, 1, pool.shape[-1])                 # [Tp, 1, 1, C + rope]
            self.ops.mla_kv_write(kv_a[n_dec:], rows.pos_pre, rope.cos_sin_cache, rope.is_neox_style,
                                  norm.weight, norm.eps, fresh, fresh_slots(meta, n_pre, fresh.device), kv_scale=1.0)
            fresh = fresh.view(n_pre, -1).to(q.dtype)
        self._prefill(rows.q_pre, pool, scale, meta, n_dec, rows.out_pre, fresh)
        return out
