"""Dense linear layer, torch reference: y = x W^T + b in the weight's dtype.

The activation is cast to the weight's dtype first, so one op serves the bf16 projections
and the fp32 MoE router (bf16 activation, fp32 logits). `linear_pair` is two of them on the
same input (a backend may run both in one launch). Quantized weights have their own
ops (deepserve/ops/quant.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from deepserve.ops.registry import register


@register("linear", "torch")
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x.to(weight.dtype), weight, bias)


@register("linear_pair", "torch")
def linear_pair(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bias-free linears of the same input: (x W1^T, x W2^T), each in its weight's dtype."""
    return linear(x, w1), linear(x, w2)
