"""Rotary position embedding (Su et al. 2021) from a cos/sin cache, torch reference.

`cos_sin_cache[pos]` holds [cos(pos * f_i) | sin(pos * f_i)] for the rot_dim/2 frequencies
(any YaRN magnitude scale already folded in). Neox style rotates the two halves of the
rotary dims; interleaved (GPT-J) style rotates adjacent pairs.
"""
from __future__ import annotations

from typing import Optional

import torch

from deepserve.ops.registry import register


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x [T, H, rot_dim]; cos/sin [T, 1, rot_dim/2]
    if is_neox:
        x1, x2 = x.chunk(2, dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        return torch.cat((o1, o2), dim=-1)
    return torch.stack((o1, o2), dim=-1).flatten(-2)


def _cos_sin(cos_sin_cache: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin rows of `positions`, [T, 1, rot_dim / 2] each (broadcast over heads)."""
    return cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """x [T, H, rot_dim] rotated at `positions` (fp32 math, x's dtype out)."""
    cos, sin = _cos_sin(cos_sin_cache, positions)
    return _rotate(x.float(), cos, sin, is_neox).to(x.dtype)


@register("rotary_embedding", "torch")
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: Optional[torch.Tensor],
                     cos_sin_cache: torch.Tensor, is_neox: bool,
                     inplace: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q [T, H, rot_dim], k [T, Hk, rot_dim] (None: q only) -> rotated copies (computed in fp32),
    or with `inplace` q and k themselves, rotated (e.g. the rope part of a wider row, in place)."""
    cos, sin = _cos_sin(cos_sin_cache, positions)     # gathered once for both
    q_rot = _rotate(q.float(), cos, sin, is_neox).to(q.dtype)
    k_rot = None if k is None else _rotate(k.float(), cos, sin, is_neox).to(k.dtype)
    if not inplace:
        return q_rot, k_rot
    q.copy_(q_rot)
    if k is not None:
        k.copy_(k_rot)
    return q, k
