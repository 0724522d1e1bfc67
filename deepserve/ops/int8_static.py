"""W8A8 int8 with a static activation quantizer (msModelSlim "W8A8", quant/modelslim.py),
torch reference.

x_q = clamp(round(x / input_scale + input_offset), -128, 127) with one scale and offset per
layer; acc = x_q W^T + quant_bias accumulated exactly (int32 on CUDA, float64 elsewhere, as
ops.quant.int8_matmul); y = acc * input_scale * weight_scale[n] in fp32, then the activations'
dtype. `quant_bias` carries -input_offset * sum_k W[n, k] (and any folded float bias), so the
offset costs nothing in the GEMM.
"""
from __future__ import annotations

import torch

from deepserve.ops.quant import int8_matmul
from deepserve.ops.registry import register


def quant_int8_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """x [M, K] float -> int8 [M, K] through one (scale, offset) quantizer."""
    # a tensor divisor (not a Python float) keeps the division IEEE on every device
    q = torch.round(x.to(torch.float32) / input_scale.float() + input_offset.float())
    return q.clamp(-128, 127).to(torch.int8)


@register("int8_static_linear", "torch")
def int8_static_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       input_scale: torch.Tensor, input_offset: torch.Tensor,
                       quant_bias: torch.Tensor) -> torch.Tensor:
    """x [..., K] float, int8 weight [N, K], fp32 weight_scale [N, 1], input_scale / input_offset
    [1], int32 quant_bias [N] -> [..., N] in x's dtype."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or x.shape[-1] != k:
        raise ValueError(f"int8_static_linear: int8 weight [N, {x.shape[-1]}] expected, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if tuple(weight_scale.shape) != (n, 1) or tuple(quant_bias.shape) != (n,):
        raise ValueError(f"int8_static_linear: weight_scale {tuple(weight_scale.shape)} / quant_bias "
                         f"{tuple(quant_bias.shape)} do not match {n} output rows")
    lead = x.shape[:-1]
    xq = quant_int8_static(x.reshape(-1, k), input_scale, input_offset)
    acc = int8_matmul(xq, weight)                                           # [M, N] exact
    acc = acc + quant_bias.to(acc.dtype)
    y = acc.to(torch.float32) * (input_scale.float() * weight_scale.float().t())
    return y.to(x.dtype).reshape(*lead, n)
