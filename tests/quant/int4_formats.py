"""Writers of 4-bit checkpoints by each format's published packing rule, independent of the
loader in deepserve/quant/int4.py (so a shared mistake cannot cancel out):

- AutoAWQ `WQLinear_GEMM.from_linear`: intweight [K, N]; int32 column c, nibble i holds column
  8c + [0, 2, 4, 6, 1, 3, 5, 7][i]; qzeros the same over [K/G, N]; scales [K/G, N].
- AutoGPTQ `QuantLinear.pack`: qweight row r, nibble j holds input row 8r + j; zeros minus one
  packed along N in order (v1); scales [K/G, N]; g_idx [K].
- compressed-tensors `pack_to_int32`: signed values + 8, `packed |= v[:, i::8] << 4i`
  (zero points: rows, `v[i::8, :]`); scales [N, K/G]; `weight_shape`.

`quantize` is a plain round-to-nearest quantizer giving the integers (u, z) and scales s with
W = (u - z) * s, from which the reference float weights are computed.
"""
from __future__ import annotations

import numpy as np
import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.astype(np.uint32)).view(np.int32))


def quantize(w: torch.Tensor, group: int, sym: bool, perm: torch.Tensor | None = None):
    """w [N, K] -> (u int64 [N, K] in 0..15, z int64 [N, G], s fp16 [N, G], g_idx int64 [K]).
    With `perm` (act order) input feature perm[j] is the j-th to be quantized: its group is j // group."""
    n, k = w.shape
    group = k if group == -1 else group
    inv = torch.empty(k, dtype=torch.long)
    order = perm if perm is not None else torch.arange(k)
    inv[order] = torch.arange(k)
    g_idx = inv // group
    groups = k // group
    s = torch.empty(n, groups)
    z = torch.empty(n, groups, dtype=torch.long)
    for gi in range(groups):
        cols = w[:, g_idx == gi]
        if sym:
            s[:, gi] = cols.abs().amax(1).clamp(min=1e-5) / 7.5
            z[:, gi] = 8
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s[:, gi] = ((hi - lo) / 15).clamp(min=1e-5)
            z[:, gi] = torch.round(-lo / s[:, gi]).clamp(1, 15).long()   # 1..15: GPTQ v1 cannot store 0
    s = s.half()
    u = torch.round(w / s.float()[:, g_idx]) + z[:, g_idx]
    return u.clamp(0, 15).long(), z, s, g_idx


def dequantize(u, z, s, g_idx) -> torch.Tensor:
    return (u - z[:, g_idx]).float() * s.float()[:, g_idx]


def awq_tensors(u, z, s) -> dict:
    def pack(intweight: np.ndarray) -> torch.Tensor:       # [rows, N] -> [rows, N/8]
        out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint64)
        for col in range(intweight.shape[1] // 8):
            for i in range(8):
                out[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]].astype(np.uint64) << (i * 4)
        return _to_int32(out)
    return {"qweight": pack(u.t().numpy()), "qzeros": pack(z.t().numpy()), "scales": s.t().contiguous()}


def gptq_tensors(u, z, s, g_idx, v1: bool = True) -> dict:
    intweight = u.t().numpy().astype(np.uint64)            # [K, N]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint64)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    zeros = z.t().numpy().astype(np.int64) - (1 if v1 else 0)  # [G, N]
    zeros = zeros.astype(np.uint64) & 0xF
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint64)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return {"qweight": _to_int32(qweight), "qzeros": _to_int32(qzeros), "scales": s.t().contiguous(),
            "g_idx": g_idx.int()}


def ct_pack(value: torch.Tensor, packed_dim: int = 1) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for 4 bits: int8 values in [-8, 7]."""
    v = (value.to(torch.int8) + 8).to(torch.uint8).numpy().astype(np.uint32)
    if packed_dim == 1:
        packed = np.zeros((v.shape[0], v.shape[1] // 8), dtype=np.uint32)
        for i in range(8):
            packed |= v[:, i::8] << 4 * i
    else:
        pad = -v.shape[0] % 8
        v = np.pad(v, [(0, pad), (0, 0)])
        packed = np.zeros((v.shape[0] // 8, v.shape[1]), dtype=np.uint32)
        for i in range(8):
            packed |= v[i::8, :] << 4 * i
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32))


def ct_tensors(u, z, s, g_idx, sym: bool, act_order: bool) -> dict:
    out = {"weight_packed": ct_pack(u - 8), "weight_scale": s.contiguous(),
           "weight_shape": torch.tensor(list(u.shape))}
    if not sym:
        out["weight_zero_point"] = ct_pack(z - 8, packed_dim=0)
    if act_order:
        out["weight_g_idx"] = g_idx.int()
    return out


def format_tensors(fmt: str, u, z, s, g_idx, sym: bool, act_order: bool) -> dict:
    if fmt == "awq":
        return awq_tensors(u, z, s)
    if fmt == "gptq":
        return gptq_tensors(u, z, s, g_idx)
    return ct_tensors(u, z, s, g_idx, sym, act_order)


def quantization_config(fmt: str, group: int, sym: bool, act_order: bool, skip=(), activations=False) -> dict:
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": list(skip) or None}
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                "sym": sym, "checkpoint_format": "gptq", "modules_to_not_convert": list(skip) or None}
    weights = {"num_bits": 4, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group == -1 else "group",
               "group_size": None if group == -1 else group, "actorder": "group" if act_order else None}
    acts = ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
            if activations else None)
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
            "ignore": ["lm_head", *skip]}
