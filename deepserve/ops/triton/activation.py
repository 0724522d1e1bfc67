"""SiLU-and-mul (the SwiGLU gate of Llama/Qwen/DeepSeek MLPs) as a Triton kernel.

x = [gate | up] along the last dim. One program handles a block of columns of one row, so
the kernel reads each input element once and writes the half-width output once: the
bandwidth floor for this op. Rounding matches the torch reference: silu(gate) is rounded to
the input dtype before the product, as F.silu then `*` do in bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.ops.registry import register
from deepserve.ops.triton._common import as_rows, cdiv, next_pow2, pdl_begin, pdl_launch


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, d, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


@register("silu_and_mul", "triton")
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    x2 = as_rows(x)
    if x2.shape[0] == 0 or d == 0:
        return out
    block = min(next_pow2(d), 1024)
    _silu_and_mul_kernel[(x2.shape[0], cdiv(d, block))](
        x2, out.view(-1, d), x2.stride(0), d, d, BLOCK=block, num_warps=4, **pdl_launch(x.device))
    return out
