"""4-bit weights (W4A16), torch reference: y = x dequant(W)^T, W expanded per call.

The in-memory layout every 4-bit checkpoint format is converted to at load (quant/int4.py):
`qweight` int32 [N, K/8], nibble i of column c holding input feature 8c + i as an unsigned
value u in 0..15; `scales` [N, S] (fp16 / bf16 / fp32); `zeros` uint8 [N, S] or None for
symmetric weights (z = 8); `g_idx` int32 [K] mapping each input feature to its group
(activation reordering) or None, when feature k belongs to group k // group_size. Then

    W[n, k] = (u[n, k] - z[n, g(k)]) * s[n, g(k)]

`w4a8_linear` is the same weight with int8 per-token activations (compressed-tensors W4A8).

This op is the oracle of the Triton kernels (ops/triton/int4_gemm.py): it expands the whole
weight in fp32, rounds it once to the activations' dtype and calls F.linear, so on a device
without the kernels a 4-bit layer gives exactly what the same layer holding the dequantized
weight in that dtype gives.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from deepserve.ops.quant import quant_int8_rows
from deepserve.ops.registry import register

PACK = 8                          # 4-bit values per int32
SEQUENTIAL = tuple(range(PACK))   # the in-memory nibble order


def unpack_int4(packed: torch.Tensor, dim: int, order: tuple[int, ...] = SEQUENTIAL) -> torch.Tensor:
    """int32 tensor -> uint8 nibbles, 8x longer along `dim`: nibble i of packed index c goes
    to index 8c + order[i]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed 4-bit tensor must be int32, got {packed.dtype}")
    p = packed.movedim(dim, -1)
    out = torch.empty(*p.shape, PACK, dtype=torch.uint8, device=p.device)
    for i, col in enumerate(order):
        out[..., col] = ((p >> (4 * i)) & 0xF).to(torch.uint8)
    return out.flatten(-2).movedim(-1, dim)


def pack_int4(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Nibbles (0..15) -> int32, 8x shorter along `dim`, sequential order (the in-memory layout)."""
    v = values.movedim(dim, -1).to(torch.int32)
    if v.shape[-1] % PACK:
        raise ValueError(f"cannot pack {v.shape[-1]} values into int32s of {PACK}")
    v = v.reshape(*v.shape[:-1], -1, PACK)
    out = torch.zeros(v.shape[:-1], dtype=torch.int32, device=v.device)
    for i in range(PACK):
        out |= v[..., i] << (4 * i)   # bit 31 set by i = 7 wraps to a negative int32, as stored
    return out.movedim(-1, dim)




def dequant_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                 g_idx: Optional[torch.Tensor], group_size: int,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The in-memory layout -> float [N, K]: (u - z) * s in fp32 (exact: a 5-bit integer times a
    16-bit scale fits fp32's mantissa), then one rounding to `out_dtype`."""
    u = unpack_int4(qweight, 1).to(torch.float32)                      # [N, K]
    k = u.shape[1]
    group = g_idx.long() if g_idx is not None else torch.arange(k, device=u.device) // group_size
    z = zeros[:, group].to(torch.float32) if zeros is not None else 8.0
    return ((u - z) * scales[:, group].to(torch.float32)).to(out_dtype)


def check_int4_operands(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: Optional[torch.Tensor], g_idx: Optional[torch.Tensor], group_size: int) -> None:
    n, kp = qweight.shape
    k = kp * PACK
    if qweight.dtype != torch.int32:
        raise ValueError(f"int4_linear: qweight must be int32 [N, K/8], got {qweight.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"int4_linear: x has {x.shape[-1]} features, qweight {tuple(qweight.shape)} wants {k}")
    groups = scales.shape[1]
    if scales.shape[0] != n or (zeros is not None and tuple(zeros.shape) != tuple(scales.shape)):
        raise ValueError(f"int4_linear: scales {tuple(scales.shape)} / zeros "
                         f"{None if zeros is None else tuple(zeros.shape)} do not match {n} output rows")
    if g_idx is None and groups * group_size != k:
        raise ValueError(f"int4_linear: {groups} groups of {group_size} do not cover {k} input features")
    if g_idx is not None and g_idx.shape != (k,):
        raise ValueError(f"int4_linear: g_idx shape {tuple(g_idx.shape)}, expected ({k},)")


@register("int4_linear", "torch")
def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                g_idx: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., K] float -> [..., N] in x's dtype (layout in the module docstring)."""
    check_int4_operands(x, qweight, scales, zeros, g_idx, group_size)
    return F.linear(x, dequant_int4(qweight, scales, zeros, g_idx, group_size, x.dtype), bias)


@register("w4a8_linear", "torch")
def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                g_idx: Optional[torch.Tensor], group_size: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W4A8: the 4-bit weight of int4_linear with activations quantized per token to int8
    (symmetric, scale = amax / 127, as ops.quant.int8_linear). y = s_x * sum_k x_q[k] (u - z)[k]
    s[g(k)]: every product of an int8, a 5-bit integer and a 16-bit scale is exact in float64, so
    this reference differs from a kernel summing int32 per group only by the final roundings."""
    check_int4_operands(x, qweight, scales, zeros, g_idx, group_size)
    lead, k = x.shape[:-1], x.shape[-1]
    xq, xs = quant_int8_rows(x.reshape(-1, k))                                 # [M, K], [M, 1]
    u = unpack_int4(qweight, 1).to(torch.float64)
    group = g_idx.long() if g_idx is not None else torch.arange(k, device=u.device) // group_size
    z = zeros[:, group].to(torch.float64) if zeros is not None else 8.0
    w = (u - z) * scales[:, group].to(torch.float64)                          # [N, K]
    y = ((xq.to(torch.float64) @ w.t()) * xs.to(torch.float64)).to(torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, qweight.shape[0])
