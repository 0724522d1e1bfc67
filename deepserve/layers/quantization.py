"""Quantized linear methods: FP8 block (DeepSeek's format) and W8A8 INT8 (compressed-tensors).

A method owns a linear layer's weight storage and GEMM (the `quant_method` hook of
layers/linear.py); `quantize_linears` swaps one into every Linear the policy quantizes, after
the model is built and before the weights load.

- `Fp8BlockLinearMethod`: e4m3 `weight` [N, K] + fp32 `weight_scale_inv`. DeepSeek stores
  one scale per 128x128 block ([ceil(N/128), ceil(K/128)]); the layer keeps it row-expanded,
  [N, ceil(K/128)] (each row carries its block's scales). That costs 4 bytes per 128 weights
  (3% of the fp8 weight) but lets fused layers (gate+up, q+k+v), TP shards and partial edge
  blocks fall anywhere, not only on 128-row boundaries, with the same numbers. The K
  direction keeps its blocks, so a row-parallel split must fall on a 128 boundary.
  The GEMM quantizes activations per token per 128 group (ops.fp8_block_linear), or, for a
  checkpoint with static activation scales, with its one `input_scale` a layer
  (ops.fp8_static_linear; a fused layer takes its parts' largest).
- `Int8W8A8LinearMethod`: int8 `weight` [N, K] + fp32 `weight_scale` [N, 1] (per output
  channel), dynamic per-token int8 activations (ops.int8_linear).

Each weight loader takes either the checkpoint's quantized tensors (sharded like the weight:
scale rows follow output rows, scale columns follow the 128-blocks of K) or a float tensor,
which it quantizes first with the converter's own rule (quant/fp8.py, quant/int8.py) on the
full checkpoint tensor, so `--quantization fp8` on a BF16 folder gives the same weights as
`deepserve convert quantize --method fp8-block` followed by loading the result.

Which layers stay in the model dtype: the policy of quant/policy.py (embeddings, LM head,
norms, router gate), plus `kv_b_proj`, whose weight MLA's absorbed decode reads directly
(as vLLM does, it is dequantized at load; docs/PERFORMANCE.md measures what fp8 would save),
and MTP's `eh_proj`, which DeepSeek's release keeps in BF16; and the modules a checkpoint's
quantization_config leaves unquantized (quant/ignore.py: fp8 `ignored_layers`, compressed-tensors
`ignore`, ...; `parts_quantized` refuses a fused layer whose parts disagree). MoE routed experts
are not Linear layers: FusedMoE keeps them in fp8 itself (layers/moe.py, models/loader.py), all of
a layer's or none (`experts_quantized`).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Callable, Optional

import torch
from torch import nn

from deepserve.ops.quant import FP8_GROUP
from deepserve.layers.moe import DUMMY_INPUT_AMAX
from deepserve.layers.linear import (ColumnParallelLinear, LinearBase, QKVParallelLinear,
                                     RowParallelLinear, UnquantizedLinearMethod, check_shape)
from deepserve.quant.fp8 import DEFAULT_BLOCK, FP8_DTYPE, FP8_MAX, checked_scale_inv, quant_fp8_block, valid_scales
from deepserve.quant.int8 import quant_int8_per_channel
from deepserve.quant.policy import high_precision_reason

METHODS = ("fp8", "w8a8-int8")
# Linear layers kept in the model dtype beyond quant/policy.py (see the module docstring)
KEEP_HIGH_PRECISION = ("kv_b_proj", "eh_proj")
_EXPERT = re.compile(r"\.experts\.\d+\.")
_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def is_quantized_module(module_name: str) -> bool:
    """Whether the Linear `module_name` (model or checkpoint naming) runs quantized."""
    if _EXPERT.search(f".{module_name}."):
        return False
    if module_name.rsplit(".", 1)[-1] in KEEP_HIGH_PRECISION:
        return False
    return high_precision_reason(module_name + ".weight", torch.float32, (1, 1)) is None


def is_expert_tensor(name: str) -> bool:
    """Whether checkpoint tensor `name` is a routed expert's weight or scale."""
    return bool(_EXPERT.search(f".{name}")) and name.endswith(_SUFFIXES)


