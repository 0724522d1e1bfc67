"""4-bit weight quantizers: round-to-nearest and GPTQ (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", Algorithm 1).

Both give an `Int4Weight` in the in-memory layout of ops/int4.py (unsigned nibbles u, per-group
scales s and zero points z, W = (u - z) * s, optional g_idx). The grid of a group follows
llm-compressor's min-max observer: symmetric s = amax / 7.5 with z = 8 (signed values -8..7),
asymmetric s = (max - min) / 15 over a range that contains 0, z = round(-min / s). Each scale
is rounded to the checkpoint's scale dtype *before* the integers are chosen, so the stored
(u, z, s) dequantize exactly to the weight the quantizer meant.

GPTQ quantizes the columns (input features) of W one at a time and spreads each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer's
reconstruction loss ||X W^T - X Q^T||^2, H = X^T X over the calibration inputs X. The rows of
W are independent, so stacked projections sharing an input (q/k/v, gate/up) can be quantized
one by one with the same H. With `act_order` the columns go in order of decreasing H diagonal
(the most active inputs first) and groups are formed in that order (GPTQ's desc_act; g_idx
maps each input feature to its group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deepserve.ops.int4 import dequant_int4, pack_int4

# GPTQ's defaults: dampening 1% of the mean Hessian diagonal, lazy batch updates of 128 columns
DAMP = 0.01
BLOCK = 128


@dataclass
class Int4Weight:
    """A quantized [N, K] weight: u uint8 [N, K] (0..15), scales [N, G], zeros uint8 [N, G] or
    None (symmetric, z = 8), g_idx int32 [K] or None (feature k in group k // group_size)."""
    u: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    g_idx: Optional[torch.Tensor]
    group_size: int

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant_int4(pack_int4(self.u, 1), self.scales, self.zeros, self.g_idx, self.group_size, dtype)


def _grid(w: torch.Tensor, sym: bool, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to scale_dtype, held in fp32) and zero point of each row of w [N, g]."""
    if sym:
        s = w.abs().amax(1) / 7.5
        z = torch.full_like(s, 8.0)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        s = (hi - lo) / 15
    s = s.to(scale_dtype).float()
    s = torch.where(s > 0, s, torch.ones_like(s))      # an all-zero group: any scale, u = z
    if not sym:
        z = torch.round(-lo / s).clamp(0, 15)
    return s, z


def _round(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / s) + z, 0, 15)


def _group_width(k: int, group_size: int) -> int:
    if group_size != -1 and (group_size <= 0 or k % group_size):
        raise ValueError(f"group size {group_size} does not divide the {k} input features")
    return k if group_size == -1 else group_size


def rtn_quantize(w: torch.Tensor, group_size: int, sym: bool, scale_dtype: torch.dtype) -> Int4Weight:
    """Round-to-nearest, group by group."""
    n, k = w.shape
    g = _group_width(k, group_size)
    wg = w.float().reshape(n, k // g, g)
    s, z = _grid(wg.reshape(-1, g), sym, scale_dtype)
    s, z = s.reshape(n, k // g, 1), z.reshape(n, k // g, 1)
    u = _round(wg, s, z).reshape(n, k).to(torch.uint8)
    return Int4Weight(u, s[..., 0].to(scale_dtype), None if sym else z[..., 0].to(torch.uint8), None, g)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factors of (H + damp * mean(diag H) * I)^-1, for H [..., K, K]."""
    h = h.clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag += damp * diag.mean(-1, keepdim=True)
    for attempt in range(5):      # a nearly singular H: raise the dampening until it factors
        lower, info = torch.linalg.cholesky_ex(h)
        if not bool(info.any()):
            break
        diag += damp * diag.mean(-1, keepdim=True) * 10 ** attempt
    else:
        raise ValueError("GPTQ: the calibration Hessian is not positive definite even with dampening")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, sym: bool, scale_dtype: torch.dtype,
                  act_order: bool = False, damp: float = DAMP, block: int = BLOCK) -> Int4Weight:
    """GPTQ of w [N, K] given the Hessian h [K, K] = sum of x x^T over calibration inputs x."""
    return gptq_quantize_batch(w[None], h[None], group_size, sym, scale_dtype, act_order, damp, block)[0]


@torch.no_grad()
def gptq_quantize_batch(w: torch.Tensor, h: torch.Tensor, group_size: int, sym: bool, scale_dtype: torch.dtype,
                        act_order: bool = False, damp: float = DAMP, block: int = BLOCK) -> list[Int4Weight]:
    """GPTQ of B independent matrices at once (the routed experts of one projection): w [B, N, K]
    with Hessians h [B, K, K]; one column loop for all of them."""
    b, n, k = w.shape
    g = _group_width(k, group_size)
    if tuple(h.shape) != (b, k, k):
        raise ValueError(f"GPTQ: Hessian {tuple(h.shape)} does not match {b} weights of {k} input features")
    w = w.to(h.device, torch.float32).clone()
    h = h.float().clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0                     # inputs never active in calibration: H row = e_k
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)                     # [B, K]
        w = torch.gather(w, 2, perm[:, None, :].expand(b, n, k))
        h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(b, k, k)), 2, perm[:, None, :].expand(b, k, k))
    hinv = _inverse_hessian_factor(h, damp)                                     # [B, K, K]

    groups = k // g
    u = torch.empty(b, n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(b, n, groups, device=w.device)
    zeros = torch.empty(b, n, groups, device=w.device)

    def grid(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:        # [B, N, g] -> [B, N] each
        s_, z_ = _grid(cols.reshape(b * n, -1), sym, scale_dtype)
        return s_.view(b, n), z_.view(b, n)

    if g == k:                                 # channel strategy: one grid from the whole row
        s, z = grid(w)
        scales[..., 0], zeros[..., 0] = s, z
    block = g * -(-block // g) if g < k else block   # blocks hold whole groups
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].clone()
        err = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            if g < k and col % g == 0:         # the group's grid from its columns as updated so far
                s, z = grid(w1[:, :, j:j + g])
                scales[:, :, col // g], zeros[:, :, col // g] = s, z
            q = _round(w1[:, :, j], s, z)
            u[:, :, col] = q.to(torch.uint8)
            d = hinv[:, col, col][:, None]                                       # [B, 1]
            e = (w1[:, :, j] - (q - z) * s) / d
            w1[:, :, j:] -= e[:, :, None] * hinv[:, None, col, col:i2]
            err[:, :, j] = e
        w[:, :, i2:] -= err @ hinv[:, i1:i2, i2:]

    out = []
    for i in range(b):
        ui, g_idx = u[i], None
        if perm is not None:                   # back to the original feature order
            inv = torch.argsort(perm[i])
            ui = ui[:, inv]
            g_idx = (inv // g).to(torch.int32)
        out.append(Int4Weight(ui.contiguous(), scales[i].to(scale_dtype), None if sym else zeros[i].to(torch.uint8),
                              g_idx, g))
    return out
