"""`deepserve convert fp8-to-bf16`: DeepSeek's FP8 release to a plain BF16 checkpoint.

Each float8 e4m3 weight `W` with its fp32 block scale `W_scale_inv` becomes
bf16(fp32(W) * scale_inv) (see quant/fp8.py); the scale tensors are dropped, every other
tensor is copied unchanged, and config.json loses its `quantization_config`. This is the
BF16 checkpoint the deployment guides serve on chips without FP8. Follows DeepSeek-V3's
`inference/fp8_cast_bf16.py` in what it produces, shard by shard with bounded memory.
Scales stored as F8_E8M0 (`scale_fmt` "ue8m0" in its own dtype) are the powers of two
2^(e-127), exactly.
The other FP8 checkpoints the engine serves (quant/ct_fp8.py: compressed-tensors
`float-quantized`, AutoFP8's per-tensor fp8) store `W_scale` per tensor, row or block: the
same rule, bf16(fp32(W) * s); their static activation scales (`input_scale`) describe how
the fp8 model quantized its inputs and are dropped with the weight scales.
"""
from __future__ import annotations

import torch

from deepserve.quant.checkpoint import Checkpoint, TensorInfo, TensorReader
from deepserve.quant.ct_fp8 import block_scale_inv, fp8_scale_scheme
from deepserve.quant.fp8 import DEFAULT_BLOCK, E8M0_DTYPE, FP8_DTYPE, block_scale_shape, dequant_fp8_block
from deepserve.quant.pipeline import Converter, OutSpec

SCALE_SUFFIX = "_scale_inv"
INPUT_SCALE = ".input_scale"


def _block_size(config: dict) -> tuple[int, int]:
    qc = config.get("quantization_config") or {}
    scheme = fp8_scale_scheme(qc)
    if scheme is not None:
        return scheme.block
    block = qc.get("weight_block_size") or list(DEFAULT_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"quantization_config.weight_block_size must be two positive ints, "
                         f"got {block!r}")
    return (block[0], block[1])


