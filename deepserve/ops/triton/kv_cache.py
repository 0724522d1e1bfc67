"""Scatter new keys/values into the paged KV pool as a Triton kernel.

One program stores one token's heads at its flat slot `block * block_size + offset`; slots
below zero are padding rows (CUDA-graph filler) and store nothing. The pool is addressed
through its strides, so `v_cache` may be a strided view of the same pool (MLA keeps the
512-wide latent as the first dims of the 576-wide key row). Casting to the cache dtype
happens in the store, so an fp8 pool needs no separate conversion pass.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from deepserve.ops.registry import register
from deepserve.ops.triton._common import next_pow2, pdl_begin, pdl_launch, round_to_e4m3


@triton.jit
def to_pool(x, pool_ptr, inv_scale):
    """x / scale (times the host's fp32 1 / scale, as the torch op) in the pool's element type;
    an e4m3 pool saturates at +-448 (the torch op's rule), where the cast alone is not
    saturating on every backend."""
    out_t = pool_ptr.dtype.element_ty
    x = x.to(tl.float32) * inv_scale
    if out_t == tl.float8e4nv:
        # rounded before the cast, which then is exact: the interpreter's cast drops carries
        x = round_to_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0))
    return x.to(out_t)


@triton.jit
def _store_heads(src_ptr, dst_ptr, tok, blk, off, s_t, s_h, s_d, c_b, c_o, c_h, c_d, n_heads, dim, inv_scale,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < dim)
    x = tl.load(src_ptr + tok * s_t + h * s_h + d * s_d, mask=mask)
    tl.store(dst_ptr + blk * c_b + off * c_o + h * c_h + d * c_d, to_pool(x, dst_ptr, inv_scale), mask=mask)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _write_kv_kernel(slot_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr,
                     k_st, k_sh, k_sd, v_st, v_sh, v_sd,
                     kc_b, kc_o, kc_h, kc_d, vc_b, vc_o, vc_h, vc_d,
                     block_size, n_heads, k_dim, v_dim, k_inv, v_inv,
                     HAS_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        _store_heads(k_ptr, kc_ptr, tok, blk, off, k_st, k_sh, k_sd, kc_b, kc_o, kc_h, kc_d,
                     n_heads, k_dim, k_inv, BLOCK_H, BLOCK_DK)
        if HAS_V:
            _store_heads(v_ptr, vc_ptr, tok, blk, off, v_st, v_sh, v_sd, vc_b, vc_o, vc_h, vc_d,
                         n_heads, v_dim, v_inv, BLOCK_H, BLOCK_DV)


def inverse_scale(scale: float) -> float:
    """1 / scale in fp32, the factor both backends multiply by (a scale must be finite and > 0).
    Rounded on the host by numpy (the same round-to-nearest as a float32 tensor's): no tensor
    is made and read back on every layer's call."""
    return float(np.float32(1.0 / float(scale)))


@register("write_kv_cache", "triton")
def write_kv_cache(key: torch.Tensor, value: torch.Tensor | None, k_cache: torch.Tensor,
                   v_cache: torch.Tensor | None, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
    """Store key / k_scale [T, Hk, D] (and value / v_scale) at flat slots `block * block_size + offset`.

    Slots < 0 are padding (e.g. CUDA-graph filler rows) and are skipped."""
    n_tokens, n_heads, k_dim = key.shape
    if k_cache.dim() != 4 or k_cache.shape[2:] != (n_heads, k_dim):
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not hold keys of shape {tuple(key.shape)}")
    has_v = value is not None and v_cache is not None
    v_dim = 0
    if has_v:
        v_dim = value.shape[-1]
        if v_cache.shape[2:] != (n_heads, v_dim):
            raise ValueError(f"v_cache {tuple(v_cache.shape)} does not hold values of shape "
                             f"{tuple(value.shape)}")
    if n_tokens == 0:
        return
    v_args = (value.stride(0), value.stride(1), value.stride(2)) if has_v else (0, 0, 0)
    vc_args = tuple(v_cache.stride()) if has_v else (0, 0, 0, 0)
    _write_kv_kernel[(n_tokens,)](
        slot_mapping, key, value if has_v else key, k_cache, v_cache if has_v else k_cache,
        key.stride(0), key.stride(1), key.stride(2), *v_args, *k_cache.stride(), *vc_args,
        k_cache.shape[1], n_heads, k_dim, v_dim, inverse_scale(k_scale), inverse_scale(v_scale),
        HAS_V=has_v, BLOCK_H=next_pow2(n_heads), BLOCK_DK=next_pow2(k_dim),
        BLOCK_DV=next_pow2(max(v_dim, 1)), num_warps=4, **pdl_launch(key.device))
