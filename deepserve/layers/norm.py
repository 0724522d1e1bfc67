"""RMSNorm module over the ops library; with a residual it fuses the add."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable


class RMSNorm(nn.Module):
    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
