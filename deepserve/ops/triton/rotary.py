"""Rotary position embedding (RoPE) from a cos/sin cache as one Triton kernel for q and k.

One program rotates every head of one token, for q and k together: the cos/sin row of the
token's position is loaded once and reused across heads. Neox style pairs dim i with
i + rot_dim/2; interleaved (GPT-J, DeepSeek's MLA rope) pairs 2i with 2i+1. YaRN needs no
special case: it only changes the cache (frequencies and the folded-in magnitude scale).
Inputs may be strided views (MLA rotates the rope slice of a wider q); outputs are fresh
contiguous tensors as in the torch reference, or with `inplace` the inputs themselves (MLA's
prefill rotates the rope slice of its q rows where they lie). Math in fp32, like the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.registry import register
from deepserve.ops.triton._common import next_pow2, pdl_begin, pdl_launch, unit_last


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, tok, s_t, s_h, s_d, o_t, o_h, o_d, n_heads, cos, sin, half,
                  IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (i < half)
    if IS_NEOX:
        d1 = i
        d2 = i + half
    else:
        d1 = 2 * i
        d2 = 2 * i + 1
    src = src_ptr + tok * s_t + heads * s_h
    x1 = tl.load(src + d1 * s_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + d2 * s_d, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    # every load of the row is done before its stores: dst may be src (in place)
    dst = dst_ptr + tok * o_t + heads * o_h
    tl.store(dst + d1 * o_d, o1.to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + d2 * o_d, o2.to(dst_ptr.dtype.element_ty), mask=mask)


# the step's token counts and views of its inputs (positions, slots) vary from step to step:
# no class of them (scalars in masks and bounds, scalar loads), one compile for every step
@triton.jit(do_not_specialize_on_alignment=["pos_ptr"])
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, q_out_ptr, k_out_ptr,
                   q_st, q_sh, q_sd, k_st, k_sh, k_sd, qo_t, qo_h, qo_d, ko_t, ko_h, ko_d,
                   cache_stride, n_q_heads, n_k_heads, half,
                   IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * cache_stride + i, mask=i < half, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + half + i, mask=i < half, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, tok, q_st, q_sh, q_sd, qo_t, qo_h, qo_d, n_q_heads, cos, sin, half,
                  IS_NEOX, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, tok, k_st, k_sh, k_sd, ko_t, ko_h, ko_d, n_k_heads, cos, sin, half,
                  IS_NEOX, BLOCK_HK, BLOCK_HALF)


@register("rotary_embedding", "triton")
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: Optional[torch.Tensor],
                     cos_sin_cache: torch.Tensor, is_neox: bool,
                     inplace: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q [T, H, rot_dim], k [T, Hk, rot_dim] (None: q only) -> rotated copies (computed in fp32),
    or with `inplace` q and k themselves, rotated."""
    no_k = k is None
    if q.dim() != 3 or (not no_k and k.dim() != 3):
        raise ValueError(f"rotary_embedding wants q [T, H, D] and k [T, Hk, D], got {tuple(q.shape)}, "
                         f"{None if no_k else tuple(k.shape)}")
    rot_dim = q.shape[-1]
    if (not no_k and k.shape[-1] != rot_dim) or cos_sin_cache.shape[-1] != rot_dim or rot_dim % 2:
        raise ValueError(f"rotary dims disagree: q {rot_dim}, k {None if no_k else k.shape[-1]}, "
                         f"cos_sin_cache {cos_sin_cache.shape[-1]} (must be equal and even)")
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = None if no_k else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    n_tokens = positions.shape[0]
    if n_tokens == 0:
        return q_out, None if no_k else k_out
    cache = unit_last(cos_sin_cache)
    half = rot_dim // 2
    if no_k:
        # no key heads: q's pointers and strides in k's place (a [T, 0, D] view of q would pass
        # the same, but costs a view a call); the kernel loads and stores nothing of them
        k, k_out = q, q_out
    k_heads = 0 if no_k else k.shape[1]
    _rotary_kernel[(n_tokens,)](
        positions, q, k, cache, q_out, k_out,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), cache.stride(0),
        q.shape[1], k_heads, half,
        IS_NEOX=bool(is_neox), BLOCK_HQ=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(k_heads),
        BLOCK_HALF=next_pow2(half), num_warps=4, **pdl_launch(q.device))
    return q_out, None if no_k else k_out
