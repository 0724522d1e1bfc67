"""Quantization formats and checkpoint conversions.

Tensor functions (used by the engine's loader and by the converters):
`dequant_fp8_block` / `quant_fp8_block` (DeepSeek's e4m3 + 128x128 fp32 `weight_scale_inv`),
`quant_int8_per_channel` / `quant_int8_per_token` / `dequant_int8` (symmetric W8A8).
Folder conversions (`deepserve convert`): `convert_fp8_to_bf16` and `quantize_checkpoint`
(fp8-block, w8a8-int8, and 4-bit w4a16 / w4a8 by round-to-nearest or GPTQ: quant/quantize_int4.py),
resumable and atomic (see quant/pipeline.py).

The package imports its modules on first use of a name (PEP 562): `deepserve serve` reads
quant/ignore.py while it builds its parser, before torch is imported.
"""
from __future__ import annotations

import importlib

# each name of the package -> the module that defines it
_HOMES = {
    "open_checkpoint": "checkpoint",
    "dequant_fp8_block": "fp8", "quant_fp8_block": "fp8",
    "Fp8ToBf16": "fp8_to_bf16",
    "dequant_int8": "int8", "quant_int8_per_channel": "int8", "quant_int8_per_token": "int8",
    "ConversionReport": "pipeline", "run_conversion": "pipeline",
    "Quantize": "quantize",
    "INT4_METHODS": "quantize_int4", "Int4Options": "quantize_int4", "QuantizeInt4": "quantize_int4",
    "METHODS": "folders", "resolve_device": "folders", "convert_fp8_to_bf16": "folders",
    "quantize_checkpoint": "folders",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:   # a submodule (`from deepserve.quant import pipeline`) is imported by name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)


__all__ = ["METHODS", "INT4_METHODS", "ConversionReport", "Int4Options", "convert_fp8_to_bf16", "dequant_fp8_block",
           "dequant_int8", "quant_fp8_block", "quant_int8_per_channel", "quant_int8_per_token",
           "quantize_checkpoint"]
