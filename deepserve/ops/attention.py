"""Paged attention over a flat token batch, torch reference.

The batch holds B sequences whose new tokens are concatenated: sequence b owns query rows
`query_start_loc[b]:query_start_loc[b+1]` and has `seq_lens[b]` tokens in total, the new
ones last. Keys and values live in a paged pool `[num_blocks, block_size, heads, dim]`;
`block_tables[b, i]` is the pool block holding tokens `i*block_size ...` of sequence b.
Prefill chunks and decode tokens are the same case (decode: one query row).

MLA's absorbed decode is this op with one KV head of width 576 and `v_cache` a view of the
first 512 dims of the same latent pool (DESIGN invariant 3).
"""
from __future__ import annotations

import torch

from deepserve.ops.registry import register


def output_rows(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An op's output [T, ...]: `out` when the caller gives one (a slice of a larger buffer, so a
    layer writes several ops' rows without joining them after), checked, else a new tensor."""
    if out is None:
        return like.new_empty(shape)
    if out.shape != shape or out.dtype != like.dtype or out.device != like.device \
            or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device} does not fit the op's output "
                         f"{tuple(shape)} {like.dtype} on {like.device} (unit last stride needed)")
    return out


@register("write_kv_cache", "torch")
def write_kv_cache(key: torch.Tensor, value: torch.Tensor | None, k_cache: torch.Tensor,
                   v_cache: torch.Tensor | None, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    """Store key / k_scale [T, Hk, D] (and value / v_scale) at flat slots `block * block_size + offset`.

    Slots < 0 are padding (e.g. CUDA-graph filler rows) and are skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = to_cache_dtype(key[valid], k_cache.dtype, k_scale)
    if v_cache is not None and value is not None:
        v_cache.view(-1, *v_cache.shape[2:])[slots] = to_cache_dtype(value[valid], v_cache.dtype, v_scale)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x / scale in the pool's dtype (times fp32 1 / scale, as the kernels); an e4m3 pool
    saturates at +-448 as the GPU's cvt does, where a plain cast would turn out-of-range values
    into NaN. vLLM's fp8 KV: the checkpoint's k_scale / v_scale map the values into e4m3's range."""
    if scale != 1.0:
        x = x.float() * float(torch.tensor(1.0 / float(scale), dtype=torch.float32))
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp(-448.0, 448.0).to(dtype)
    return x.to(dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` tokens of one sequence from a paged pool -> [seq_len, ...]."""
    block_size = cache.shape[1]
    n_blocks = (seq_len + block_size - 1) // block_size
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:seq_len]


@register("paged_attention", "torch")
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int = 0, max_seq_len: int = 0,
                    k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None,
                    k_pe: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] over the cached keys/values (new tokens already written) -> [T, H, Dv] (written
    into `out` when given). `k_pe` [blocks, bs, Hk or 1, R]: the keys' last R dims kept apart
    (MLA's rope part, one for every head), each key row being [k_cache row | k_pe row].

    Causal: query row i of a sequence with context c (cached before this step) sees keys
    0 .. c + i. Heads are grouped (GQA/MQA) when the cache has fewer heads than q. The pool
    holds key / k_scale and value / v_scale (an fp8 pool's per-tensor scales; 1.0 otherwise)."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if k_pe is not None:
        k_cache = torch.cat((k_cache, k_pe.expand(*k_cache.shape[:3], k_pe.shape[-1])), dim=-1)
    out = output_rows(out, (q.shape[0], num_heads, v_cache.shape[-1]), q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_b = q[starts[b]:starts[b + 1]]                       # [Lq, H, D]
        q_len = q_b.shape[0]
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len)      # [L, Hk, D]
        v = gather_kv(v_cache, block_tables[b], seq_len)      # [L, Hk, Dv]
        if num_kv_heads != num_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q_b.float(), k.float() * k_scale) * scale
        context = seq_len - q_len
        q_pos = torch.arange(q_len, device=q.device)[:, None] + context
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        scores.masked_fill_(k_pos > q_pos, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[starts[b]:starts[b + 1]] = torch.einsum("hqk,khd->qhd", probs, v.float() * v_scale).to(q.dtype)
    return out
