"""MLA decode glue around the attention as Triton kernels (torch reference:
deepserve/ops/mla.py).

Unfused, each MLA layer's step ran rms_norm on c_kv, rope on q_pe and k_pe, a cat of the
latent row, the cache write, the W_UK einsum and a cat of q_abs before the attention, and
the W_UV einsum after it: eight launches of 1.5-5 us for a few KB of data at batch-1 decode.
Here:

- `_kv_write_kernel`, grid (T,): one program per token normalises c_kv (fp32 statistics,
  rounded to the dtype before the weight, as rms_norm), rotates k_pe with the cos/sin row of
  its position, and stores both halves straight into the token's cache slot.
- `_q_absorb_kernel`, grid (cdiv(T, BLOCK_T), H, cdiv(C, BLOCK_C)): q_nope [BLOCK_T, nope]
  times W_UK[h] [nope, BLOCK_C] on tensor cores (fp32 accumulation, one rounding: the
  einsum's), written into q_abs[:, h, :C]; the programs of the first C block also rotate
  q_pe into q_abs[:, h, C:]. Each token block reads W_UK once.
- `_decode_prep_kernel` (`mla_decode_prep`, every decode-only step): the two kernels above
  in one launch, its first T programs writing cache rows and the rest the q-absorb tiles (the
  same bodies): at batch-1 decode a launch costs more than either's work.
- `_v_up_kernel`, grid (cdiv(T, BLOCK_T), H, cdiv(V, BLOCK_V)): the attention output in
  latent space times W_UV[h]^T, back to per-head values, on the programmatic-dependent-launch
  chain of the other decode kernels (the cuBLAS batched GEMM it replaces is not).

W_UK and W_UV (2 MiB each for V2-Lite) are asked into L2 before each kernel's PDL wait
(`_common.prefetch_rows`), where the predecessor leaves memory idle (docs/PERFORMANCE.md).

Rope math is fp32 from the cache row, as the reference; neox pairs i with i + R/2,
interleaved (DeepSeek's MLA rope) pairs 2i with 2i + 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.ops.attention import output_rows
from deepserve.ops.triton.kv_cache import inverse_scale, to_pool
from deepserve.ops.triton import launch_config
from deepserve.ops.triton.launch_config import device_key
from deepserve.ops.registry import register
from deepserve.ops.triton._common import (cdiv, dot_dtype, dot_precision, next_pow2, pdl_begin, pdl_launch, prefetch_rows,
                                          unit_last)


@triton.jit
def _rope_pair_offsets(i, half, IS_NEOX: tl.constexpr):
    if IS_NEOX:
        return i, i + half
    return 2 * i, 2 * i + 1


@triton.jit
def _kv_write_row(tok, kv_ptr, kv_st, pos_ptr, slot_ptr, cs_ptr, cs_st, w_ptr, pool_ptr, p_sb, p_so,
                  block_size, eps, C, half, inv_scale, IS_NEOX: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Token tok's cache row [rms_norm(c_kv) * w | rope(k_pe)] / scale into its slot (none if < 0)."""
    tok = tok.to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        dt = kv_ptr.dtype.element_ty
        dst = pool_ptr + (slot // block_size) * p_sb + (slot % block_size) * p_so
        row = kv_ptr + tok * kv_st
        c = tl.arange(0, BLOCK_C)
        c_ok = c < C
        x = tl.load(row + c, mask=c_ok, other=0.0).to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)).to(dt).to(tl.float32)
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(dst + c, to_pool((w * normed).to(dt), pool_ptr, inv_scale), mask=c_ok)
        i = tl.arange(0, BLOCK_HALF)
        i_ok = i < half
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cos = tl.load(cs_ptr + pos * cs_st + i, mask=i_ok, other=0.0).to(tl.float32)
        sin = tl.load(cs_ptr + pos * cs_st + half + i, mask=i_ok, other=0.0).to(tl.float32)
        d1, d2 = _rope_pair_offsets(i, half, IS_NEOX)
        x1 = tl.load(row + C + d1, mask=i_ok, other=0.0).to(tl.float32)
        x2 = tl.load(row + C + d2, mask=i_ok, other=0.0).to(tl.float32)
        tl.store(dst + C + d1, to_pool((x1 * cos - x2 * sin).to(dt), pool_ptr, inv_scale), mask=i_ok)
        tl.store(dst + C + d2, to_pool((x2 * cos + x1 * sin).to(dt), pool_ptr, inv_scale), mask=i_ok)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _kv_write_kernel(kv_ptr, kv_st, pos_ptr, slot_ptr, cs_ptr, cs_st, w_ptr, pool_ptr, p_sb, p_so,
                     block_size, eps, C, half, inv_scale,
                     IS_NEOX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    _kv_write_row(tl.program_id(0), kv_ptr, kv_st, pos_ptr, slot_ptr, cs_ptr, cs_st, w_ptr, pool_ptr, p_sb, p_so,
                  block_size, eps, C, half, inv_scale, IS_NEOX, BLOCK_C, BLOCK_HALF)


@triton.jit
def _q_absorb_tile(t_block, head, block_c, q_ptr, q_st, q_sh, pos_ptr, cs_ptr, cs_st, w_ptr, w_sh, w_sd,
                   out_ptr, o_st, o_sh, T, NOPE, C, half, IS_NEOX: tl.constexpr, DOT_DTYPE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr):
    """q_abs rows t_block*BLOCK_T.. of one head: latent columns block_c*BLOCK_C.. (plus the
    rotated q_pe when block_c == 0). The W_UK tile is asked into L2 before the PDL wait."""
    head = head.to(tl.int64)
    c_first = block_c * BLOCK_C
    prefetch_rows(w_ptr + head * w_sh + tl.minimum(tl.arange(0, BLOCK_D), NOPE - 1) * w_sd + c_first,
                  tl.minimum(BLOCK_C, C - c_first), LINE, BLOCK_C // LINE, PREFETCH)
    pdl_begin(USE_PDL)
    dt = out_ptr.dtype.element_ty
    toks = (t_block * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = toks < T
    q_rows = q_ptr + toks[:, None] * q_st + head * q_sh
    out_rows = out_ptr + toks[:, None] * o_st + head * o_sh
    d = tl.arange(0, BLOCK_D)
    d_ok = d < NOPE
    c = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    q_nope = tl.load(q_rows + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(w_ptr + head * w_sh + d[:, None] * w_sd + c[None, :], mask=d_ok[:, None] & c_ok[None, :],
                other=0.0)
    q_lat = tl.dot(q_nope.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    tl.store(out_rows + c[None, :], q_lat.to(dt), mask=t_ok[:, None] & c_ok[None, :])
    if block_c == 0:
        i = tl.arange(0, BLOCK_HALF)
        ok = t_ok[:, None] & (i < half)[None, :]
        pos = tl.load(pos_ptr + toks, mask=t_ok, other=0).to(tl.int64)
        cs_rows = cs_ptr + pos[:, None] * cs_st + i[None, :]
        cos = tl.load(cs_rows, mask=ok, other=0.0).to(tl.float32)
        sin = tl.load(cs_rows + half, mask=ok, other=0.0).to(tl.float32)
        d1, d2 = _rope_pair_offsets(i, half, IS_NEOX)
        x1 = tl.load(q_rows + NOPE + d1[None, :], mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(q_rows + NOPE + d2[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_rows + C + d1[None, :], (x1 * cos - x2 * sin).to(dt), mask=ok)
        tl.store(out_rows + C + d2[None, :], (x2 * cos + x1 * sin).to(dt), mask=ok)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["pos_ptr"])
def _q_absorb_kernel(q_ptr, q_st, q_sh, pos_ptr, cs_ptr, cs_st, w_ptr, w_sh, w_sd, out_ptr, o_st, o_sh,
                     T, NOPE, C, half,
                     IS_NEOX: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HALF: tl.constexpr,
                     USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr):
    _q_absorb_tile(tl.program_id(0), tl.program_id(1), tl.program_id(2), q_ptr, q_st, q_sh, pos_ptr, cs_ptr, cs_st,
                   w_ptr, w_sh, w_sd, out_ptr, o_st, o_sh, T, NOPE, C, half, IS_NEOX, DOT_DTYPE, DOT_PRECISION,
                   BLOCK_T, BLOCK_D, BLOCK_C, BLOCK_HALF, USE_PDL, PREFETCH, LINE)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize=["T"], do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
def _decode_prep_kernel(kv_ptr, kv_st, slot_ptr, nw_ptr, pool_ptr, p_sb, p_so, block_size, eps,
                        q_ptr, q_st, q_sh, pos_ptr, cs_ptr, cs_st, w_ptr, w_sh, w_sd, out_ptr, o_st, o_sh,
                        T, NOPE, C, half, heads, c_blocks, inv_scale,
                        IS_NEOX: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_CW: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
                        PREFETCH: tl.constexpr, LINE: tl.constexpr):
    """A decode step's two MLA prep kernels in one launch: programs 0..T-1 write token pid's
    cache row (`_kv_write_row`), the rest are the q-absorb tiles (t block, head, latent block)."""
    pid = tl.program_id(0)
    if pid < T:
        pdl_begin(USE_PDL)
        _kv_write_row(pid, kv_ptr, kv_st, pos_ptr, slot_ptr, cs_ptr, cs_st, nw_ptr, pool_ptr, p_sb, p_so,
                      block_size, eps, C, half, inv_scale, IS_NEOX, BLOCK_CW, BLOCK_HALF)
    else:
        r = pid - T
        _q_absorb_tile(r // (heads * c_blocks), (r // c_blocks) % heads, r % c_blocks, q_ptr, q_st, q_sh, pos_ptr,
                       cs_ptr, cs_st, w_ptr, w_sh, w_sd, out_ptr, o_st, o_sh, T, NOPE, C, half, IS_NEOX, DOT_DTYPE,
                       DOT_PRECISION, BLOCK_T, BLOCK_D, BLOCK_C, BLOCK_HALF, USE_PDL, PREFETCH, LINE)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize=["T"])
def _v_up_kernel(lat_ptr, l_st, l_sh, w_ptr, w_sh, w_sv, out_ptr, o_st, o_sh, T, C, V,
                 DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
                 LINE: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    toks = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = toks < T
    v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = v < V
    # W_UV rows into L2 before the PDL wait (the latent comes from the attention before)
    prefetch_rows(w_ptr + head * w_sh + tl.minimum(v, V - 1) * w_sv, C, LINE, BLOCK_C // LINE, PREFETCH)
    pdl_begin(USE_PDL)
    acc = tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        lat = tl.load(lat_ptr + toks[:, None] * l_st + head * l_sh + c[None, :],
                      mask=t_ok[:, None] & c_ok[None, :], other=0.0)                  # [T, C]
        w = tl.load(w_ptr + head * w_sh + v[None, :] * w_sv + c[:, None],
                    mask=v_ok[None, :] & c_ok[:, None], other=0.0)                     # [C, V]
        acc = tl.dot(lat.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + toks[:, None] * o_st + head * o_sh + v[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


def _check_rope(rot_dim: int, cos_sin_cache: torch.Tensor) -> None:
    if rot_dim % 2 or cos_sin_cache.shape[-1] != rot_dim:
        raise ValueError(f"rope dims disagree: {rot_dim} rotated, cos_sin_cache {cos_sin_cache.shape[-1]} "
                         f"(must be equal and even)")


def _kv_write_checked(kv_a: torch.Tensor, norm_weight: torch.Tensor, pool: torch.Tensor,
                      cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """kv_a with a unit last stride, C and the rope width, after checking they fit the pool."""
    c = norm_weight.shape[0]
    rot = kv_a.shape[-1] - c
    if pool.shape[-1] != kv_a.shape[-1] or pool.stride(-1) != 1:
        raise ValueError(f"cache rows of {pool.shape[-1]} (unit stride) do not fit kv_a {tuple(kv_a.shape)}")
    _check_rope(rot, cos_sin_cache)
    return unit_last(kv_a), c, rot


def _q_absorb_checked(q: torch.Tensor, w_uk: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[int, int, int]:
    """nope, C and the rope width of q [T, H, nope + R] and w_uk [H, nope, C], after checks."""
    heads, width = q.shape[1], q.shape[2]
    _, nope, c = w_uk.shape
    if w_uk.shape[0] != heads or w_uk.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError(f"w_uk {tuple(w_uk.shape)} does not fit q {tuple(q.shape)} (unit last strides needed)")
    _check_rope(width - nope, cos_sin_cache)
    return nope, c, width - nope


def launch(kernel: str, device: torch.device) -> dict:
    """Launch settings of `kernel` (kv_write, q_absorb, v_up) from the launch table
    (configs/mla_prep/): tiles of one 128-wide latent block, 4 warps (docs/PERFORMANCE.md).
    Shared between calls: read, never changed."""
    return _launch(kernel, device_key(device))


def _launch(kernel: str, device: str) -> dict:
    return launch_config.shared_lookup("mla_prep", device, kernel=kernel)


def _token_block(n_tokens: int, cfg: dict) -> int:
    """Rows of tokens per program: at least one 16-row tensor-core tile, at most BLOCK_T_MAX."""
    return min(cfg["BLOCK_T_MAX"], max(16, next_pow2(n_tokens)))


def _q_absorb_tiles(n_tokens: int, nope: int, rot: int, device: torch.device) -> tuple[dict, int]:
    """(tile sizes, num_warps) of the q-absorb kernel body. Shared between calls: read, never
    changed."""
    return _q_absorb_tiles_of(n_tokens, nope, rot, device_key(device))


@launch_config.memoized
def _q_absorb_tiles_of(n_tokens: int, nope: int, rot: int, device: str) -> tuple[dict, int]:
    cfg = _launch("q_absorb", device)
    return dict(BLOCK_T=_token_block(n_tokens, cfg), BLOCK_D=max(16, next_pow2(nope)), BLOCK_C=cfg["BLOCK_C"],
                BLOCK_HALF=next_pow2(rot // 2)), cfg["num_warps"]


@launch_config.memoized
def _v_up_launch(n_tokens: int, device: str) -> tuple[int, dict]:
    """(BLOCK_T, the other launch keywords) of the v-up kernel for n_tokens rows."""
    cfg = _launch("v_up", device)
    return _token_block(n_tokens, cfg), {k: v for k, v in cfg.items() if k != "BLOCK_T_MAX"}


@register("mla_kv_write", "triton")
def mla_kv_write(kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                 norm_weight: torch.Tensor, eps: float, pool: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scale: float = 1.0) -> None:
    """kv_a [T, C + R] -> pool[slot] = [rms_norm(c_kv) | rope(k_pe)] / kv_scale (pool [blocks, bs, 1, C + R])."""
    kv_a, c, rot = _kv_write_checked(kv_a, norm_weight, pool, cos_sin_cache)
    if kv_a.shape[0] == 0:
        return
    cache = unit_last(cos_sin_cache)
    _kv_write_kernel[(kv_a.shape[0],)](
        kv_a, kv_a.stride(0), positions, slot_mapping, cache, cache.stride(0), norm_weight, pool,
        pool.stride(0), pool.stride(1), pool.shape[1], float(eps), c, rot // 2, inverse_scale(kv_scale),
        IS_NEOX=bool(is_neox), BLOCK_C=next_pow2(c), BLOCK_HALF=next_pow2(rot // 2),
        num_warps=launch("kv_write", kv_a.device)["num_warps"], **pdl_launch(kv_a.device))


@register("mla_q_absorb", "triton")
def mla_q_absorb(q: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                 w_uk: torch.Tensor) -> torch.Tensor:
    """q [T, H, nope + R], w_uk [H, nope, C] -> q_abs [T, H, C + R] = [q_nope W_UK | rope(q_pe)]."""
    n_tokens, heads, _ = q.shape
    nope, c, rot = _q_absorb_checked(q, w_uk, cos_sin_cache)
    out = torch.empty(n_tokens, heads, c + rot, dtype=q.dtype, device=q.device)
    if n_tokens == 0:
        return out
    cache = unit_last(cos_sin_cache)
    tiles, num_warps = _q_absorb_tiles(n_tokens, nope, rot, q.device)
    grid = (cdiv(n_tokens, tiles["BLOCK_T"]), heads, cdiv(c, tiles["BLOCK_C"]))
    _q_absorb_kernel[grid](
        q, q.stride(0), q.stride(1), positions, cache, cache.stride(0), w_uk, w_uk.stride(0), w_uk.stride(1),
        out, out.stride(0), out.stride(1), n_tokens, nope, c, rot // 2,
        IS_NEOX=bool(is_neox), DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype), **tiles,
        num_warps=num_warps, **pdl_launch(q.device, w_uk))
    return out


@register("mla_decode_prep", "triton")
def mla_decode_prep(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    is_neox: bool, w_uk: torch.Tensor, norm_weight: torch.Tensor, eps: float, pool: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scale: float = 1.0) -> torch.Tensor:
    """mla_kv_write of kv_a and mla_q_absorb of q for the same T tokens, in one launch."""
    n_tokens, heads, _ = q.shape
    kv_a, c_kv, rot_kv = _kv_write_checked(kv_a, norm_weight, pool, cos_sin_cache)
    nope, c, rot = _q_absorb_checked(q, w_uk, cos_sin_cache)
    if kv_a.shape[0] != n_tokens or (c_kv, rot_kv) != (c, rot):
        raise ValueError(f"kv_a {tuple(kv_a.shape)} (latent {c_kv}) does not fit q {tuple(q.shape)} and w_uk "
                         f"{tuple(w_uk.shape)}: one row per token, the same latent and rope widths")
    out = torch.empty(n_tokens, heads, c + rot, dtype=q.dtype, device=q.device)
    if n_tokens == 0:
        return out
    cache = unit_last(cos_sin_cache)
    tiles, num_warps = _q_absorb_tiles(n_tokens, nope, rot, q.device)
    c_blocks = cdiv(c, tiles["BLOCK_C"])
    grid = (n_tokens + cdiv(n_tokens, tiles["BLOCK_T"]) * heads * c_blocks,)
    _decode_prep_kernel[grid](
        kv_a, kv_a.stride(0), slot_mapping, norm_weight, pool, pool.stride(0), pool.stride(1), pool.shape[1],
        float(eps), q, q.stride(0), q.stride(1), positions, cache, cache.stride(0), w_uk, w_uk.stride(0),
        w_uk.stride(1), out, out.stride(0), out.stride(1), n_tokens, nope, c, rot // 2, heads, c_blocks,
        inverse_scale(kv_scale),
        IS_NEOX=bool(is_neox), DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_CW=next_pow2(c), **tiles, num_warps=num_warps, **pdl_launch(q.device, w_uk))
    return out


@register("mla_v_up", "triton")
def mla_v_up(out_lat: torch.Tensor, w_uv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out_lat [T, H, C], w_uv [H, V, C] -> [T, H, V] = per head out_lat W_UV^T (tensor cores),
    written into `out` when given."""
    n_tokens, heads, c = out_lat.shape
    v_dim = w_uv.shape[1]
    if w_uv.shape[0] != heads or w_uv.shape[2] != c or w_uv.stride(-1) != 1 or out_lat.stride(-1) != 1:
        raise ValueError(f"w_uv {tuple(w_uv.shape)} does not fit out_lat {tuple(out_lat.shape)} "
                         f"(unit last strides needed)")
    out = output_rows(out, (n_tokens, heads, v_dim), out_lat)
    if n_tokens == 0:
        return out
    block_t, cfg = _v_up_launch(n_tokens, device_key(out_lat.device))
    block_v = cfg["BLOCK_V"]
    grid = (cdiv(n_tokens, block_t), heads, cdiv(v_dim, block_v))
    _v_up_kernel[grid](
        out_lat, out_lat.stride(0), out_lat.stride(1), w_uv, w_uv.stride(0), w_uv.stride(1),
        out, out.stride(0), out.stride(1), n_tokens, c, v_dim,
        DOT_DTYPE=dot_dtype(out_lat.dtype), DOT_PRECISION=dot_precision(out_lat.dtype), BLOCK_T=block_t,
        **cfg, **pdl_launch(out_lat.device, w_uv))
    return out
