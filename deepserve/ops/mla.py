"""MLA decode preparation ops, torch reference (layers/mla.py uses them every step).

These ops gather the small per-layer steps around MLA's latent cache, so a backend can run
each as one kernel:

- `mla_kv_write`: kv_a = [c_kv | k_pe] (kv_a_proj output, one row per token) -> the cache row
  [rms_norm(c_kv) * w | rope(k_pe)] stored at the token's slot (slots < 0 skipped).
- `mla_q_absorb`: q = [q_nope | q_pe] per head -> q_abs = [q_nope W_UK | rope(q_pe)] per head,
  the 576-wide query the absorbed decode attention runs on (DeepSeek-V2 section 2.1).
- `mla_v_up`: the attention output in latent space times W_UV, per head.
- `mla_decode_prep`: `mla_kv_write` and `mla_q_absorb` of the same tokens as one op (a
  decode-only step), so a backend can run both in one launch.

The references compose the existing ones (rms_norm, rotary_embedding, the einsum, cat,
write_kv_cache), so every rounding is the one the unfused layer had.
"""
from __future__ import annotations

import torch

from deepserve.ops.attention import output_rows, write_kv_cache
from deepserve.ops.norm import rms_norm
from deepserve.ops.registry import register
from deepserve.ops.rotary import rope


@register("mla_kv_write", "torch")
def mla_kv_write(kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                 norm_weight: torch.Tensor, eps: float, pool: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scale: float = 1.0) -> None:
    """kv_a [T, C + R] -> pool[slot] = [rms_norm(c_kv) | rope(k_pe)] / kv_scale (pool [blocks, bs, 1, C + R])."""
    c = norm_weight.shape[0]
    kv_c, k_pe = kv_a.split([c, kv_a.shape[-1] - c], dim=-1)
    latent = torch.cat((rms_norm(kv_c, norm_weight, eps),
                        rope(k_pe.unsqueeze(1), positions, cos_sin_cache, is_neox)[:, 0]), dim=-1)
    write_kv_cache(latent.unsqueeze(1), None, pool, None, slot_mapping, kv_scale)


@register("mla_q_absorb", "torch")
def mla_q_absorb(q: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                 w_uk: torch.Tensor) -> torch.Tensor:
    """q [T, H, nope + R], w_uk [H, nope, C] -> q_abs [T, H, C + R] = [q_nope W_UK | rope(q_pe)]."""
    nope = w_uk.shape[1]
    q_nope, q_pe = q.split([nope, q.shape[-1] - nope], dim=-1)
    q_lat = torch.einsum("thd,hdc->thc", q_nope, w_uk)
    return torch.cat((q_lat, rope(q_pe, positions, cos_sin_cache, is_neox)), dim=-1)


@register("mla_v_up", "torch")
def mla_v_up(out_lat: torch.Tensor, w_uv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out_lat [T, H, C], w_uv [H, V, C] -> [T, H, V]: the absorbed attention's output, per head,
    back from the latent to the value space (written into `out` when given)."""
    y = torch.einsum("thc,hvc->thv", out_lat, w_uv)
    return y if out is None else output_rows(out, tuple(y.shape), y).copy_(y)


@register("mla_decode_prep", "torch")
def mla_decode_prep(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    is_neox: bool, w_uk: torch.Tensor, norm_weight: torch.Tensor, eps: float, pool: torch.Tensor,
                    slot_mapping: torch.Tensor, kv_scale: float = 1.0) -> torch.Tensor:
    """mla_kv_write(kv_a, ...) then mla_q_absorb(q, ...) for the same tokens -> q_abs."""
    mla_kv_write(kv_a, positions, cos_sin_cache, is_neox, norm_weight, eps, pool, slot_mapping, kv_scale)
    return mla_q_absorb(q, positions, cos_sin_cache, is_neox, w_uk)
