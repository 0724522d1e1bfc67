"""Tensor-parallel linear layers (Megatron-LM, Shoeybi et al. 2019).

ColumnParallelLinear splits the output features over the TP ranks; RowParallelLinear splits
the input features and all-reduces the partial sums. Each parameter carries a
`weight_loader(param, loaded, shard_id=None)` that copies this rank's slice of a full
checkpoint tensor, so loading never needs to know the layout. Merged layers (gate+up, q+k+v)
stack several checkpoint tensors into one parameter; `shard_id` says which.
With tp_size 1 these are plain `nn.Linear`s.

The weight storage and the GEMM belong to the layer's `quant_method` (vLLM's LinearMethod
idea): `create_weights(layer)` registers the weight parameter(s) and `apply(layer, x, bias)`
computes x W^T (+ bias). The default keeps a `params_dtype` weight and calls `ops.linear`
(cuBLAS, or a Triton GEMV kernel for one row on the triton backend);
layers/quantization.py holds the FP8-block and W8A8-int8 methods, which
`LinearBase.set_quant_method` swaps in after the model is built.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.distributed.parallel_state import ParallelContext, divide, single_process


def check_shape(name: str, param: torch.Tensor, loaded: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"tensor {name}: checkpoint shape {tuple(loaded.shape)} does not match "
                         f"the model's {tuple(param.shape)}")


class UnquantizedLinearMethod:
    """Weight in the model dtype, y = layer.ops.linear(x, W, b)."""

    def create_weights(self, layer: "LinearBase", params_dtype: torch.dtype,
                       device: Optional[torch.device] = None) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features,
                                                dtype=params_dtype, device=device), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader

    def apply(self, layer: "LinearBase", x: torch.Tensor,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return layer.ops.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, in_features: int, out_features: int, bias: bool, params_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.params_dtype = params_dtype
        self.quant_method = UnquantizedLinearMethod()
        self.quant_method.create_weights(self, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=params_dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def set_quant_method(self, method) -> None:
        """Replace the weight parameter(s) with those of `method` (same device), before loading."""
        device = self.weight.device
        del self.weight
        self.quant_method = method
        method.create_weights(self, self.params_dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def plain_weight(self) -> Optional[torch.Tensor]:
        """W when this layer's forward is exactly x W^T on this rank (unquantized, no bias,
        nothing gathered or reduced across ranks), so a caller may fuse it into another
        kernel; else None. Asked after loading (the callers' `process_weights_after_loading`):
        quantization swaps the method after the build."""
        if not isinstance(self.quant_method, UnquantizedLinearMethod) or self.bias is not None \
                or self.crosses_ranks():
            return None
        return self.weight

    def crosses_ranks(self) -> bool:
        """Whether forward gathers or reduces its output over the TP group."""
        return False


class ReplicatedLinear(LinearBase):
    """Full weight on every rank (e.g. MLA's low-rank down projections, the MoE gate)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None):
        super().__init__(in_features, out_features, bias, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        check_shape(getattr(param, "param_name", "?"), param, loaded)
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's output rows split over TP ranks; `output_sizes` lists the stacked
    checkpoint tensors (one entry for a plain layer) so each is split on its own."""

    def __init__(self, in_features: int, output_sizes: Sequence[int] | int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None,
                 gather_output: bool = False):
        self.pctx = pctx or single_process()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.local_sizes = [divide(s, self.pctx.tp_size, "output features") for s in self.output_sizes]
        self.gather_output = gather_output
        super().__init__(in_features, sum(self.local_sizes), bias, params_dtype)

    def weight_loader(self, param, loaded, shard_id=None):
        index = 0 if shard_id is None else shard_id
        size, offset = self.local_sizes[index], sum(self.local_sizes[:index])
        full = self.output_sizes[index]
        expected = (full,) + tuple(param.shape[1:])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}[{index}]: checkpoint shape "
                             f"{tuple(loaded.shape)} does not match the model's {expected}")
        shard = loaded.narrow(0, self.pctx.tp_rank * size, size)
        param.data.narrow(0, offset, size).copy_(shard)

    def dummy_shards(self):
        """(parameter, shard id, full checkpoint shape) of every checkpoint tensor this layer
        is loaded from: random weights drawn per checkpoint tensor are the same in any layout."""
        for i, size in enumerate(self.output_sizes):
            yield self.weight, i, (size, self.in_features)
            if self.bias is not None:
                yield self.bias, i, (size,)

    def forward(self, x):
        y = self.quant_method.apply(self, x, self.bias)
        return self.pctx.tp_all_gather(y) if self.gather_output else y

    def crosses_ranks(self) -> bool:
        return self.gather_output and self.pctx.tp_size > 1


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate+up)."""


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused; heads split over TP ranks (KV heads replicated when fewer
    KV heads than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, params_dtype: torch.dtype = torch.float32,
                 pctx: Optional[ParallelContext] = None):
        pctx = pctx or single_process()
        self.kv_replicas = max(1, pctx.tp_size // num_kv_heads)
        kv_size = max(num_kv_heads, pctx.tp_size) * head_dim
        super().__init__(hidden_size, [num_heads * head_dim, kv_size, kv_size], bias, params_dtype, pctx)
        self.head_dim, self.num_kv_heads = head_dim, num_kv_heads

    def dummy_shards(self):
        sizes = {"q": self.output_sizes[0], "k": self.num_kv_heads * self.head_dim,
                 "v": self.num_kv_heads * self.head_dim}
        for shard, size in sizes.items():
            yield self.weight, shard, (size, self.in_features)
            if self.bias is not None:
                yield self.bias, shard, (size,)

    def weight_loader(self, param, loaded, shard_id=None):
        index = {"q": 0, "k": 1, "v": 2}[shard_id]
        if index and self.kv_replicas > 1:
            # fewer KV heads than ranks: each rank keeps the one KV head its q heads use
            size = self.local_sizes[index]
            head = self.pctx.tp_rank // self.kv_replicas
            shard = loaded.narrow(0, head * self.head_dim, self.head_dim)
            param.data.narrow(0, sum(self.local_sizes[:index]), size).copy_(shard)
            return
        super().weight_loader(param, loaded, index)


class RowParallelLinear(LinearBase):
    """y = x W^T with W's input columns split over TP ranks; partial sums all-reduced.
    The bias is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None,
                 reduce_results: bool = True):
        self.pctx = pctx or single_process()
        self.reduce_results = reduce_results
        super().__init__(divide(in_features, self.pctx.tp_size, "input features"), out_features,
                         bias, params_dtype)
        self.full_in_features = in_features

    def weight_loader(self, param, loaded, shard_id=None):
        if param.dim() == 1:  # bias: replicated
            check_shape(getattr(param, "param_name", "?"), param, loaded)
            param.data.copy_(loaded)
            return
        expected = (param.shape[0], self.full_in_features)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: checkpoint shape "
                             f"{tuple(loaded.shape)} does not match the model's {expected}")
        size = self.in_features
        param.data.copy_(loaded.narrow(1, self.pctx.tp_rank * size, size))

    def dummy_shards(self):
        yield self.weight, None, (self.out_features, self.full_in_features)

    def forward(self, x):
        y = self.quant_method.apply(self, x)
        if self.reduce_results:
            y = self.pctx.tp_all_reduce(y)
        return y + self.bias if self.bias is not None else y

    def crosses_ranks(self) -> bool:
        return self.reduce_results and self.pctx.tp_size > 1
