"""4-bit weight linear method (W4A16; W4A8 with int8 activations): AWQ, GPTQ and
compressed-tensors pack-quantized checkpoints, kept packed in memory.

The layer's parameters carry the checkpoint's names (`qweight`, `qzeros`, `scales`, `g_idx`
for AWQ / GPTQ; `weight_packed`, `weight_scale`, `weight_zero_point`, `weight_g_idx` for
compressed-tensors, whose `weight_shape` the loading stream checks and drops) so the model's
ordinary loading (stacked q/k/v and gate/up included) finds them, but hold one layout whatever the format (quant/int4.py): each
loader converts the full checkpoint tensor, then keeps this rank's slice:

- column-parallel: output rows, like a float weight (q/k/v and gate/up shards stacked);
- row-parallel: `qweight` columns (8 input features each), scale and zero columns by group,
  which needs the local input features to be a whole number of groups. With activation
  reordering (g_idx) a rank's input features belong to any group, so every rank keeps all
  groups' scales and zero points and its slice of g_idx (as vLLM does); with one group per
  row (channel scales) every rank keeps the one column.

The GEMM is `ops.int4_linear` (W4A16) or `ops.w4a8_linear` (int8 per-token activations).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from deepserve.layers.linear import LinearBase, RowParallelLinear, check_shape
from deepserve.layers.quantization import full_cols, full_rows, is_quantized_module, parts_quantized, set_methods
from deepserve.ops.int4 import PACK
from deepserve.layers.moe_int4 import no_dummy_shards, fill_dummy_int4, int4_expert_module
from deepserve.quant.int4 import Int4Spec, scales_to_memory, weight_to_memory, zeros_to_memory


class Int4LinearMethod:
    """Packed 4-bit weight, per-group scales (and zero points); y = x dequant(W)^T."""

    def __init__(self, spec: Int4Spec):
        self.spec = spec
        # the GEMM's op, chosen once from the checkpoint's activation scheme
        self.gemm = "w4a8_linear" if spec.activations == "int8-token" else "int4_linear"

    def param(self, layer: LinearBase, role: str) -> Optional[nn.Parameter]:
        name = self.spec.names.get(role)
        return getattr(layer, name, None) if name else None

    def create_weights(self, layer: LinearBase, params_dtype: torch.dtype,
                       device: Optional[torch.device] = None) -> None:
        spec = self.spec
        n, k, cols = layer.out_features, layer.in_features, full_cols(layer)
        g = cols if spec.group_size == -1 else spec.group_size
        where = f"{spec.method} layer of {n}x{cols}"
        if cols % g:
            raise ValueError(f"{where}: group size {g} does not divide the {cols} input features")
        if k % PACK:
            raise ValueError(f"{where}: {k} input features per rank are not a multiple of {PACK} "
                             f"(eight 4-bit values per int32)")
        self.split_groups = isinstance(layer, RowParallelLinear) and not spec.act_order and g != cols
        if self.split_groups and k % g:
            raise ValueError(f"{where}: {k} input features per rank are not a whole number of "
                             f"{g}-wide groups; use a tensor-parallel size that divides {cols // g}")
        groups = k // g if self.split_groups else cols // g
        self.group_size = k if groups == 1 else g          # width of a group on this rank
        self.full_groups = cols // g

        def add(role, shape, dtype, fill=0):
            p = nn.Parameter(torch.full(shape, fill, dtype=dtype, device=device), requires_grad=False)
            p.weight_loader = functools.partial(self.load, layer, role)
            setattr(layer, spec.names[role], p)

        layer.dummy_shards = no_dummy_shards   # no 16-bit weight to draw: init_dummy fills the 4-bit one
        add("qweight", (n, k // PACK), torch.int32)
        add("scales", (n, groups), spec.scale_dtype, 1)
        if "qzeros" in spec.required():
            add("qzeros", (n, groups), torch.uint8, 8)
        if spec.act_order:
            add("g_idx", (k,), torch.int32)

    def load(self, layer: LinearBase, role: str, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        spec, name = self.spec, getattr(param, "param_name", "?")
        rows, cols = full_rows(layer, shard_id), full_cols(layer)
        if role == "g_idx":
            self._load_g_idx(layer, param, loaded, name)
            return
        loaded = loaded.to(param.device)
        if role == "qweight":
            t, split = weight_to_memory(spec, loaded, rows, cols, name), True
        elif role == "scales":
            t, split = scales_to_memory(spec, loaded, rows, self.full_groups, name), self.split_groups
        else:
            t, split = zeros_to_memory(spec, loaded, rows, self.full_groups, name), self.split_groups
        if isinstance(layer, RowParallelLinear):
            if split:
                per = param.shape[1]
                t = t.narrow(1, layer.pctx.tp_rank * per, per)
            check_shape(name, param, t)
            param.data.copy_(t)
        else:
            layer.weight_loader(param, t, shard_id)

    def _load_g_idx(self, layer, param, loaded, name):
        cols, k = full_cols(layer), layer.in_features
        if tuple(loaded.shape) != (cols,) or loaded.is_floating_point():
            raise ValueError(f"tensor {name}: g_idx {loaded.dtype} {tuple(loaded.shape)} does not match "
                             f"the model's {cols} input features")
        if int(loaded.min()) < 0 or int(loaded.max()) >= self.full_groups:
            raise ValueError(f"tensor {name}: g_idx values must lie in [0, {self.full_groups}), got "
                             f"[{int(loaded.min())}, {int(loaded.max())}]")
        rank = layer.pctx.tp_rank if isinstance(layer, RowParallelLinear) else 0
        local = loaded.narrow(0, rank * k, k).to(param.device, torch.int32)
        # stacked q/k/v or gate/up share one input: one reordering for all of them
        if getattr(param, "seen", False) and param.device.type != "meta" and not torch.equal(param.data, local):
            raise ValueError(f"tensor {name}: the stacked projections of one layer have different g_idx")
        param.data.copy_(local)
        param.seen = True

    def init_dummy(self, layer: LinearBase, gen: torch.Generator, std: float) -> None:
        fill_dummy_int4(*(self.param(layer, r) for r in ("qweight", "scales", "qzeros")), gen, std)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, s, z, g = (self.param(layer, r) for r in ("qweight", "scales", "qzeros", "g_idx"))
        return getattr(layer.ops, self.gemm)(x, q, s, z, g, self.group_size, bias)


def int4_module(spec: Int4Spec, module: str) -> bool:
    """Whether checkpoint module `module` runs as a 4-bit Linear."""
    return is_quantized_module(module) and not spec.skipped(module)


def int4_kept(spec: Int4Spec, module: str) -> bool:
    """Whether checkpoint module `module` stays 4-bit (a Linear or a routed expert); the
    loader dequantizes the others."""
    return int4_module(spec, module) or int4_expert_module(spec, module)


def quantize_int4_linears(model: nn.Module, spec: Int4Spec) -> list[str]:
    """Give every Linear whose checkpoint modules are 4-bit the int4 method; returns their names."""
    return set_methods(model, lambda name, sources: Int4LinearMethod(spec) if parts_quantized(
        name, sources, functools.partial(int4_module, spec)) else None)
