"""`deepserve convert quantize`: a BF16/FP16/FP32 checkpoint to FP8 block or INT8 W8A8.

Two output formats, both loadable beyond deepserve:

- `fp8-block`: DeepSeek's own FP8 layout (e4m3 `weight` + fp32 `weight_scale_inv` per 128x128
  block, quantization_config quant_method "fp8"), so BF16 distills run through the same FP8
  path as R1 itself.
- `w8a8-int8`: symmetric per-output-channel int8 `weight` + fp32 `weight_scale` [N, 1], with
  dynamic per-token int8 activations, described in the `compressed-tensors` format
  (quant_method "compressed-tensors", format "int-quantized") that vLLM loads.

Which tensors stay in high precision is decided in quant/policy.py, plus the modules named by
`--ignore` (quant/ignore.py's syntax: a module, a parent module, or `re:` and a regex), which the
output's quantization_config lists (fp8 `ignored_layers`, compressed-tensors `ignore`) so that
loaders keep them in 16-bit.
"""
from __future__ import annotations

import re

import torch

from deepserve.quant.checkpoint import Checkpoint, TensorInfo, TensorReader
from deepserve.quant.fp8 import DEFAULT_BLOCK, FP8_DTYPE, block_scale_shape, quant_fp8_block
from deepserve.quant.ignore import Ignore
from deepserve.quant.int8 import quant_int8_per_channel
from deepserve.quant.pipeline import Converter, OutSpec
from deepserve.quant.policy import LINEAR_REASONS, high_precision_reason

METHODS = ("fp8-block", "w8a8-int8")
_QUANTIZED_DTYPES = {FP8_DTYPE, torch.float8_e5m2, torch.int8, torch.uint8}
# projections fused into one GEMM at load, and the routed experts of one MoE layer (one stacked
# tensor): quantized all or none
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$")


