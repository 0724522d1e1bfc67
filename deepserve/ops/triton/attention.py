"""Paged attention (Triton backend): host-side checks, tile choices and dispatch.

Batches whose rows are all decode rows (`max_query_len == 1`) run the split-KV decode
kernel plus its reduce; any batch with a prefill chunk runs the varlen prefill kernel over
all rows (decode rows are 1-row chunks to it). Launch shapes depend only on tensor shapes
and the host ints `max_query_len` / `max_seq_len`, so the path never syncs with the device
and can be captured in a CUDA graph. Semantics are those of `deepserve.ops.attention`.
"""
from __future__ import annotations

import torch
import triton

from deepserve.ops.attention import paged_attention as torch_paged_attention
from deepserve.ops.registry import register
from deepserve.ops.triton._common import (device_name, dot_dtype, dot_precision, interpreting, next_pow2, pdl_launch,
                                         sm_count)
from deepserve.ops.triton.attention_decode import LOG2E, _decode_reduce_kernel, _decode_split_kernel
from deepserve.ops.triton.attention_prefill import _prefill_kernel

MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 256
# decode splits aim at this many programs per SM; MLA's wide tiles hide latency worse, so
# it wants more of them in flight (H100, benchmarks/sweep_mla_decode.py times 2, 4 and 8)
PROGRAMS_PER_SM = {False: 2, True: 4}
# launch settings merged over decode_config's choice when set (keys as decode_config
# returns them); benchmarks/sweep_mla_decode.py sets it to time candidate settings
DECODE_OVERRIDE: dict | None = None
_DECODE_KEYS = frozenset(("BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "page_tile"))


def decode_config(big_head: bool, small: bool, group: int, block_size: int, device: str = "") -> dict:
    """Tile and launch settings of the decode kernel for `group` query heads per KV head over
    a cache of `block_size`-token pages on the GPU named `device` (DECODE_OVERRIDE replaces
    keys). Measured on an H100 with benchmarks/sweep_mla_decode.py (2026-11-23,
    docs/PERFORMANCE.md):
    - GQA: 16 heads x 64 keys, 4 warps, 2 stages, 2 programs per SM (97.6% of copy bandwidth).
    - MLA, 16 heads (V2-Lite), 64-token pages: 64 keys (one page per tile), 4 warps, 2
      stages, 4 programs per SM (79.1%; 82% with 16-bit split partials); 16-token pages: 32
      keys (64.7%).
    - MLA, 64+ heads (R1's 128): 64 heads per program, so the latent is read twice, not 8
      times; 32 keys, 8 warps, 3 stages, 1 program per SM (27% at batch 64, where it is
      bound by the [64, 576] x [576, 32] products, not by memory).
    On an H200 (2026-12-04, two sweeps on two machines) the 16-head MLA tile runs best with 8
    warps: 74.6% / 75.0% of copy bandwidth against 68.4% / 69.6% with 4 (on the H100, 8 warps
    gave 77.8-78.1% against 79.1%). Its memory is 1.4 times faster at the same compute, so
    more warps to overlap each tile's products with the next tile's loads pay there."""
    # every query head of a KV head in one program where possible, so the cache is read once
    # per KV head: 16 rows is the smallest tensor-core M (GQA groups under 16 leave rows
    # masked), 64 the most whose fp32 accumulator fits in registers at d = 512
    block_h = min(max(16, triton.next_power_of_2(group)), 64)
    if small:
        cfg = dict(BLOCK_H=block_h, BLOCK_N=16, num_warps=4, num_stages=1)
    elif big_head and block_h >= 64:
        cfg = dict(BLOCK_H=block_h, BLOCK_N=32, num_warps=8, num_stages=3, programs_per_sm=1)
    elif big_head:
        cfg = dict(BLOCK_H=block_h, BLOCK_N=64 if block_size % 64 == 0 else 32, num_warps=4, num_stages=2)
        if "H200" in device and cfg["BLOCK_N"] == 64:
            cfg["num_warps"] = 8
    else:
        cfg = dict(BLOCK_H=block_h, BLOCK_N=64, num_warps=4, num_stages=2)
    cfg.setdefault("programs_per_sm", PROGRAMS_PER_SM[big_head])
    if DECODE_OVERRIDE:
        unknown = set(DECODE_OVERRIDE) - _DECODE_KEYS
        if unknown:
            raise ValueError(f"DECODE_OVERRIDE has unknown keys {sorted(unknown)}; "
                             f"known: {sorted(_DECODE_KEYS)}")
        cfg.update(DECODE_OVERRIDE)
    # one page id per tile where tiles lie inside pages (BLOCK_N divides the page size);
    # an override may turn it off, not on
    cfg["page_tile"] = cfg.get("page_tile", True) and block_size % cfg["BLOCK_N"] == 0
    if cfg["BLOCK_H"] < 16 or cfg["BLOCK_H"] & (cfg["BLOCK_H"] - 1):
        raise ValueError(f"decode BLOCK_H must be a power of two >= 16, got {cfg['BLOCK_H']}")
    return cfg


def _split_head_dim(d: int) -> tuple[int, int]:
    """A non-power-of-two head dim as a power-of-two main block plus a padded tail block
    (576 -> 512 + 64, 192 -> 128 + 64); the tail is 0 when d is a power of two."""
    main = 1 << (d.bit_length() - 1)
    tail = d - main
    return main, (next_pow2(tail) if tail else 0)


def _shares_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_d: int) -> bool:
    """v_cache is the first block_d dims of k_cache's rows (MLA latent), so V tiles = K tiles."""
    return (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
            and v_cache.shape[-1] == block_d)


def num_decode_splits(batch: int, kv_programs: int, max_seq_len: int, device: torch.device,
                      programs_per_sm: int = 2) -> int:
    """Enough splits to give every SM about `programs_per_sm` programs, but no split under
    MIN_TOKENS_PER_SPLIT tokens (merging costs more than it saves there)."""
    want = triton.cdiv(programs_per_sm * sm_count(device), max(batch * kv_programs, 1))
    by_len = triton.cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_len, MAX_SPLITS))