def tensor_module(name: str) -> str:
    """The module of checkpoint tensor `name` (a weight or its scale)."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_quantized_tensor(name: str) -> bool:
    """Whether checkpoint tensor `name` (a weight or its scale) feeds a quantized Linear."""
    return name.endswith(_SUFFIXES) and is_quantized_module(tensor_module(name))


def _index(layer: LinearBase, shard_id) -> int:
    if isinstance(layer, QKVParallelLinear):
        return {"q": 0, "k": 1, "v": 2}[shard_id]
    return 0 if shard_id is None else shard_id


def full_rows(layer: LinearBase, shard_id) -> int:
    """Rows of the checkpoint tensor that `shard_id` of `layer` loads from."""
    if isinstance(layer, QKVParallelLinear) and _index(layer, shard_id) and layer.kv_replicas > 1:
        return layer.num_kv_heads * layer.head_dim
    if isinstance(layer, ColumnParallelLinear):
        return layer.output_sizes[_index(layer, shard_id)]
    return layer.out_features


def full_cols(layer: LinearBase) -> int:
    return layer.full_in_features if isinstance(layer, RowParallelLinear) else layer.in_features


class _QuantizedLinearMethod:
    """Shared loading: a float checkpoint tensor is quantized here, then loaded as stored."""

    scale_name = ""

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_scale(self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        raise NotImplementedError

    def attach_loaders(self, layer: LinearBase) -> None:
        layer.weight.weight_loader = functools.partial(self.load_weight, layer)
        scale = getattr(layer, self.scale_name)
        scale.weight_loader = functools.partial(self._load_scale_marked, layer)

    def load_weight(self, layer: LinearBase, param: nn.Parameter, loaded: torch.Tensor, shard_id=None):
        if loaded.dtype == param.dtype:
            layer.weight_loader(param, loaded, shard_id)
            return
        if not loaded.is_floating_point() or loaded.dtype == FP8_DTYPE:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: a {param.dtype} layer cannot "
                             f"load a {loaded.dtype} checkpoint tensor")
        expected = (full_rows(layer, shard_id), full_cols(layer))
        if tuple(loaded.shape) != expected:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: checkpoint shape "
                             f"{tuple(loaded.shape)} does not match the model's {expected}")
        q, scale = self.quantize(loaded.to(param.device))   # the whole tensor, then shard
        layer.weight_loader(param, q, shard_id)
        self._load_scale_marked(layer, getattr(layer, self.scale_name), scale, shard_id)

    def _load_scale_marked(self, layer, param, loaded, shard_id=None):
        self.load_scale(layer, param, loaded, shard_id)
        param.filled = True  # the loader's completeness check counts online-made scales too
        # ... and, of a fused layer's scale, the parts (q / k / v, gate / up) made here
        param.filled_shards = getattr(param, "filled_shards", frozenset()) | {shard_id}

    def quantize_local(self, layer: LinearBase, w: torch.Tensor) -> None:
        """Fill this rank's parameters from a local float weight (random weights)."""
        q, scale = self.quantize(w)
        layer.weight.data.copy_(q)
        self._fill_local_scale(layer, scale)
        getattr(layer, self.scale_name).filled = True

    def _fill_local_scale(self, layer, scale):
        getattr(layer, self.scale_name).data.copy_(scale)


