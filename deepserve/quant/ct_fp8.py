"""compressed-tensors `float-quantized` FP8 checkpoints (llm-compressor's FP8_DYNAMIC and
FP8_BLOCK schemes, e.g. RedHatAI's R1-Distill *-FP8-dynamic) served by the DeepSeek fp8 path.

Such a checkpoint stores each quantized Linear as an e4m3 `weight` [N, K] with a fp32
`weight_scale`: one value for the tensor (strategy "tensor"), one per output row ("channel",
[N, 1]) or one per 128x128 block ("block", [ceil(N/128), ceil(K/128)]: DeepSeek's own grid).
Every strategy is a special case of the row-expanded block scales the fp8 Linear holds
([N, ceil(K/128)]): "channel" loads as blocks of (1, 128), every block of a row holding that
row's scale, and "tensor" as 128x128 blocks all holding the one scale, so the weights stay e4m3
and run through the same fp8 GEMM. Routed experts keep 128x128 blocks (the fused-MoE kernels'
grid: "tensor" and "block" checkpoints) or, for "channel" ones, one scale a row of each expert
matrix (layers/moe.py; the same kernels, their scales read per row).
Activations: dynamic (per token, quantized by the GEMM per 128-wide group, a finer grid than the
checkpoint's per-token scheme), none (W8A16: `weight_only`, the weight dequantized per call and
the activations kept in the model dtype, as vLLM's CompressedTensorsW8A16Fp8) or static: one
symmetric `input_scale` a Linear (strategy "tensor", dynamic false; with "tensor" or "channel"
weights, as vLLM's CompressedTensorsW8A8Fp8; the fused q/k/v and gate/up take their parts'
largest, as vLLM does). Routed experts with static scales run the fused MoE with one scale a
GEMM, the largest of the layer's experts' (vLLM's a1 / a2 scales; layers/moe.py).
`quant_method` "fp8" checkpoints without `weight_block_size` (AutoFP8's, vLLM's Fp8Config) store
the same per-tensor `weight_scale` and load as the "tensor" strategy, with `activation_scheme`
"static" their `input_scale` too.
Reference: compressed-tensors `QuantizationStrategy`, vLLM `CompressedTensorsW8A8Fp8`, `Fp8Config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from deepserve.quant.fp8 import FP8_DTYPE, first_bad_value, valid_scales
from deepserve.quant.qconfig_fields import describe_schemes, distinct_schemes, group_format

STRATEGIES = ("tensor", "channel", "block")


@dataclass(frozen=True)
class CtFp8Scheme:
    strategy: str
    block: tuple[int, int]          # the scale block the fp8 layers are built with
    weight_only: bool = False       # no input_activations: activations stay unquantized
    static_input: bool = False      # one static `input_scale` a Linear quantizes its activations


def ct_fp8_scheme(qc: dict) -> Optional[CtFp8Scheme]:
    """The FP8 scheme of a compressed-tensors quantization_config, None when its weights are
    not 8-bit floats; one that deepserve cannot serve is refused naming the field."""
    groups = distinct_schemes(qc)
    weights = {n: g.get("weights") or {} for n, g in groups.items()}
    if qc.get("quant_method") != "compressed-tensors" or not any(w.get("type") == "float" for w in weights.values()):
        return None
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors config_groups {sorted(groups)}: deepserve serves one FP8 scheme "
                         f"per checkpoint, not a mix ({describe_schemes(groups)})")
    (name, group), = groups.items()
    w, a = weights[name], group.get("input_activations")
    where = f"compressed-tensors group {name}"
    if (w.get("num_bits"), w.get("type")) != (8, "float"):
        raise ValueError(f"{where}: {w.get('num_bits')}-bit {w.get('type')} weights are not supported; FP8 "
                         f"weights are 8-bit float")
    fmt = group_format(qc, group)
    if fmt not in ("float-quantized", "naive-quantized", None):
        raise ValueError(f"{where}: format {fmt!r} with FP8 weights is not supported (float-quantized)")
    strategy = w.get("strategy")
    if strategy not in STRATEGIES or not w.get("symmetric", True) or w.get("dynamic"):
        raise ValueError(f"{where}: FP8 weights with strategy {strategy!r} (symmetric={w.get('symmetric')}, "
                         f"dynamic={w.get('dynamic')}) are not supported; deepserve serves static symmetric "
                         f"{', '.join(STRATEGIES)} scales")
    static = bool(a) and a.get("dynamic") is False
    if a and ((a.get("num_bits"), a.get("type")) != (8, "float") or a.get("dynamic") not in (True, False)
              or static and (a.get("strategy"), a.get("symmetric", True)) != ("tensor", True)):
        raise ValueError(f"{where}: activations {a.get('num_bits')}-bit {a.get('type')} {a.get('strategy')} "
                         f"(dynamic={a.get('dynamic')}, symmetric={a.get('symmetric')}) are not supported; FP8 "
                         f"weights run with dynamic fp8 activations or static symmetric per-tensor ones")
    if strategy == "block":
        block = tuple(w.get("block_structure") or ())
        if len(block) != 2 or block[1] != 128:
            raise ValueError(f"{where}: block_structure {w.get('block_structure')!r} is not supported; "
                             f"the K block must be 128 (the activation group)")
        if static:
            raise ValueError(f"{where}: 'block' weights with static activations (dynamic=False) are not "
                             f"supported (nor by vLLM): block FP8 runs with dynamic activations")
        return CtFp8Scheme(strategy, block, weight_only=not a)
    # one scale a row ("channel") needs row-high blocks (routed experts keep it per row); one for
    # the tensor fills any grid, so DeepSeek's (routed experts load on the 128x128 grid)
    return CtFp8Scheme(strategy, (1, 128) if strategy == "channel" else (128, 128), weight_only=not a,
                       static_input=static)


def fp8_scale_scheme(qc: dict) -> Optional[CtFp8Scheme]:
    """The scheme whose `weight_scale` tensors the loader renames to DeepSeek's grid: a
    compressed-tensors FP8 one, or `quant_method` "fp8" without `weight_block_size` (AutoFP8,
    vLLM's Fp8Config: one `weight_scale` per tensor, as the "tensor" strategy); None for
    DeepSeek's block format (`weight_scale_inv` as stored) and every other checkpoint."""
    if qc.get("quant_method") == "fp8" and not qc.get("weight_block_size"):
        return CtFp8Scheme("tensor", (128, 128), static_input=qc.get("activation_scheme") == "static")
    return ct_fp8_scheme(qc)


def check_input_scale(name: str, t: torch.Tensor) -> None:
    """A static activation scale: one finite value > 0 (it divides the activations)."""
    if t.numel() != 1 or not t.is_floating_point():
        raise ValueError(f"tensor {name}: a static input_scale holds one floating-point value, got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.device.type != "meta" and not valid_scales(t.float()):
        raise ValueError(f"tensor {name}: input_scale must be finite and > 0, got {t.float().item()}")


def block_scale_inv(scale: torch.Tensor, weight_shape: tuple[int, int], scheme: CtFp8Scheme, name: str) -> torch.Tensor:
    """A checkpoint `weight_scale` -> DeepSeek's `weight_scale_inv` grid of `scheme.block`."""
    n, k = weight_shape
    grid = (math.ceil(n / scheme.block[0]), math.ceil(k / scheme.block[1]))
    scale = scale.to(torch.float32)
    if scale.device.type != "meta" and not valid_scales(scale):    # named here: the layer sees only the grid
        raise ValueError(f"tensor {name}: weight_scale has non-finite or non-positive values ({first_bad_value(scale)})")
    if scheme.strategy == "tensor":
        if scale.numel() != 1:
            raise ValueError(f"tensor {name}: a 'tensor' strategy scale holds one value, got shape "
                             f"{tuple(scale.shape)}")
        return scale.reshape(1, 1).expand(grid).contiguous()
    if scheme.strategy == "channel":
        if tuple(scale.shape) not in ((n, 1), (n,)):
            raise ValueError(f"tensor {name}: a 'channel' strategy scale of a [{n}, {k}] weight is [{n}, 1], "
                             f"got {tuple(scale.shape)}")
        return scale.reshape(n, 1).expand(grid).contiguous()
    return scale                        # block: DeepSeek's grid already (checked by the layer)


def ct_fp8_stream(weights: Iterable[tuple[str, torch.Tensor]], scheme: CtFp8Scheme
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in DeepSeek's fp8 naming: each `<m>.weight_scale` becomes
    `<m>.weight_scale_inv` on the block grid of `scheme.block`, once its e4m3 weight's shape is
    known (only scales and shapes wait: a weight passes at once); a static scheme's
    `<m>.input_scale` passes as stored, checked."""
    shapes: dict[str, tuple[int, int]] = {}
    pending: dict[str, tuple[str, torch.Tensor]] = {}
    for name, t in weights:
        if name.endswith(".weight_scale"):
            base = name[: -len("_scale")]
            if base in shapes:
                yield base + "_scale_inv", block_scale_inv(t, shapes.pop(base), scheme, name)
            else:
                pending[base] = (name, t)
        elif name.endswith(".weight_scale_inv"):
            raise ValueError(f"tensor {name}: a DeepSeek block scale, but the quantization_config names no "
                             f"weight_block_size (fp8 without one stores a weight_scale per tensor); add "
                             f"the checkpoint's block, e.g. \"weight_block_size\": [128, 128]")
        elif name.endswith(".input_scale"):
            if not scheme.static_input:
                raise ValueError(f"tensor {name}: a static activation scale, but the quantization_config "
                                 f"names dynamic activations (or none)")
            check_input_scale(name, t)
            yield name, t
        elif name.endswith(".weight") and t.dtype == FP8_DTYPE:
            yield name, t
            if name in pending:
                scale_name, scale = pending.pop(name)
                yield name + "_scale_inv", block_scale_inv(scale, tuple(t.shape), scheme, scale_name)
            else:
                shapes[name] = tuple(t.shape)
        else:
            yield name, t
    if pending:
        extra = sorted(pending)[0]
        raise ValueError(f"scale tensor {extra}_scale has no {FP8_DTYPE} weight {extra} in the checkpoint")
    if shapes:
        missing = sorted(shapes)[0]
        raise ValueError(f"fp8 tensor {missing} has no {missing}_scale in the checkpoint")