class Fp8ToBf16(Converter):
    task = "fp8-to-bf16"

    def __init__(self, out_dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
        self.out_dtype = out_dtype
        self.device = torch.device(device)

    def _scheme(self, ckpt: Checkpoint):
        """The per-tensor / row / block `weight_scale` scheme, None for DeepSeek's `weight_scale_inv`."""
        return fp8_scale_scheme(ckpt.config.get("quantization_config") or {})

    def _suffix(self, ckpt: Checkpoint) -> str:
        return SCALE_SUFFIX if self._scheme(ckpt) is None else "_scale"

    def validate(self, ckpt: Checkpoint) -> None:
        qc = ckpt.config.get("quantization_config")
        if qc and qc.get("quant_method") != "fp8" and self._scheme(ckpt) is None:
            raise ValueError(f"{ckpt.root} is quantized with quant_method="
                             f"{qc.get('quant_method')!r}, not FP8 (DeepSeek's block 'fp8', per-tensor "
                             f"'fp8', or compressed-tensors float-quantized)")
        if self._scheme(ckpt) is not None:
            self._validate_scales(ckpt)
            return
        fp8 = [t for t in ckpt.tensors.values() if t.dtype == FP8_DTYPE]
        if not fp8:
            found = sorted(str(d).replace("torch.", "") for d in ckpt.dtypes())
            raise ValueError(f"{ckpt.root} has no float8_e4m3fn weights (dtypes: "
                             f"{', '.join(found)}): not an FP8 checkpoint")
        block = _block_size(ckpt.config)
        for t in ckpt.tensors.values():
            weight = ckpt.tensors.get(t.name[: -len(SCALE_SUFFIX)]) if t.name.endswith(SCALE_SUFFIX) else None
            if t.name.endswith(SCALE_SUFFIX) and (weight is None or weight.dtype != FP8_DTYPE):
                # a half-converted folder: the scale would be copied beside a 16-bit weight
                raise ValueError(f"scale tensor {t.name} has no float8_e4m3fn weight "
                                 f"{t.name[: -len(SCALE_SUFFIX)]} (found "
                                 f"{'none' if weight is None else str(weight.dtype).replace('torch.', '')})")
        for t in fp8:
            scale = ckpt.tensors.get(t.name + SCALE_SUFFIX)
            if scale is None:
                raise ValueError(f"missing scale tensor {t.name + SCALE_SUFFIX} for FP8 weight "
                                 f"{t.name}")
            if len(t.shape) != 2:
                raise ValueError(f"FP8 weight {t.name} must be 2-D, got shape {t.shape}")
            want = block_scale_shape(t.shape, block)
            if scale.shape != want or scale.dtype not in (torch.float32, E8M0_DTYPE):
                raise ValueError(f"scale tensor {scale.name} is {scale.dtype} {scale.shape}; "
                                 f"expected float32 (or float8_e8m0fnu) {want} for weight {t.shape} "
                                 f"and block {block}")

    def _validate_scales(self, ckpt: Checkpoint) -> None:
        """Each e4m3 weight has its `weight_scale` of its scheme's shape, each scale its e4m3
        weight (shapes checked on meta tensors, before anything is written)."""
        scheme = self._scheme(ckpt)
        if not any(t.dtype == FP8_DTYPE for t in ckpt.tensors.values()):
            raise ValueError(f"{ckpt.root} has no float8_e4m3fn weights: not an FP8 checkpoint")
        for t in ckpt.tensors.values():
            if t.name.endswith(".weight_scale"):
                weight = ckpt.tensors.get(t.name[: -len("_scale")])
                if weight is None or weight.dtype != FP8_DTYPE:
                    raise ValueError(f"scale tensor {t.name} has no float8_e4m3fn weight {t.name[: -len('_scale')]}")
            elif t.dtype == FP8_DTYPE:
                scale = ckpt.tensors.get(t.name + "_scale")
                if scale is None:
                    raise ValueError(f"missing scale tensor {t.name}_scale for FP8 weight {t.name}")
                if len(t.shape) != 2:
                    raise ValueError(f"FP8 weight {t.name} must be 2-D, got shape {t.shape}")
                block_scale_inv(torch.empty(scale.shape, device="meta"), t.shape, scheme, scale.name)

    def _is_consumed_scale(self, ckpt: Checkpoint, name: str) -> bool:
        if self._scheme(ckpt) is not None and name.endswith(INPUT_SCALE):
            return True
        suffix = self._suffix(ckpt)
        if not name.endswith(".weight" + suffix):
            return False
        weight = ckpt.tensors.get(name[: -len(suffix)])
        return weight is not None and weight.dtype == FP8_DTYPE

    def outputs(self, ckpt: Checkpoint, info: TensorInfo) -> list[OutSpec]:
        if self._is_consumed_scale(ckpt, info.name):
            return []
        dtype = self.out_dtype if info.dtype == FP8_DTYPE else info.dtype
        return [(info.name, dtype, info.shape)]

    def convert(self, ckpt: Checkpoint, info: TensorInfo,
                reader: TensorReader) -> dict[str, torch.Tensor]:
        x = reader.get(info.name)
        if info.dtype != FP8_DTYPE:
            return {info.name: x}
        scale_name = info.name + self._suffix(ckpt)
        scale = reader.get(scale_name)
        scheme = self._scheme(ckpt)
        # Same bits on any device (quant/fp8.py), so the device is only a matter of speed.
        try:
            if scheme is not None:      # a tensor's / row's one value repeated on the block grid: exact
                scale = block_scale_inv(scale, tuple(info.shape), scheme, scale_name)
            y = dequant_fp8_block(x.to(self.device), scale.to(self.device),
                                  _block_size(ckpt.config), self.out_dtype)
        except ValueError as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(f"tensor {scale_name}") else f"tensor {scale_name}: {msg}") from None
        return {info.name: y.cpu()}

    def new_config(self, config: dict) -> dict:
        config.pop("quantization_config", None)
        name = str(self.out_dtype).replace("torch.", "")
        config["torch_dtype"] = name
        if "dtype" in config:  # newer transformers write "dtype" instead of "torch_dtype"
            config["dtype"] = name
        return config
