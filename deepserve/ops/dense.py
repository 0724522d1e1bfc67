"""Dense linear layer, torch reference: y = x W^T + b in the weight's dtype.

The activation is cast to the weight's dtype first, so one op serves the bf16 projections
and the fp32 MoE router (bf16 activation, fp32 logits). Quantized weights have their own
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
