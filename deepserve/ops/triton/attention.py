"""Paged attention (Triton backend): host-side checks, tile choices and dispatch.

Batches whose rows are all decode rows (`max_query_len == 1`) run the split-KV decode
kernel plus its reduce; any batch with a prefill chunk runs the varlen prefill kernel over
all rows (decode rows are 1-row chunks to it). Launch shapes depend only on tensor shapes
and the host ints `max_query_len` / `max_seq_len`, so the path never syncs with the device
and can be captured in a CUDA graph. Semantics are those of `deepserve.ops.attention`.
"""
from __future__ import annotations

import torch
import triton.language as tl

from deepserve.ops.attention import output_rows
from deepserve.ops.registry import register
from deepserve.ops.triton import launch_config
from deepserve.ops.triton._common import cdiv, dot_dtype, dot_precision, interpreting, next_pow2, nvidia_sm90, pdl_launch, sm_count
from deepserve.ops.triton.attention_decode import (LOG2E, _decode_reduce_kernel, _decode_split_kernel,
                                                   _merge_splits_kernel, _mla_decode_fp8_kernel)
from deepserve.ops.triton.attention_prefill import _prefill_kernel

MAX_SPLITS = 64
# the merge's lse tile: every split count at once (masked), one compile for any context length
REDUCE_SPLITS = next_pow2(MAX_SPLITS)
MIN_TOKENS_PER_SPLIT = 256
DECODE_KEYS = frozenset(("BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "page_tile"))
# MLA decode over an e4m3 latent pool on an NVIDIA sm_90+ GPU runs _mla_decode_fp8_kernel (e4m3
# warp-group MMAs); False sends it to the split kernel every other pool takes (A/B timing in
# benchmarks/bench_r1.py --case kvattn)
MLA_FP8_MMA = True


def table_key(device: torch.device) -> str:
    """Which launch tables apply: the device's own on CUDA; off CUDA the interpreter's small
    tiles (numpy's cost is per operation, and no tensor-core shape constrains them)."""
    return launch_config.device_key(device) if device.type == "cuda" else launch_config.INTERPRETER


def decode_config(mla: bool, group: int, block_size: int, device: str) -> dict:
    """Tile and launch settings of the decode kernel for `group` query heads per KV head over
    `block_size`-token pages, from the launch table (configs/attention_decode/) of the device
    key `device` (`table_key`). BLOCK_H packs the query heads of a KV head into one tile so the
    cache is read once per head group; how each chip's settings were measured:
    docs/PERFORMANCE.md (benchmarks/sweep_mla_decode.py)."""
    cfg = launch_config.lookup("attention_decode", device, mla=mla, heads=max(16, next_pow2(group)),
                               block_size=block_size)
    unknown = set(cfg) - DECODE_KEYS
    if unknown:
        raise ValueError(f"attention_decode launch table sets unknown keys {sorted(unknown)}; "
                         f"known: {sorted(DECODE_KEYS)}")
    # one page id per tile where tiles lie inside pages (BLOCK_N divides the page size); a
    # table may turn it off, not on
    cfg["page_tile"] = cfg.get("page_tile", True) and block_size % cfg["BLOCK_N"] == 0
    if cfg["BLOCK_H"] < 16 or cfg["BLOCK_H"] & (cfg["BLOCK_H"] - 1):
        raise ValueError(f"decode BLOCK_H must be a power of two >= 16, got {cfg['BLOCK_H']}")
    return cfg


@launch_config.memoized
def _decode_launch(mla: bool, group: int, block_size: int, device: str) -> tuple[int, int, bool, dict]:
    """decode_config's BLOCK_H, programs_per_sm and page_tile, and its other settings (the split
    kernel's launch keywords)."""
    cfg = decode_config(mla, group, block_size, device)
    return cfg.pop("BLOCK_H"), cfg.pop("programs_per_sm"), cfg.pop("page_tile"), cfg


def prefill_config(mla: bool, fp32: bool, device: str) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of the varlen prefill kernel, from the launch
    table (configs/attention_prefill/) of the device key `device`: MLA's wide heads and fp32
    tiles take smaller tiles to fit shared memory (docs/PERFORMANCE.md)."""
    return launch_config.lookup("attention_prefill", device, mla=mla, fp32=fp32)


@launch_config.memoized
def _prefill_launch(mla: bool, fp32: bool, device: str) -> tuple[int, dict]:
    """prefill_config's BLOCK_M and its other settings (the kernel's launch keywords)."""
    cfg = prefill_config(mla, fp32, device)
    return cfg.pop("BLOCK_M"), cfg


MIN_DOT_K = 16     # tl.dot's smallest reduction width


def _split_head_dim(d: int) -> tuple[int, int]:
    """A non-power-of-two head dim as a power-of-two main block plus a padded tail block
    (576 -> 512 + 64, 192 -> 128 + 64); the tail is 0 when d is a power of two. Both blocks
    are at least MIN_DOT_K wide: a head narrower than that is one masked block (HEAD_D in the
    kernels), a narrow tail is masked by its own width."""
    if d < MIN_DOT_K:
        return MIN_DOT_K, 0
    main = 1 << (d.bit_length() - 1)
    tail = d - main
    return max(main, MIN_DOT_K), (max(next_pow2(tail), MIN_DOT_K) if tail else 0)


def _shares_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_d: int) -> bool:
    """v_cache is the first block_d dims of k_cache's rows (MLA latent), so V tiles = K tiles."""
    return (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride()
            and v_cache.shape[-1] == block_d)


def num_decode_splits(batch: int, kv_programs: int, max_seq_len: int, device: torch.device,
                      programs_per_sm: int = 2) -> int:
    """Enough splits to give every SM about `programs_per_sm` programs, but no split under
    MIN_TOKENS_PER_SPLIT tokens (merging costs more than it saves there)."""
    want = cdiv(programs_per_sm * sm_count(device), max(batch * kv_programs, 1))
    by_len = cdiv(max(max_seq_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_len, MAX_SPLITS))


@register("paged_attention", "triton")
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    scale: float, max_query_len: int = 0, max_seq_len: int = 0,
                    k_scale: float = 1.0, v_scale: float = 1.0, out: torch.Tensor | None = None,
                    k_pe: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] over the cached keys/values (new tokens already written) -> [T, H, Dv] (written
    into `out` when given). `k_pe` [blocks, bs, Hk or 1, R]: the keys' last R dims kept apart
    (MLA's prefill: the rope part, one for every head), read by the prefill kernel where it lies
    when k_cache's width is the main block of the head dim (_split_head_dim), else joined first.

    `max_query_len` / `max_seq_len` are host ints; when left at 0 they are read from the
    device tensors (one sync), so callers on the hot path should pass them. `k_scale` /
    `v_scale`: an fp8 pool holds key / value divided by them (deepserve.ops.attention)."""
    n_tokens, n_heads, d = q.shape
    n_kv_heads, dv = k_cache.shape[2], v_cache.shape[-1]
    k_width = k_cache.shape[-1] + (0 if k_pe is None else k_pe.shape[-1])
    if k_width != d or n_heads % n_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit k_cache {tuple(k_cache.shape)}"
                         f"{'' if k_pe is None else f' + k_pe {tuple(k_pe.shape)}'}: head dim must "
                         f"match and heads must be a multiple of KV heads")
    if k_pe is not None and (k_pe.dim() != 4 or k_pe.shape[:2] != k_cache.shape[:2]
                             or k_pe.shape[2] not in (1, n_kv_heads)):
        raise ValueError(f"k_pe {tuple(k_pe.shape)} does not fit k_cache {tuple(k_cache.shape)} "
                         f"(want [blocks, block_size, 1 or {n_kv_heads}, R])")
    out = output_rows(out, (n_tokens, n_heads, dv), q)
    batch = seq_lens.shape[0]
    if n_tokens == 0 or batch == 0:
        return out
    if max_query_len <= 0:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_seq_len <= 0:
        max_seq_len = int(seq_lens.max())
    group = n_heads // n_kv_heads
    block_d, block_dpe = _split_head_dim(d)
    if k_pe is not None and (max_query_len == 1 or k_cache.shape[-1] != block_d):   # the decode kernels, or another split
        k_cache, k_pe = torch.cat((k_cache, k_pe.expand(*k_cache.shape[:3], k_pe.shape[-1])), dim=-1), None
    head_d = min(d, block_d)             # the main block's real width: block_d but for tiny heads
    block_dv = next_pow2(dv)
    shared = _shares_kv(k_cache, v_cache, block_d)
    qk_scale = float(scale) * float(k_scale) * LOG2E
    common = dict(BLOCK_D=block_d, BLOCK_DPE=block_dpe, BLOCK_DV=block_dv, SHARED_KV=shared, HEAD_D=head_d,
                  DOT_PRECISION=dot_precision(q.dtype), DOT_DTYPE=dot_dtype(q.dtype))
    device = table_key(q.device)
    big_head = block_d + block_dpe + block_dv > 512      # MLA's latent: 576-wide keys, 512-wide values
    small = interpreting() or q.device.type != "cuda"
    if max_query_len == 1 and _mla_fp8_pool(q, k_cache, shared, block_dpe, small):
        cfg = _mla_fp8_decode_settings(n_heads, batch, max_seq_len, k_cache.shape[1], device)
        if k_cache.shape[1] % cfg["BLOCK_N"] == 0:
            return _mla_fp8_decode(q, k_cache, query_start_loc, seq_lens, block_tables, out, qk_scale,
                                   float(v_scale), max_seq_len, block_d, block_dpe, small, cfg)
    if max_query_len == 1:
        block_h, pps, page_tile, cfg = _decode_launch(big_head, group, k_cache.shape[1], device)
        head_groups = cdiv(group, block_h)
        programs = n_kv_heads * head_groups
        splits = num_decode_splits(batch, programs, max_seq_len, q.device, pps)
        # each split's normalised output in the activation dtype, its log-sum-exp in fp32: an
        # fp32 round trip through the merge costs MLA a tenth of the cache bytes again
        # (docs/PERFORMANCE.md); the merged output moves by at most one more rounding
        mid_o = torch.empty(batch, n_heads, splits, block_dv, dtype=q.dtype, device=q.device)
        mid_lse = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
        _decode_split_kernel[(batch, programs, splits)](
            q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, mid_o, mid_lse,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
            qk_scale, float(v_scale), n_heads, group, head_groups, k_cache.shape[1], d - head_d, dv, splits,
            BLOCK_H=block_h, PAGE_TILE=page_tile,
            **cfg, **common, **pdl_launch(q.device))
        _decode_reduce_kernel[(batch, n_heads)](
            mid_o, mid_lse, query_start_loc, out, out.stride(0), out.stride(1), n_heads, dv, splits,
            BLOCK_S=REDUCE_SPLITS, BLOCK_DV=block_dv, num_warps=4, **pdl_launch(q.device))
        return out
    block_m, cfg = _prefill_launch(big_head, q.element_size() > 2, device)
    # the keys' dims past the main block: k_pe where given (one head for all: a 0 head stride,
    # as its expand to the KV heads would give), else the rest of k_cache's rows
    kp = k_cache[..., head_d:] if k_pe is None else k_pe
    kp_strides = kp.stride()
    if k_pe is not None and k_pe.shape[2] != n_kv_heads:
        kp_strides = (kp_strides[0], kp_strides[1], 0, kp_strides[3])
    _prefill_kernel[(cdiv(max_query_len, block_m), batch, n_heads)](
        q, k_cache, kp, v_cache, query_start_loc, seq_lens, block_tables, out,
        *q.stride(), *k_cache.stride(), *kp_strides, *v_cache.stride(), out.stride(0), out.stride(1),
        block_tables.stride(0), qk_scale, float(v_scale), group, k_cache.shape[1], d - head_d, dv,
        BLOCK_M=block_m, **cfg, **common)
    return out


# splits a merge program loads at once (_merge_splits_kernel): 16 x 512 values over 4 warps
MERGE_CHUNK = 16
FP8_DECODE_KEYS = frozenset(("BLOCK_H", "BLOCK_N", "num_warps", "num_stages", "programs_per_sm", "min_split",
                             "maxnreg", "dv_run", "fused_merge", "qk_promote"))


def mla_fp8_decode_config(heads: int, batch: int, max_seq_len: int, block_size: int, device: str) -> dict:
    """Launch settings of _mla_decode_fp8_kernel for `heads` query heads over one latent head,
    from the launch table (configs/mla_decode_fp8/) of the device key `device` (`table_key`):
    BLOCK_H heads and BLOCK_N keys a program tile, num_warps, num_stages, maxnreg (a cap on
    registers a thread, 0 for none), dv_run (1, 2, 4 or 16: the latent dims a thread reads at
    once for the P.V product, the kernel's DV_RUN; 1 where BLOCK_D is no multiple of
    32 * dv_run * num_warps / 4), qk_promote (the e4m3 QK^T product's partial sums moved into
    fp32 every that many latent dims; 0: the whole product in sm_90's MMA accumulator, which
    keeps fewer bits than fp32), and the split count's inputs (programs_per_sm, min_split: the
    fewest keys a split takes; `fp8_decode_splits`).
    The table's shape variables: heads (a power of two >= 16), batch, ctx (max_seq_len: under
    CUDA graphs the captured maximum, max_model_len, whatever the rows hold) and block_size. How each chip's settings were measured:
    docs/PERFORMANCE.md (benchmarks/sweep_mla_decode.py --fp8)."""
    cfg = launch_config.lookup("mla_decode_fp8", device, heads=max(16, next_pow2(heads)), batch=batch,
                               ctx=max_seq_len, block_size=block_size)
    unknown = set(cfg) - FP8_DECODE_KEYS
    if unknown or len(cfg) != len(FP8_DECODE_KEYS):
        raise ValueError(f"mla_decode_fp8 launch table sets {sorted(cfg)}; it must set exactly "
                         f"{sorted(FP8_DECODE_KEYS)}")
    for key in ("BLOCK_H", "BLOCK_N"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"mla_decode_fp8 {key} must be a power of two >= 16, got {cfg[key]}")
    if cfg["dv_run"] not in (1, 2, 4, 16):
        raise ValueError(f"mla_decode_fp8 dv_run must be 1, 2, 4 or 16, got {cfg['dv_run']}")
    if cfg["fused_merge"] not in (0, 1):
        raise ValueError(f"mla_decode_fp8 fused_merge must be 0 or 1, got {cfg['fused_merge']!r}")
    if cfg["qk_promote"] not in (0, 64, 128, 256):
        raise ValueError(f"mla_decode_fp8 qk_promote must be 0, 64, 128 or 256, got {cfg['qk_promote']!r}")
    return cfg


# mla_fp8_decode_config's settings shared between calls (read, never changed): the layers of a
# step ask with the same shapes, so the table is read and checked once a step, not once a layer
_mla_fp8_decode_settings = launch_config.memoized(mla_fp8_decode_config)


def fp8_decode_splits(batch: int, head_groups: int, max_seq_len: int, block_n: int, sms: int,
                      programs_per_sm: int, min_split: int) -> int:
    """Splits of the context for _mla_decode_fp8_kernel on `sms` SMs: at most `programs_per_sm`
    programs an SM (rounded down, so a wave that fits the SMs is not cut into a full wave and a
    sliver), none under `min_split` keys, at most MAX_SPLITS; then as few as cover max_seq_len
    in the split length the kernel derives (whole BLOCK_N tiles), so the longest row has no
    empty split."""
    want = programs_per_sm * sms // max(batch * head_groups, 1)
    splits = max(1, min(want, cdiv(max(max_seq_len, 1), max(min_split, block_n)), MAX_SPLITS))
    split_len = cdiv(cdiv(max(max_seq_len, 1), splits), block_n) * block_n
    return cdiv(max(max_seq_len, 1), split_len)


def _maxnreg(cfg: dict) -> dict:
    """The launch keyword capping registers a thread, where the table sets a cap."""
    return {"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}


def _mla_fp8_pool(q: torch.Tensor, k_cache: torch.Tensor, shared: bool, block_dpe: int, small: bool) -> bool:
    """An MLA latent pool (one KV head, values a view of the keys, a rope tail) in e4m3, on an
    sm_90+ GPU or interpreted: decode takes _mla_fp8_decode where the page size is a multiple
    of its key tile."""
    return (MLA_FP8_MMA and shared and k_cache.dtype == torch.float8_e4m3fn and k_cache.shape[2] == 1
            and block_dpe > 0 and (small or nvidia_sm90(q.device)))


def _mla_fp8_decode(q, kv_cache, query_start_loc, seq_lens, block_tables, out, qk_scale, v_scale,
                    max_seq_len, block_d, block_dpe, small, cfg):
    """MLA decode rows over an e4m3 latent pool with e4m3 x e4m3 QK^T products
    (attention_decode._mla_decode_fp8_kernel), then the split merge. q is rounded to e4m3 per
    head (a power-of-two scale per head row, so the error is e4m3's 2^-4 relative rounding of q);
    P.V runs in fp16 over the exactly widened latent. Off the GPU (interpreter) the products
    run in fp32 over the same rounded q. `cfg`: mla_fp8_decode_config's settings."""
    batch, n_heads = seq_lens.shape[0], q.shape[1]
    block_h, block_n = cfg["BLOCK_H"], cfg["BLOCK_N"]
    head_groups = cdiv(n_heads, block_h)
    splits = fp8_decode_splits(batch, head_groups, max_seq_len, block_n, sm_count(q.device),
                               cfg["programs_per_sm"], cfg["min_split"])
    mid_o = torch.empty(batch, n_heads, splits, block_d, dtype=q.dtype, device=q.device)
    mid_lse = torch.empty(batch, n_heads, splits, dtype=torch.float32, device=q.device)
    # fused_merge: each row's last split merges (a counter a row and head group, zeroed here)
    # instead of a second launch
    fused = bool(cfg["fused_merge"])
    counts = torch.zeros(batch * head_groups, dtype=torch.int32, device=q.device) if fused else mid_lse
    wide = tl.float32 if small else None
    dv_wg = max(1, cfg["num_warps"] // 4)        # warp groups sharing the P.V product's rows
    _mla_decode_fp8_kernel[(batch, head_groups, splits)](
        q, kv_cache, query_start_loc, seq_lens, block_tables, mid_o, mid_lse, out, counts,
        *q.stride(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(3), block_tables.stride(0),
        out.stride(0), out.stride(1), qk_scale, v_scale, n_heads, kv_cache.shape[1], q.shape[-1] - block_d, block_d,
        splits, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DPE=block_dpe,
        QK_DTYPE=wide or tl.float8e4nv, PV_DTYPE=wide or tl.float16,
        DV_RUN=cfg["dv_run"] if block_d % (32 * cfg["dv_run"] * dv_wg) == 0 else 1, DV_WG=dv_wg,
        FUSED_MERGE=fused, QK_PROMOTE=cfg["qk_promote"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_maxnreg(cfg),
        **pdl_launch(q.device))
    if not fused:
        _merge_splits_kernel[(batch, n_heads)](
            mid_o, mid_lse, query_start_loc, out, out.stride(0), out.stride(1), n_heads, block_d, splits,
            CHUNK_S=MERGE_CHUNK, BLOCK_DV=block_d, num_warps=4, **pdl_launch(q.device))
    return out
