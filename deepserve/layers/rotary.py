"""Rotary embeddings with their scaling variants, as a cos/sin cache per position.

- default: RoFormer (Su et al. 2021), inv_freq_i = base^(-2i/d).
- linear: positions divided by `factor`.
- dynamic: NTK-aware base scaling as vLLM's DynamicNTKScalingRotaryEmbedding fixes it for the
  table: base * (factor * max_position / max_trained_positions - (factor - 1))^(d / (d - 2)),
  which is the plain base when max_trained_positions is not given (transformers rescales only
  past max_position_embeddings, which max_model_len does not pass); with `alpha` instead of
  `factor`, base * alpha^(d / (d - 2)) (vLLM's DynamicNTKAlphaRotaryEmbedding).
- llama3: Llama 3.1's frequency-dependent wavelength scaling.
- yarn: YaRN (Peng et al. 2023) as DeepSeek-V2/V3 use it: frequencies blended between
  interpolation and extrapolation by a linear ramp over the correction range, and cos/sin
  multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim). The matching
  softmax-scale correction lives in the attention (`yarn_softmax_scale`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(head_dim: int, rope_scaling: Optional[dict]) -> float:
    """Attention scale for (q . k): head_dim^-0.5, times mscale_all_dim's mscale squared under
    YaRN (squared because both q and k carry one factor of it in DeepSeek's formulation)."""
    scale = head_dim ** -0.5
    if rope_scaling and rope_scaling.get("rope_type") == "yarn" and rope_scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _dynamic_ntk_base(dim: int, base: float, s: dict, max_position: int) -> float:
    if "alpha" in s:
        return base * s["alpha"] ** (dim / (dim - 2))
    factor, trained = s["factor"], s.get("max_trained_positions", max_position)
    return base * (factor * max_position / trained - (factor - 1)) ** (dim / (dim - 2))


def _llama3_inv_freq(dim: int, base: float, s: dict) -> torch.Tensor:
    inv_freq = _base_inv_freq(dim, base)
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: dict, max_position: int) -> tuple[torch.Tensor, float]:
    factor = s.get("factor")
    orig = s.get("original_max_position_embeddings") or max_position
    if factor is None:
        factor = max_position / orig
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all:
            attn_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all)
        else:
            attn_factor = yarn_get_mscale(factor)
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to the first `rotary_dim` dims of q and k."""

    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, rotary_dim: int, max_position: int, base: float,
                 rope_scaling: Optional[dict] = None, is_neox_style: bool = True):
        super().__init__()
        self.rotary_dim, self.is_neox_style = rotary_dim, is_neox_style
        self._args = (max_position, base, rope_scaling)
        self.register_buffer("cos_sin_cache", self._compute_cache(), persistent=False)  # [max_pos, rotary_dim]

    def rebuild_buffers(self) -> None:
        """Recompute the cache after the module was materialized from the meta device."""
        with torch.device(self.cos_sin_cache.device):
            self.cos_sin_cache = self._compute_cache()

    def _compute_cache(self) -> torch.Tensor:
        target = torch.empty(0).device  # the device the model is being built on
        with torch.device("cpu"):       # frequencies in fp32 on the host, whatever the target
            inv_freq, magnitude = self._frequencies()
            if target.type == "meta":   # only its shape: rebuild_buffers computes it once materialized
                return torch.empty((self._args[0], 2 * inv_freq.numel()), dtype=torch.float32, device=target)
            t = torch.arange(self._args[0], dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            return torch.cat((freqs.cos() * magnitude, freqs.sin() * magnitude), dim=-1).to(target)

    def _frequencies(self) -> tuple[torch.Tensor, float]:
        """The rotation frequencies (rotary_dim / 2) and the factor on cos and sin."""
        max_position, base, rope_scaling = self._args
        rotary_dim = self.rotary_dim
        kind = (rope_scaling or {}).get("rope_type", "default")
        magnitude = 1.0
        if kind == "default":
            inv_freq = _base_inv_freq(rotary_dim, base)
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(rotary_dim, base, rope_scaling)
        elif kind == "yarn":
            inv_freq, magnitude = _yarn_inv_freq(rotary_dim, base, rope_scaling, max_position)
        elif kind == "linear":
            inv_freq = _base_inv_freq(rotary_dim, base) / rope_scaling["factor"]
        elif kind == "dynamic":
            inv_freq = _base_inv_freq(rotary_dim, _dynamic_ntk_base(rotary_dim, base, rope_scaling, max_position))
        else:
            raise ValueError(f"unsupported rope_scaling type {kind!r} "
                             "(supported: default, linear, dynamic, llama3, yarn)")
        return inv_freq, magnitude

    def rotate_(self, positions: torch.Tensor, q: torch.Tensor) -> None:
        """q [T, H, D] rotated in place (q[..., :rotary_dim]); no keys (MLA's prompt rows, whose
        keys the cache holds rotated)."""
        rot = q if q.shape[-1] == self.rotary_dim else q[..., :self.rotary_dim]
        self.ops.rotary_embedding(positions, rot, None, self.cos_sin_cache, self.is_neox_style, inplace=True)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H, D], k [T, Hk, D]; rotates q[..., :rotary_dim] and k[..., :rotary_dim]."""
        if self.rotary_dim == q.shape[-1]:
            return self.ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox_style)
        rd = self.rotary_dim
        q_rot, k_rot = self.ops.rotary_embedding(positions, q[..., :rd], k[..., :rd], self.cos_sin_cache,
                                            self.is_neox_style)
        return torch.cat((q_rot, q[..., rd:]), -1), torch.cat((k_rot, k[..., rd:]), -1)
