"""Gated activations, torch reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deepserve.ops.registry import register


@register("silu_and_mul", "torch")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]
