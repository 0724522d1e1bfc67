"""Folder conversions behind `deepserve convert`: FP8 -> BF16 and quantization to a method,
resumable and atomic (quant/pipeline.py), on the device asked for."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from deepserve.quant.checkpoint import open_checkpoint
from deepserve.quant.fp8_to_bf16 import Fp8ToBf16
from deepserve.quant.pipeline import ConversionReport, run_conversion
from deepserve.quant.quantize import METHODS as _8BIT_METHODS
from deepserve.quant.quantize import Quantize
from deepserve.quant.quantize_int4 import INT4_METHODS, Int4Options, QuantizeInt4

METHODS = _8BIT_METHODS + INT4_METHODS


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is checked as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for, but no CUDA device is available")
    return device


def convert_fp8_to_bf16(src: str | Path, dst: str | Path, overwrite: bool = False,
                        progress: bool = True, device: str = "cpu") -> ConversionReport:
    """DeepSeek FP8 checkpoint folder `src` -> BF16 folder `dst`."""
    conv = Fp8ToBf16(device=resolve_device(device))
    return run_conversion(Path(src), Path(dst), conv, open_checkpoint(Path(src)),
                          overwrite=overwrite, progress=progress)


def quantize_checkpoint(src: str | Path, dst: str | Path, method: str, overwrite: bool = False,
                        progress: bool = True, device: str = "cpu", int4: Int4Options | None = None,
                        runner=None, ignore: tuple[str, ...] = ()) -> ConversionReport:
    """High-precision checkpoint folder `src` -> `method` folder: "fp8-block" | "w8a8-int8" (the
    modules `ignore` names kept in high precision), or "w4a16" | "w4a8" with `int4` options (their
    own `ignore`; GPTQ needs `runner`, models/calibration.LayerRunner)."""
    if method in INT4_METHODS:
        if ignore:
            raise ValueError("pass a 4-bit method's ignore list in its Int4Options")
        conv = QuantizeInt4(dataclasses.replace(int4 or Int4Options(), method=method),
                            device=resolve_device(device), runner=runner)
    else:
        if int4 is not None:
            raise ValueError(f"4-bit options given for --method {method}")
        conv = Quantize(method, device=resolve_device(device), ignore=tuple(ignore))
    return run_conversion(Path(src), Path(dst), conv, open_checkpoint(Path(src)),
                          overwrite=overwrite, progress=progress)