def fp8_block_config(block: tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """quantization_config exactly as DeepSeek-V3/R1 ship it."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block)}


def quant_args(num_bits: int, strategy: str, dynamic: bool, observer: str | None, symmetric: bool = True,
               group_size: int | None = None, actorder: str | None = None) -> dict:
    """One compressed-tensors QuantizationArgs entry (weights or input activations)."""
    return {"num_bits": num_bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
            "dynamic": dynamic, "group_size": group_size, "block_structure": None, "actorder": actorder,
            "observer": observer, "observer_kwargs": {}}


def compressed_tensors_config(fmt: str, weights: dict, input_activations: dict | None, ignore: list[str]) -> dict:
    """A compressed-tensors quantization_config with one scheme for every Linear not in `ignore`."""
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": input_activations,
            "output_activations": None,
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def w8a8_int8_config(ignore: list[str]) -> dict:
    """compressed-tensors quantization_config for int8 channel weights + dynamic token acts."""
    return compressed_tensors_config("int-quantized", quant_args(8, "channel", dynamic=False, observer="minmax"),
                                     quant_args(8, "token", dynamic=True, observer=None), ignore)


def check_high_precision_source(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint that is already quantized: quantize reads BF16/FP16/FP32 ones."""
    qc = ckpt.config.get("quantization_config")
    if qc:
        method = qc.get("quant_method")
        hint = ("convert it with fp8-to-bf16 first" if method == "fp8" and qc.get("weight_block_size")
                else "start from the unquantized model")
        raise ValueError(f"{ckpt.root} is already quantized (quant_method={method!r}); quantize reads a "
                         f"BF16/FP16/FP32 checkpoint: {hint}")
    for t in ckpt.tensors.values():
        if t.dtype in _QUANTIZED_DTYPES:
            raise ValueError(f"{ckpt.root} holds quantized tensor {t.name} ({t.dtype}); "
                             f"quantize reads a BF16/FP16/FP32 checkpoint")


def policy_ignore(ckpt: Checkpoint) -> set[str]:
    """Linear layers the policy keeps in high precision, which compressed-tensors loaders must be
    told about ("ignore"): lm_head and the router gates."""
    ignore = {"lm_head"}
    for t in ckpt.tensors.values():
        if high_precision_reason(t.name, t.dtype, t.shape) in LINEAR_REASONS:
            ignore.add(t.name[: -len(".weight")])
    return ignore


def check_ignore(ckpt: Checkpoint, patterns: tuple[str, ...], quantized: set[str], ignored: set[str]) -> None:
    """`--ignore patterns` against the checkpoint, given the Linear modules it leaves `quantized`
    and `ignored`: each pattern names some module (a typo would quietly quantize what it meant to
    keep; lm_head, in every recipe, is absent from tied-embedding models and kept anyway), and
    none splits a fused layer or the routed experts of one MoE layer."""
    modules = [t.name[: -len(".weight")] for t in ckpt.tensors.values()
               if t.name.endswith(".weight") and len(t.shape) == 2] + ["lm_head"]
    for pattern in patterns:
        if not any(Ignore((pattern,))(m) for m in modules):
            raise ValueError(f"--ignore {pattern} matches no module of {ckpt.root} (names like "
                             f"{sorted(quantized)[0] if quantized else modules[0]}, or re:REGEX)")
    layers: dict[str, set[bool]] = {}
    for name in quantized | ignored:
        m = _EXPERT.match(name)
        if m is not None:
            layers.setdefault(m[1], set()).add(name in quantized)
    for layer, kinds in sorted(layers.items()):
        if len(kinds) > 1:
            raise ValueError(f"the routed experts of {layer} are one stacked tensor at load: --ignore all of "
                             f"them ({layer}) or none")
    for siblings in _SIBLINGS:
        for name in quantized | ignored:
            for part in siblings:
                if f".{part}." not in name + ".":
                    continue
                group = {(name + ".").replace(f".{part}.", f".{p}.")[:-1] for p in siblings} & (quantized | ignored)
                if len(group & quantized) not in (0, len(group)):
                    raise ValueError(f"{', '.join(sorted(group))} run as one fused layer: --ignore all of them "
                                     f"or none")


class Quantize(Converter):
    def __init__(self, method: str, device: str = "cpu", ignore: tuple[str, ...] = ()):
        if method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
        try:
            self.skip = Ignore(tuple(ignore))
        except ValueError as exc:
            raise ValueError(f"--ignore {exc}") from None
        self.method, self.patterns = method, tuple(ignore)
        self.device = torch.device(device)
        self.task = f"quantize {method}" + (f" ignore {sorted(ignore)}" if ignore else "")
        self._ignore: list[str] = []
        self._ignored: set[str] = set()      # Linear modules the policy quantizes and --ignore keeps

    def validate(self, ckpt: Checkpoint) -> None:
        check_high_precision_source(ckpt)
        linear = {t.name[: -len(".weight")] for t in ckpt.tensors.values()
                  if high_precision_reason(t.name, t.dtype, t.shape) is None}
        self._ignored = {m for m in linear if self.skip(m)}
        check_ignore(ckpt, self.patterns, linear - self._ignored, self._ignored)
        if not any(self._quantizes(t) for t in ckpt.tensors.values()):
            raise ValueError(f"{ckpt.root} has no 2-D Linear weights to quantize")
        self._ignore = sorted(policy_ignore(ckpt) | self._ignored)

    def _quantizes(self, info: TensorInfo) -> bool:
        return (high_precision_reason(info.name, info.dtype, info.shape) is None
                and info.name[: -len(".weight")] not in self._ignored)

    def outputs(self, ckpt: Checkpoint, info: TensorInfo) -> list[OutSpec]:
        if not self._quantizes(info):
            return [(info.name, info.dtype, info.shape)]
        if self.method == "fp8-block":
            return [(info.name, FP8_DTYPE, info.shape),
                    (info.name + "_scale_inv", torch.float32, block_scale_shape(info.shape))]
        return [(info.name, torch.int8, info.shape),
                (info.name + "_scale", torch.float32, (info.shape[0], 1))]

    def convert(self, ckpt: Checkpoint, info: TensorInfo,
                reader: TensorReader) -> dict[str, torch.Tensor]:
        w = reader.get(info.name)
        if not self._quantizes(info):
            return {info.name: w}
        w = w.to(self.device)  # bit-identical results on any device (quant/fp8.py, int8.py)
        if self.method == "fp8-block":
            q, scale_inv = quant_fp8_block(w)
            return {info.name: q.cpu(), info.name + "_scale_inv": scale_inv.cpu()}
        q, scale = quant_int8_per_channel(w)
        return {info.name: q.cpu(), info.name + "_scale": scale.cpu()}

    def new_config(self, config: dict) -> dict:
        if self.method == "fp8-block":
            config["quantization_config"] = fp8_block_config()
            if self._ignored:
                config["quantization_config"]["ignored_layers"] = sorted(self._ignored)
        else:
            config["quantization_config"] = w8a8_int8_config(self._ignore)
        return config