class Fp8BlockLinearMethod(_QuantizedLinearMethod):
    """e4m3 weight + row-expanded fp32 block scales; y = fp8 GEMM with 1x128 activation groups,
    or with `weight_only` (a checkpoint without activation quantization) the weight times the
    unquantized activations (ops.fp8_weight_only_linear: the Triton GEMM reads it as stored, the
    torch op dequantizes it per call). `k_uniform`: the checkpoint's scale is one value a row
    or tensor (compressed-tensors "channel" / "tensor", AutoFP8), the same in every 128-column
    block of a row, so a row-parallel split may fall anywhere (vLLM splits such layers freely):
    each rank's blocks of its slice repeat the row's scale."""

    scale_name = "weight_scale_inv"

    def __init__(self, block: tuple[int, int] = DEFAULT_BLOCK, weight_only: bool = False, static_input: bool = False,
                 k_uniform: bool = False):
        if tuple(block)[1] != FP8_GROUP:
            raise ValueError(f"fp8 weight_block_size {list(block)}: the K block must be "
                             f"{FP8_GROUP} (the activation group size)")
        self.block = tuple(block)
        self.weight_only = weight_only
        self.static_input = static_input
        self.k_uniform = k_uniform

    def create_weights(self, layer: LinearBase, params_dtype: torch.dtype,
                       device: Optional[torch.device] = None) -> None:
        n, k = layer.out_features, layer.in_features
        if isinstance(layer, RowParallelLinear) and layer.pctx.tp_size > 1 and k % self.block[1] \
                and not self.k_uniform:
            full, bk = layer.full_in_features, self.block[1]
            fix = (f"use a tensor-parallel size that divides {full // bk}" if full % bk == 0 and full >= 2 * bk
                   else f"its {full} input features allow no split: use --tensor-parallel-size 1")
            raise ValueError(f"fp8: row-parallel layer with {k} local input features per rank is not "
                             f"a multiple of the {bk}-wide scale block; {fix}")
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE, device=device), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(
            torch.ones(n, math.ceil(k / self.block[1]), dtype=torch.float32, device=device),
            requires_grad=False)
        self.attach_loaders(layer)
        if self.static_input:
            layer.input_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device), requires_grad=False)
            layer.input_scale.weight_loader = self.load_input_scale

    @staticmethod
    def load_input_scale(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        """A checkpoint's static activation scale (one value a module); a fused layer (q/k/v,
        gate/up: one input, one quantization) keeps the largest of its parts', as vLLM does, so
        no part's activations clip more than its calibration allowed."""
        name = getattr(param, "param_name", "?")
        if loaded.numel() != 1:
            raise ValueError(f"tensor {name}: a static input_scale holds one value, got shape {tuple(loaded.shape)}")
        value = loaded.reshape(1).to(param.device, torch.float32)
        if not valid_scales(value):
            raise ValueError(f"tensor {name}: input_scale must be finite and > 0, got {value.item()}")
        seen = getattr(param, "seen_shards", frozenset())
        param.data.copy_(torch.maximum(param.data, value) if seen else value)
        param.seen_shards = seen | {shard_id}

    def quantize(self, w):
        if self.k_uniform:      # one scale a block of rows across the whole row, kept k-uniform
            q, s = quant_fp8_block(w, (self.block[0], w.shape[1]))
            return q, s.expand(-1, math.ceil(w.shape[1] / self.block[1])).contiguous()
        return quant_fp8_block(w, self.block)

    def load_scale(self, layer, param, loaded, shard_id=None):
        rows, cols = full_rows(layer, shard_id), full_cols(layer)
        bn, bk = self.block
        grid = (math.ceil(rows / bn), math.ceil(cols / bk))
        if tuple(loaded.shape) != grid:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: scale shape {tuple(loaded.shape)} "
                             f"does not match a {rows}x{cols} weight in {bn}x{bk} blocks {grid}")
        loaded = checked_scale_inv(loaded, param.device, f"tensor {getattr(param, 'param_name', '?')}")
        expanded = loaded.repeat_interleave(bn, 0)[:rows]                   # [rows, Kb]
        if isinstance(layer, RowParallelLinear) and self.k_uniform:
            if not bool((expanded == expanded[:, :1]).all()):
                raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: scales differ along a row of a "
                                 f"per-tensor / per-channel fp8 layer")
            param.data.copy_(expanded[:, :1].expand(-1, param.shape[1]))
        elif isinstance(layer, RowParallelLinear):
            kb = param.shape[1]
            param.data.copy_(expanded.narrow(1, layer.pctx.tp_rank * kb, kb))
        else:
            layer.weight_loader(param, expanded, shard_id)

    def _fill_local_scale(self, layer, scale):
        n = layer.out_features
        layer.weight_scale_inv.data.copy_(scale.repeat_interleave(self.block[0], 0)[:n])
        if self.static_input:       # random weights: activations up to DUMMY_INPUT_AMAX unclipped
            layer.input_scale.data.fill_(DUMMY_INPUT_AMAX / FP8_MAX)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.static_input:
            return layer.ops.fp8_static_linear(x, layer.weight, layer.weight_scale_inv, layer.input_scale, bias)
        if self.weight_only:
            return layer.ops.fp8_weight_only_linear(x, layer.weight, layer.weight_scale_inv, bias)
        return layer.ops.fp8_block_linear(x, layer.weight, layer.weight_scale_inv, bias)


class Int8W8A8LinearMethod(_QuantizedLinearMethod):
    """int8 weight + per-channel fp32 scale; y = int8 GEMM on per-token int8 activations."""

    scale_name = "weight_scale"

    def create_weights(self, layer: LinearBase, params_dtype: torch.dtype,
                       device: Optional[torch.device] = None) -> None:
        n, k = layer.out_features, layer.in_features
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=torch.int8, device=device), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.ones(n, 1, dtype=torch.float32, device=device),
                                          requires_grad=False)
        self.attach_loaders(layer)

    def quantize(self, w):
        return quant_int8_per_channel(w)

    def load_scale(self, layer, param, loaded, shard_id=None):
        if loaded.dim() == 1:  # some writers store [N]
            loaded = loaded[:, None]
        loaded = loaded.to(param.device, torch.float32)
        if isinstance(layer, RowParallelLinear):  # output rows are whole on every rank
            check_shape(getattr(param, "param_name", "?"), param, loaded)
            param.data.copy_(loaded)
        else:
            layer.weight_loader(param, loaded, shard_id)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return layer.ops.int8_linear(x, layer.weight, layer.weight_scale, bias)


def make_method(name: str, block: tuple[int, int] = DEFAULT_BLOCK, weight_only: bool = False,
                static_input: bool = False, k_uniform: bool = False):
    if name == "fp8":
        return Fp8BlockLinearMethod(block, weight_only, static_input, k_uniform)
    if name == "w8a8-int8":
        return Int8W8A8LinearMethod()
    raise ValueError(f"quantization must be one of {', '.join(METHODS)}, got {name!r}")


