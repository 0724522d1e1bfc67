"""msModelSlim W8A8 checkpoints (vllm-ascend's DeepSeek-R1-W8A8 guide), served on deepserve's
int8 path on any device.

The folder holds `quant_model_description*.json`: one entry per checkpoint tensor,
"<module>.weight" -> "W8A8" | "W8A8_DYNAMIC" | "FLOAT" (plus bookkeeping keys such as
"model_quant_type"). A quantized module stores

- `weight` int8 [N, K], `weight_scale` [N, 1] and `weight_offset` [N, 1] (per output channel;
  the offset is zero: the weights are symmetric), and for static "W8A8" also
- `input_scale` [1], `input_offset` [1] (one asymmetric int8 quantizer for the activations,
  x_q = clamp(round(x / input_scale + input_offset), -128, 127)),
- `quant_bias` int32 [N] (the offset's correction -input_offset * sum_k W[n, k] and the float
  bias / deq_scale folded into the accumulator) and `deq_scale` [N] = input_scale * weight_scale
  (fp32, or its fp32 bits in an int64 for fp16 models; recomputed here from the two scales).

"W8A8_DYNAMIC" modules run exactly as compressed-tensors W8A8 int8 (per-token dynamic int8
activations, layers/quantization.py's Int8W8A8LinearMethod); "W8A8" modules run the static
quantizer (layers/quantization_modelslim.py, ops.int8_static_linear) as vllm-ascend's
`npu_quant_matmul` does: y = (x_q W^T + quant_bias) * deq_scale. "W8A8_DYNAMIC" routed experts
stay int8 (layers/moe_int8.py). Modules that feed no int8 layer (kv_b_proj, static "W8A8"
experts) are dequantized at load: W = (q - offset) * scale.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from deepserve.quant.fp8 import first_bad_value

METHOD = "msmodelslim-w8a8"
TYPES = ("W8A8", "W8A8_DYNAMIC", "FLOAT")
PARTS = ("weight", "weight_scale", "weight_offset", "input_scale", "input_offset", "quant_bias", "deq_scale")


def description(folder: str | Path) -> Optional[dict[str, str]]:
    """The merged quant_model_description*.json of a checkpoint folder, or None without one."""
    files = sorted(Path(folder).glob("quant_model_description*.json"))
    if not files:
        return None
    desc: dict[str, str] = {}
    for f in files:
        try:
            desc.update(json.loads(f.read_text()))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {f}: {exc}") from None
    return desc


def module_type(desc: dict, module: str) -> str:
    """"W8A8", "W8A8_DYNAMIC" or "FLOAT" for checkpoint module `module`."""
    kind = desc.get(module + ".weight", "FLOAT")
    if kind not in TYPES:
        raise ValueError(f"quant_model_description: {module}.weight is {kind!r}; deepserve serves "
                         f"msModelSlim {', '.join(TYPES)}")
    return kind


def _split(name: str) -> Optional[tuple[str, str]]:
    module, _, part = name.rpartition(".")
    return (module, part) if part in PARTS else None


def dequantize(parts: dict[str, torch.Tensor], module: str, out_dtype: torch.dtype) -> torch.Tensor:
    """A module the model runs in float: (int8 weight - offset) * scale, one scale and offset a row."""
    q, scale = parts["weight"], parts["weight_scale"]
    offset = parts.get("weight_offset")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"tensor {module}.weight is {q.dtype} {tuple(q.shape)}, but quant_model_description "
                         f"says it is quantized: a 2-D int8 weight is expected")
    # an integer scale (all zeros once cast, for real scales) would zero the layer without a word
    for part, t in (("weight_scale", scale), ("weight_offset", offset)):
        if t is None:
            continue
        if t.numel() != q.shape[0] or not t.is_floating_point():
            raise ValueError(f"tensor {module}.{part}: {t.dtype} {tuple(t.shape)} does not match the "
                             f"{q.shape[0]} output rows of {module}.weight (one float a row)")
    w = q.to(torch.float32)
    if offset is not None:
        w = w - offset.reshape(-1, 1).to(torch.float32)
    return (w * scale.reshape(-1, 1).to(torch.float32)).to(out_dtype)


_FLOAT_PARTS = ("weight_scale", "weight_offset", "input_scale", "input_offset")


def _check_values(name: str, part: str, t: torch.Tensor) -> None:
    """A NaN / inf scale or offset would turn its rows (or the whole layer) into NaN without a
    word; a static quantizer's input_scale divides the activations, so it must be > 0."""
    if part not in _FLOAT_PARTS or t.device.type == "meta":
        return
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"tensor {name}: {part} has non-finite values ({first_bad_value(t, positive=False)})")
    if part == "input_scale" and bool((t <= 0).any()):
        raise ValueError(f"tensor {name}: input_scale must be > 0, got {t.reshape(-1)[0].item()}")


def modelslim_stream(weights: Iterable[tuple[str, torch.Tensor]], desc: dict, keep: Callable[[str], bool],
                     out_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors for the model. Quantized modules for which `keep(module)` holds
    pass as stored, less `deq_scale` (recomputed) and `weight_offset` (checked to be zero);
    other quantized modules are dequantized to `<module>.weight` once weight and scale (and
    offset) have come, their activation quantizer dropped."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in weights:
        found = _split(name)
        if found is None or module_type(desc, found[0]) == "FLOAT":
            yield name, t
            continue
        module, part = found
        _check_values(name, part, t)
        if keep(module):
            if part == "weight" and t.dtype != torch.int8:
                raise ValueError(f"tensor {name} is {t.dtype}, but quant_model_description says "
                                 f"{module_type(desc, module)}: an int8 weight is expected")
            if part == "weight_offset":
                if bool((t != 0).any()):
                    raise ValueError(f"tensor {name}: nonzero weight offsets (asymmetric int8 weights) "
                                     f"are not supported on the int8 path")
            elif part != "deq_scale":
                yield name, t
            continue
        if part not in ("weight", "weight_scale", "weight_offset"):
            continue   # the activation quantizer of a layer that now runs in float
        parts = pending.setdefault(module, {})
        parts[part] = t
        if {"weight", "weight_scale", "weight_offset"} <= parts.keys():
            yield module + ".weight", dequantize(pending.pop(module), module, out_dtype)
    for module, parts in sorted(pending.items()):
        if "weight" in parts and "weight_scale" in parts:
            # a checkpoint without weight_offset tensors (symmetric): dequantize what came
            yield module + ".weight", dequantize(parts, module, out_dtype)
        else:
            missing = [p for p in ("weight", "weight_scale") if p not in parts]
            raise ValueError(f"msModelSlim module {module} lacks {', '.join(missing)} in the checkpoint")


def stored_format(folder: str | Path) -> Optional[str]:
    """METHOD when `folder` is an msModelSlim checkpoint, else None."""
    return METHOD if Path(folder).is_dir() and description(folder) is not None else None
