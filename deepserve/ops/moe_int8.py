"""Routed experts with int8 weights and dynamic per-token int8 activations (W8A8 fused MoE),
torch reference.

Each expert's matrices are int8 with one fp32 scale per output row (quant/int8.py's scheme,
which msModelSlim's "W8A8_DYNAMIC" experts and compressed-tensors W8A8 int8 experts store):
w13 int8 [E, 2I, D] (gate rows then up rows) with w13_scale [E, 2I, 1], w2 int8 [E, D, I] with
w2_scale [E, D, 1]. Each GEMM is `ops.int8_linear` on one expert: its input rows (x for gate /
up, h = silu(gate) * up of each assignment for down) quantized to int8 per row (amax / 127),
the int8 x int8 product accumulated exactly, then scaled by the row's and the output
channel's scales in fp32 and rounded to x's dtype:

    out[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),  e = topk_ids[t, j]

Ids outside [0, E) (experts of other EP ranks) contribute nothing. The Triton kernels
(ops/triton/moe_int8.py) are tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepserve.ops.moe import expert_batches
from deepserve.ops.quant import int8_linear
from deepserve.ops.registry import register


def check_moe_int8_operands(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                            w2_scale: torch.Tensor) -> None:
    if w13.dtype != torch.int8 or w2.dtype != torch.int8:
        raise ValueError(f"fused_moe_int8: weights must be int8, got {w13.dtype} / {w2.dtype}")
    e, two_i, d = w13.shape
    if d != x.shape[-1] or two_i % 2 or tuple(w2.shape) != (e, d, two_i // 2):
        raise ValueError(f"fused_moe_int8: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit x with "
                         f"{x.shape[-1]} features (w13 [E, 2I, D], w2 [E, D, I])")
    for name, s, rows in (("w13_scale", w13_scale, two_i), ("w2_scale", w2_scale, d)):
        if tuple(s.shape) != (e, rows, 1) or s.dtype != torch.float32:
            raise ValueError(f"fused_moe_int8: {name} {s.dtype} {tuple(s.shape)}, expected float32 {(e, rows, 1)} "
                             f"(one scale per output row)")


@register("fused_moe_int8", "torch")
def fused_moe_int8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, D] -> [T, D] in x's dtype (layout and function in the module docstring)."""
    check_moe_int8_operands(x, w13, w13_scale, w2, w2_scale)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for expert, rows, weights in expert_batches(topk_ids, topk_weights, w13.shape[0]):
        gate, up = int8_linear(x[rows], w13[expert], w13_scale[expert]).chunk(2, dim=-1)   # [n, I] each
        y = int8_linear(F.silu(gate) * up, w2[expert], w2_scale[expert])                   # [n, D]
        out.index_add_(0, rows, y.float() * weights[:, None])
    return out.to(x.dtype)