def checkpoint_names(model: nn.Module, name: str) -> list[str]:
    """The checkpoint modules a model Linear is loaded from (q/k/v for qkv_proj, ...)."""
    name = getattr(model, "checkpoint_module", lambda n: n)(name)   # the model may rename modules
    parts = [(part, fused) for part, fused, _ in getattr(model, "stacked_params", ())
             if name.endswith("." + fused)]
    return [name[: -len(fused)] + part for part, fused in parts] or [name]


def _one_choice(kinds: dict[str, bool], what: str) -> bool:
    """The one value of `kinds` (checkpoint module -> quantized); parts that disagree are refused."""
    if len(set(kinds.values())) > 1:
        yes = [m for m, k in kinds.items() if k]
        no = [m for m, k in kinds.items() if not k]
        raise ValueError(f"{what}: {', '.join(no[:3])}{' ...' if len(no) > 3 else ''} "
                         f"{'is' if len(no) == 1 else 'are'} left unquantized by the checkpoint but "
                         f"{', '.join(yes[:3])}{' ...' if len(yes) > 3 else ''} "
                         f"{'is' if len(yes) == 1 else 'are'} not; they share one weight, so all or none")
    return next(iter(kinds.values()))


def parts_quantized(name: str, sources: list[str], quantized: Callable[[str], bool]) -> bool:
    """Whether the model Linear `name`, loaded from checkpoint modules `sources` (q/k/v for
    qkv_proj), runs quantized: all its parts are, or none is."""
    return _one_choice({s: bool(quantized(s)) for s in sources}, f"{', '.join(sources)} are fused into {name}"
                       if len(sources) > 1 else name)


def experts_quantized(model: nn.Module, name: str, moe: nn.Module, quantized: Callable[[str], bool]) -> bool:
    """Whether the routed experts of the FusedMoE `name` run quantized: `quantized(checkpoint
    module)` holds for every expert matrix, or for none (they share one stacked tensor)."""
    prefix = getattr(model, "checkpoint_module", lambda n: n)(name)
    kinds = {f"{prefix}.{e}.{p}": bool(quantized(f"{prefix}.{e}.{p}"))
             for e in range(moe.num_experts) for p in EXPERT_PROJECTIONS}
    return _one_choice(kinds, f"routed experts of {prefix}")


def set_methods(model: nn.Module, choose: Callable[[str, list[str]], Optional[object]]) -> list[str]:
    """For every Linear the policy quantizes, `choose(name, checkpoint modules)` gives its
    method (None: it stays in the model dtype); returns the names of those given one."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and is_quantized_module(name):
            method = choose(name, checkpoint_names(model, name))
            if method is not None:
                try:
                    module.set_quant_method(method)
                except ValueError as exc:       # the shape checks know no module name
                    raise ValueError(f"{', '.join(checkpoint_names(model, name))}: {exc}") from None
                names.append(name)
    return names


def quantize_linears(model: nn.Module, method: str, block: tuple[int, int] = DEFAULT_BLOCK,
                     ignore: Callable[[str], bool] = lambda module: False, weight_only: bool = False,
                     static_input: bool = False, k_uniform: bool = False) -> list[str]:
    """Give every Linear that `is_quantized_module` accepts, and whose checkpoint modules
    `ignore` does not name (quant/ignore.py), the `method` (fp8 `weight_only`: activations
    unquantized; `static_input`: quantized with the checkpoint's `input_scale`; `k_uniform`:
    one scale a row or tensor); returns their names."""
    if not any(isinstance(m, LinearBase) and is_quantized_module(n) for n, m in model.named_modules()):
        raise ValueError(f"--quantization {method}: the model has no Linear layer to quantize")
    return set_methods(model, lambda name, sources: make_method(method, block, weight_only, static_input, k_uniform)
                       if parts_quantized(name, sources, lambda s: not ignore(s)) else None)


@torch.no_grad()
def init_dummy_quantized(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights (std `std`) for the quantized layers, quantized layer by layer."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for module in model.modules():
        # methods with their own random fill (4-bit linears and experts: layers/quantization_int4.py)
        method = getattr(module, "quant_method", None) or getattr(module, "quant", None)
        if hasattr(method, "init_dummy"):
            method.init_dummy(module, gen, std)
            continue
        if isinstance(module, LinearBase) and not isinstance(module.quant_method, UnquantizedLinearMethod):
            if module.weight.device.type == "meta":
                continue
            w = torch.randn(module.weight.shape, generator=gen) * std
            module.quant_method.quantize_local(module, w.to(module.weight.device))
