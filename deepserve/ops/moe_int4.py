"""Routed experts with 4-bit weights (W4A16 fused MoE), torch reference.

Each expert's matrices are in the layout of ops/int4.py, stacked over experts:
w13 int32 [E, 2I, D/8] (gate rows then up rows), w2 int32 [E, D, I/8], scales [E, rows, groups]
and optional uint8 zero points of the same shape (None: symmetric, z = 8); `groups` gives the
group width of each (w13 over D, w2 over I: one group of the whole row for channel scales).
With activation reordering (GPTQ desc_act) `w13_g_idx` int32 [E, D] and `w2_g_idx` [E, I] map
each input feature of each expert to its group (gate and up share one), and the scales hold
every group of the row (under TP a rank's slice of I keeps all of down's groups). The function
is the one ops.fused_moe computes:

    out[t] = sum_j topk_weights[t, j] * W2[e] (silu(G[e] x_t) * (U[e] x_t)),  e = topk_ids[t, j]

with each expert's weight dequantized per call ((u - z) * s in fp32, rounded to x's dtype),
so on a device without the kernels 4-bit experts give exactly what the same experts holding
the dequantized weights in x's dtype give. Ids outside [0, E) (experts of other EP ranks)
contribute nothing. The Triton kernels (ops/triton/moe_int4.py) are tested against it.

W4A8 experts (compressed-tensors int8 dynamic per-token activations, `act_int8`): each GEMM's
input rows (x for gate/up, h per assignment for down) are quantized to int8 with one scale per
row (amax / 127, as ops.w4a8_linear) and dequantized to x's dtype before the W4A16 product, so
the weights stay packed; no int8 tensor-core MoE kernel exists yet.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from deepserve.ops.int4 import PACK, dequant_int4
from deepserve.ops.moe import expert_batches
from deepserve.ops.quant import quant_int8_rows
from deepserve.ops.registry import register


def check_moe_int4_operands(x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros,
                            groups: tuple[int, int], w13_g_idx=None, w2_g_idx=None) -> None:
    e, two_i, dp = w13.shape
    d, i = x.shape[-1], w2.shape[2] * PACK
    if w13.dtype != torch.int32 or w2.dtype != torch.int32:
        raise ValueError(f"fused_moe_int4: packed weights must be int32, got {w13.dtype} / {w2.dtype}")
    if dp * PACK != d or tuple(w2.shape[:2]) != (e, d) or two_i != 2 * i:
        raise ValueError(f"fused_moe_int4: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit x with "
                         f"{d} features (w13 [E, 2I, D/8], w2 [E, D, I/8])")
    for name, s, z, rows, k, g, g_idx in (("w13", w13_scales, w13_zeros, two_i, d, groups[0], w13_g_idx),
                                          ("w2", w2_scales, w2_zeros, d, i, groups[1], w2_g_idx)):
        if g_idx is not None:
            if tuple(g_idx.shape) != (e, k) or g_idx.is_floating_point():
                raise ValueError(f"fused_moe_int4: {name} g_idx {g_idx.dtype} {tuple(g_idx.shape)}, "
                                 f"expected integers [{e}, {k}]")
            want = (e, rows, s.shape[2])          # every group of the row
        elif k % g:
            raise ValueError(f"fused_moe_int4: {name} group size {g} does not divide its {k} input features")
        else:
            want = (e, rows, k // g)
        if tuple(s.shape) != want or (z is not None and tuple(z.shape) != want):
            raise ValueError(f"fused_moe_int4: {name} scales {tuple(s.shape)} / zeros "
                             f"{None if z is None else tuple(z.shape)}, expected {want}")


def int8_rows_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per row and back, in x's dtype (W4A8's activations)."""
    q, scale = quant_int8_rows(x)
    return (q.to(torch.float32) * scale).to(x.dtype)


@register("fused_moe_int4", "torch")
def fused_moe_int4(x: torch.Tensor, w13: torch.Tensor, w13_scales: torch.Tensor, w13_zeros: Optional[torch.Tensor],
                   w2: torch.Tensor, w2_scales: torch.Tensor, w2_zeros: Optional[torch.Tensor],
                   topk_weights: torch.Tensor, topk_ids: torch.Tensor, groups: tuple[int, int],
                   w13_g_idx: Optional[torch.Tensor] = None, w2_g_idx: Optional[torch.Tensor] = None,
                   act_int8: bool = False) -> torch.Tensor:
    """x [T, D] -> [T, D] in x's dtype (layout and function in the module docstring)."""
    check_moe_int4_operands(x, w13, w13_scales, w13_zeros, w2, w2_scales, w2_zeros, groups, w13_g_idx, w2_g_idx)
    if act_int8:
        x = int8_rows_roundtrip(x)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for expert, rows, weights in expert_batches(topk_ids, topk_weights, w13.shape[0]):
        z13 = None if w13_zeros is None else w13_zeros[expert]
        z2 = None if w2_zeros is None else w2_zeros[expert]
        g13 = None if w13_g_idx is None else w13_g_idx[expert]
        g2 = None if w2_g_idx is None else w2_g_idx[expert]
        w_gate_up = dequant_int4(w13[expert], w13_scales[expert], z13, g13, groups[0], x.dtype)
        w_down = dequant_int4(w2[expert], w2_scales[expert], z2, g2, groups[1], x.dtype)
        gate, up = F.linear(x[rows], w_gate_up).chunk(2, dim=-1)        # [n, I] each
        h = F.silu(gate) * up
        y = F.linear(int8_rows_roundtrip(h) if act_int8 else h, w_down)   # [n, D]
        out.index_add_(0, rows, y.float() * weights[:, None])
    return out.to(x.dtype)
