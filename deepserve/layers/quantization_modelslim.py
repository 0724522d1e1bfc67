"""msModelSlim W8A8 linear methods (format: quant/modelslim.py).

"W8A8_DYNAMIC" layers are deepserve's W8A8 int8 layers (int8 weight, per-channel scale,
per-token dynamic int8 activations). "W8A8" (static) layers keep the checkpoint's activation
quantizer: `input_scale` / `input_offset` (one per layer, replicated on every rank) and
`quant_bias` int32 [N] (rows follow the weight's on column-parallel layers; on a row-parallel
layer rank 0 adds it, the others hold zeros, so the all-reduce adds it once). The float bias
of a static layer is folded into `quant_bias` by msModelSlim, so the layer does not add it
again (as vllm-ascend's npu_quant_matmul path).

Routed experts stored "W8A8_DYNAMIC" (the DeepSeek-R1-W8A8 release's) stay int8 and run the
int8 fused MoE (layers/moe_int8.py); static "W8A8" experts (one activation quantizer per
expert matrix, which vllm-ascend folds into one per layer) are dequantized at load.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from deepserve.layers.linear import LinearBase, RowParallelLinear, check_shape
from deepserve.layers.moe_int8 import int8_experts, is_routed_expert
from deepserve.layers.quantization import Int8W8A8LinearMethod, is_quantized_module, set_methods
from deepserve.quant.modelslim import module_type


class ModelSlimW8A8StaticMethod(Int8W8A8LinearMethod):
    """int8 weight + per-channel scale; activations through the checkpoint's static quantizer."""

    def create_weights(self, layer: LinearBase, params_dtype: torch.dtype,
                       device: Optional[torch.device] = None) -> None:
        super().create_weights(layer, params_dtype, device)

        def add(name, shape, dtype):
            p = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)
            p.weight_loader = functools.partial(self._load_static, layer)
            setattr(layer, name, p)

        add("input_scale", (1,), torch.float32)
        add("input_offset", (1,), torch.float32)
        add("quant_bias", (layer.out_features,), torch.int32)

    def _load_static(self, layer, param, loaded, shard_id=None):
        name = getattr(param, "param_name", "?")
        if param is layer.quant_bias:
            loaded = loaded.reshape(-1).to(param.device)
            if loaded.is_floating_point():
                raise ValueError(f"tensor {name}: quant_bias must be an integer tensor, got {loaded.dtype}")
            if isinstance(layer, RowParallelLinear):
                check_shape(name, param, loaded)
                param.data.copy_(loaded if layer.pctx.tp_rank == 0 else torch.zeros_like(loaded))
            else:
                layer.weight_loader(param, loaded.to(torch.int32), shard_id)
            return
        loaded = loaded.reshape(-1).to(param.device, torch.float32)
        if loaded.numel() != 1:
            raise ValueError(f"tensor {name}: a static activation quantizer has one value, got "
                             f"{loaded.numel()}")
        # stacked q/k/v or gate/up read one input: one quantizer for all of them
        if getattr(param, "seen", False) and param.device.type != "meta" and not torch.equal(param.data, loaded):
            raise ValueError(f"tensor {name}: the stacked projections of one layer have different "
                             f"activation quantizers ({param.item()} and {loaded.item()})")
        param.data.copy_(loaded)
        param.seen = True

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return layer.ops.int8_static_linear(x, layer.weight, layer.weight_scale, layer.input_scale,
                                            layer.input_offset, layer.quant_bias)


def quantize_modelslim_linears(model: nn.Module, desc: dict) -> list[str]:
    """Give every Linear the method of its checkpoint modules' type; returns their names."""
    def choose(name, sources):
        kinds = {module_type(desc, s) for s in sources}
        if len(kinds) > 1:
            raise ValueError(f"quant_model_description: {', '.join(sources)} are fused into {name} but "
                             f"have different types {sorted(kinds)}")
        return {"W8A8_DYNAMIC": Int8W8A8LinearMethod, "W8A8": ModelSlimW8A8StaticMethod}.get(
            kinds.pop(), lambda: None)()
    return set_methods(model, choose)


def quantize_modelslim_experts(model: nn.Module, desc: dict) -> list[str]:
    """Int8 routed experts (layers/moe_int8.py) where the description stores them "W8A8_DYNAMIC";
    returns their names. Experts of another type are dequantized at load."""
    return int8_experts(model, lambda module: module_type(desc, module) == "W8A8_DYNAMIC")


def modelslim_module(desc: dict, module: str) -> bool:
    """Whether checkpoint module `module` runs as an int8 layer or int8 expert (else it is
    dequantized at load)."""
    if is_routed_expert(module):
        return module_type(desc, module) == "W8A8_DYNAMIC"
    return is_quantized_module(module) and module_type(desc, module) != "FLOAT"
