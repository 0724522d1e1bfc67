"""Symmetric INT8 quantization for W8A8: per-output-channel weights, per-token activations.

Weights: one fp32 scale per output row, scale = amax(|w_row|) / 127, q = round(w / scale)
clamped to [-127, 127] (symmetric, no zero point; -128 is left unused so negation is exact).
Activations are quantized the same way per token (row) at run time, so the GEMM is
int8 x int8 -> int32, rescaled by scale_token x scale_channel. This is the scheme vLLM's
compressed-tensors "W8A8 int8, channel weights, dynamic token activations" serves.
"""
from __future__ import annotations

import torch

from deepserve.ops.quant import INT8_MAX  # noqa: F401  (re-exported)
from deepserve.ops.quant import quant_int8_rows as _quant_rows


def quant_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [N, K] weight to (int8 [N, K], scale fp32 [N, 1]), one scale per output row."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    return _quant_rows(weight)


def quant_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [..., K] -> (int8 [..., K], scale fp32 [..., 1])."""
    if not x.is_floating_point():
        raise ValueError(f"activations must be floating point, got {x.dtype}")
    return _quant_rows(x)


def dequant_int8(q: torch.Tensor, scale: torch.Tensor,
                 out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y = out_dtype(fp32(q) * scale); `scale` broadcasts over rows ([N, 1]) or tokens."""
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    if scale.dim() != q.dim() or scale.shape[-1] != 1 or scale.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not match q {tuple(q.shape)}: "
                         f"expected {tuple(q.shape[:-1]) + (1,)}")
    return (q.to(torch.float32) * scale.to(torch.float32)).to(out_dtype)
