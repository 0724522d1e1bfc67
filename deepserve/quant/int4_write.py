"""Write a quantized weight (quant/gptq.py's `Int4Weight`) as a 4-bit checkpoint's tensors:
compressed-tensors pack-quantized or AutoAWQ GEMM, by the rules quant/int4.py reads (its
table of packings), and the matching quantization_config.

- compressed-tensors: `weight_packed` int32 [N, K/8] (nibble i of column c: feature 8c + i,
  signed value + 8), `weight_scale` [N, G], `weight_zero_point` int32 [ceil(N/8), G] (rows
  packed, zero point + 8; asymmetric only), `weight_shape` int64 [2], `weight_g_idx` int32 [K]
  (activation order only).
- AutoAWQ GEMM: `qweight` int32 [K, N/8] and `qzeros` int32 [G, N/8] packed along N in AWQ's
  nibble order (0, 2, 4, 6, 1, 3, 5, 7), `scales` [G, N]; always with zero points (z = 8 for
  symmetric weights).
"""
from __future__ import annotations

from typing import Optional

import torch

from deepserve.ops.int4 import PACK, pack_int4
from deepserve.quant.gptq import Int4Weight
from deepserve.quant.int4 import AWQ_ORDER, AWQ_NAMES, CT_NAMES
from deepserve.quant.quantize import compressed_tensors_config, quant_args

FORMATS = ("compressed-tensors", "awq")


def _pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, N] nibbles -> int32 [rows, N/8]: nibble i of int32 c holds column 8c + AWQ_ORDER[i]."""
    rows, n = values.shape
    return pack_int4(values.reshape(rows, n // PACK, PACK)[..., list(AWQ_ORDER)].reshape(rows, n), 1)


def _pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[N, G] nibbles -> int32 [ceil(N/8), G] (rows packed, zero-padded), compressed-tensors' zero points."""
    pad = -values.shape[0] % PACK
    return pack_int4(torch.nn.functional.pad(values, (0, 0, 0, pad)), 0)


def tensor_specs(fmt: str, module: str, n: int, k: int, group_size: int, sym: bool, act_order: bool,
                 scale_dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of the tensors an [n, k] weight of `module` becomes."""
    groups = 1 if group_size == -1 else k // group_size
    if fmt == "awq":
        return [(f"{module}.{AWQ_NAMES['qweight']}", torch.int32, (k, n // PACK)),
                (f"{module}.{AWQ_NAMES['qzeros']}", torch.int32, (groups, n // PACK)),
                (f"{module}.{AWQ_NAMES['scales']}", scale_dtype, (groups, n))]
    out = [(f"{module}.{CT_NAMES['qweight']}", torch.int32, (n, k // PACK)),
           (f"{module}.{CT_NAMES['scales']}", scale_dtype, (n, groups))]
    if not sym:
        out.append((f"{module}.{CT_NAMES['qzeros']}", torch.int32, (-(-n // PACK), groups)))
    out.append((f"{module}.{CT_NAMES['shape']}", torch.int64, (2,)))
    if act_order:
        out.append((f"{module}.{CT_NAMES['g_idx']}", torch.int32, (k,)))
    return out


def weight_tensors(fmt: str, module: str, q: Int4Weight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `module` holding `q` (on the CPU)."""
    u = q.u.cpu()
    n, k = u.shape
    scales = q.scales.cpu()
    zeros = q.zeros.cpu() if q.zeros is not None else None
    if fmt == "awq":
        if q.g_idx is not None:
            raise ValueError("AutoAWQ GEMM has no activation order (g_idx); use compressed-tensors")
        z = zeros if zeros is not None else torch.full_like(scales, 8, dtype=torch.uint8)
        return {f"{module}.qweight": _pack_awq(u.t().contiguous()),
                f"{module}.qzeros": _pack_awq(z.t().contiguous()),
                f"{module}.scales": scales.t().contiguous()}
    out = {f"{module}.{CT_NAMES['qweight']}": pack_int4(u, 1),
           f"{module}.{CT_NAMES['scales']}": scales.contiguous()}
    if zeros is not None:
        out[f"{module}.{CT_NAMES['qzeros']}"] = _pack_rows(zeros)
    out[f"{module}.{CT_NAMES['shape']}"] = torch.tensor([n, k], dtype=torch.int64)
    if q.g_idx is not None:
        out[f"{module}.{CT_NAMES['g_idx']}"] = q.g_idx.cpu().to(torch.int32)
    return out


def quantization_config(fmt: str, group_size: int, sym: bool, act_order: bool, w4a8: bool,
                        ignore: list[str]) -> dict:
    """config.json's quantization_config for the written checkpoint."""
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ignore or None}
    weights = quant_args(4, "channel" if group_size == -1 else "group", dynamic=False, observer="minmax",
                         symmetric=sym, group_size=None if group_size == -1 else group_size,
                         actorder="group" if act_order else None)
    acts: Optional[dict] = quant_args(8, "token", dynamic=True, observer=None) if w4a8 else None
    return compressed_tensors_config("pack-quantized", weights, acts, ignore)