@register("paged_attention", "triton")
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int = 0, max_seq_len: int = 0) -> torch.Tensor:
    """q [T, H, D] over the cached keys/values (new tokens already written) -> [T, H, Dv].

    `max_query_len` / `max_seq_len` are host ints; when left at 0 they are read from the
    device tensors (one sync), so callers on the hot path should pass them."""
    n_tokens, n_heads, d = q.shape
    n_kv_heads, dv = k_cache.shape[2], v_cache.shape[-1]
    if k_cache.shape[-1] != d or n_heads % n_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}: head dim must "
                         f"match and heads must be a multiple of KV heads")
    if d < 16:  # below the smallest tensor-core tile: the torch reference serves (tiny models)
        return torch_paged_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                                     scale, max_query_len, max_seq_len)
    out = q.new_empty(n_tokens, n_heads, dv)
    batch = seq_lens.shape[0]
    if n_tokens == 0 or batch == 0:
        return out
    if max_query_len <= 0:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len <= 0:
        max_seq_len = int(seq_lens.max())
    group = n_heads // n_kv_heads
    block_d, block_dpe = _split_head_dim(d)
    block_dv = next_pow2(dv)
    shared = _shares_kv(k_cache, v_cache, block_d)
    qk_scale = float(scale) * LOG2E
    common = dict(BLOCK_D=block_d, BLOCK_DPE=block_dpe, BLOCK_DV=block_dv, SHARED_KV=shared,
                  DOT_PRECISION=dot_precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype))
    small = interpreting() or q.device.type != "cuda"
    big_head = block_d + block_dpe + block_dv > 512
    if max_query_len == 1:
        cfg = decode_config(big_head, small, group, k_cache.shape[1], device_name(q.device))
        block_h, pps = cfg.pop("BLOCK_H"), cfg.pop("programs_per_sm")
        page_tile = cfg.pop("page_tile")
        head_groups = triton.cdiv(group, block_h)
        programs = n_kv_heads * head_groups
        splits = num_decode_splits(batch, programs, max_seq_len, q.device, pps)
        # each split's normalised output in the activation dtype, its log-sum-exp in fp32: for
        # MLA at batch 64 / 4k context the fp32 round trip through the merge was 11% of the
        # cache bytes, and 16-bit partials took the kernel from 79% to 82% of copy bandwidth
        # (H100); the merged output moves by at most one more rounding of the dtype
        mid_o = torch.empty(batch, n_heads, splits, block_dv, dtype=q.dtype, device=q.device)
        mid_lse = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
        _decode_split_kernel[(batch, programs, splits)](
            q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, mid_o, mid_lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
            qk_scale, n_heads, group, head_groups, k_cache.shape[1], d - block_d, dv, splits,
            BLOCK_H=block_h, PAGE_TILE=page_tile,
            **cfg, **common, **pdl_launch(q.device))
        _decode_reduce_kernel[(batch, n_heads)](
            mid_o, mid_lse, query_start_loc, out, out.stride(0), out.stride(1), n_heads, dv, splits,
            BLOCK_S=next_pow2(splits), BLOCK_DV=block_dv, num_warps=4, **pdl_launch(q.device))
        return out
    block_m = 16 if small else (64 if big_head else 128)
    block_n = 16 if small else (32 if big_head else 64)
    stages = 1 if small else 2
    if q.element_size() > 2 and not small:  # fp32 tiles: half the rows, one stage (shared memory)
        block_m, block_n, stages = min(block_m, 64), min(block_n, 32), 1
    _prefill_kernel[(triton.cdiv(max_query_len, block_m), batch, n_heads)](
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, out,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), out.stride(0), out.stride(1),
        block_tables.stride(0), qk_scale, group, k_cache.shape[1], d - block_d, dv,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4 if small else 8, num_stages=stages,
        **common)
    return out
