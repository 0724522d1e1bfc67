"""`deepserve convert quantize --method w4a16|w4a8`: a BF16/FP16/FP32 checkpoint to 4-bit weights.

Output: compressed-tensors pack-quantized (default; W4A8 adds dynamic per-token int8
activations) or AutoAWQ GEMM (`--format awq`, W4A16 only), in the layouts quant/int4_write.py
writes and quant/int4.py loads. Quantized: every Linear weight the policy quantizes
(quant/policy.py) and the routed experts, except modules named by `--ignore` (compressed-tensors
"ignore" syntax, quant/ignore.py: a module name or a parent module's, or `re:` and a regular
expression).

Algorithms (quant/gptq.py): `rtn` rounds each group to nearest; `gptq` quantizes each decoder
layer with GPTQ's Hessian update on calibration activations, layer by layer
(models/calibration.py runs the float layer over the samples to collect each Linear's
H = X^T X, quantizes the layer, then runs it again with the quantized weights to make the next
layer's inputs). Routed experts use the tokens routed to each of them (an expert that
received none is rounded to nearest); down_proj's inputs are computed from the float gate/up;
the experts of one projection are quantized together, one column loop for a batch of them.
Linears outside the decoder layers (MTP layers) are rounded to nearest.

A layer is quantized when the first of its tensors is asked for (shard by shard, in the
order the pipeline writes them) and its results wait until their shard is written, so memory
holds one layer's float weights and the layers between the last written shard and the current
one. On resume the layers of shards already written are not re-quantized: their packed
tensors are read back from the partial output, so the following layers are calibrated on
exactly the weights the output holds.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from deepserve.ops.int4 import PACK, unpack_int4
from deepserve.quant.calib_data import calibration_samples
from deepserve.quant.checkpoint import Checkpoint, TensorInfo, TensorReader
from deepserve.quant.ignore import Ignore
from deepserve.quant.gptq import DAMP, Int4Weight, gptq_quantize, gptq_quantize_batch, rtn_quantize
from deepserve.quant.int4 import (int4_spec, scale_dtype_of, scales_to_memory, weight_to_memory,
                                  zeros_to_memory)
from deepserve.quant.int4_write import FORMATS, quantization_config, tensor_specs, weight_tensors
from deepserve.quant.pipeline import Converter, OutSpec
from deepserve.quant.policy import high_precision_reason
from deepserve.quant.quantize import check_high_precision_source, check_ignore, policy_ignore

INT4_METHODS = ("w4a16", "w4a8")
ALGORITHMS = ("gptq", "rtn")
_EMBED = "model.embed_tokens.weight"    # the calibration forward starts here
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# memory for the Hessians of the routed experts GPTQ'd in one batch (R1 gate/up: 196 MiB each)
_EXPERT_HESSIAN_BYTES = 4 << 30


@dataclass(frozen=True)
class Int4Options:
    method: str = "w4a16"                 # w4a16 | w4a8 (int8 dynamic per-token activations)
    fmt: str = "compressed-tensors"       # compressed-tensors | awq
    algorithm: str = "gptq"               # gptq | rtn
    group_size: int = 128                 # -1: one scale per output channel
    symmetric: bool = True                # False: zero points (AWQ always stores them)
    act_order: bool = False               # GPTQ desc_act: g_idx in the output
    ignore: tuple[str, ...] = ()
    calib_dataset: Optional[str] = None
    calib_samples: int = 128
    calib_seq_len: int = 512
    damp: float = DAMP

    def check(self) -> None:
        if self.method not in INT4_METHODS:
            raise ValueError(f"--method {self.method!r} is not a 4-bit method ({', '.join(INT4_METHODS)})")
        if self.fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % PACK):
            raise ValueError(f"--group-size must be -1 or a positive multiple of {PACK}, got {self.group_size}")
        try:
            Ignore(tuple(self.ignore))
        except ValueError as exc:
            raise ValueError(f"--ignore {exc}") from None
        if self.fmt == "awq" and self.method == "w4a8":
            raise ValueError("--format awq holds W4A16 weights only; W4A8 is written as compressed-tensors")
        if self.act_order and (self.algorithm != "gptq" or self.fmt == "awq"):
            raise ValueError("--act-order needs --algorithm gptq and the compressed-tensors format")
        if self.algorithm == "gptq" and not self.calib_dataset:
            raise ValueError("--algorithm gptq needs --calib-dataset FILE (e.g. ../shared/datasets/serving/"
                             "ShareGPT_V3_unfiltered_cleaned_split.first500.json), or use --algorithm rtn")
        if not 0 < self.damp < 1:
            raise ValueError(f"--damp must lie in (0, 1), got {self.damp}")

    @property
    def task(self) -> str:
        """Everything that changes the output: a resumed run must have asked for the same."""
        algo = (f"gptq({_dataset_id(self.calib_dataset)}, {self.calib_samples}x{self.calib_seq_len}, "
                f"damp {self.damp})" if self.algorithm == "gptq" else "rtn")
        return (f"quantize {self.method} {self.fmt} {algo} group {self.group_size} "
                f"{'sym' if self.symmetric else 'asym'}{' act-order' if self.act_order else ''} "
                f"ignore {sorted(self.ignore)}")


def _dataset_id(path: Optional[str]) -> str:
    """The calibration file as a resumed run must find it again: its absolute path (the same
    relative path from another directory is another file) and size (an edited file gives other
    samples, so layers calibrated before and after the edit would sit in one output)."""
    if path is None:
        return "None"
    p = Path(path)
    try:
        return f"{p.resolve()}, {p.stat().st_size} bytes"
    except OSError:
        return str(p)      # missing: calib_data names it


def _ignore_suggestion(modules: list[str]) -> str:
    """The --ignore argument that keeps `modules` in high precision: the one name, or a regex
    with the layer (and expert) indices left open."""
    if len(modules) == 1:
        return modules[0]
    patterns = sorted({re.sub(r"\\.\d+\\.", lambda m: r"\.\d+\.", re.escape(m)) for m in modules})
    return f"'re:{patterns[0]}$'" if len(patterns) == 1 else f"'re:({'|'.join(patterns)})$'"


class QuantizeInt4(Converter):
    """`runner` builds the calibration layer runner (models/calibration.py's LayerRunner: given
    the config, the embedding weight, the token samples and the device; its `check(config)`
    refuses a model it cannot run); GPTQ needs it."""

    def __init__(self, opts: Int4Options, device: str = "cpu", runner: Optional[Callable] = None):
        opts.check()
        if opts.algorithm == "gptq" and runner is None:
            raise ValueError("GPTQ needs a calibration layer runner (deepserve.models.calibration.LayerRunner)")
        self.opts, self.device, self.make_runner = opts, torch.device(device), runner
        # GPTQ's calibration forwards and Hessians follow the device's arithmetic (rounding alone
        # does not): a run resumed on another kind of device would mix two outputs
        self.task = opts.task + (f" on {self.device.type}" if opts.algorithm == "gptq" else "")
        self.carries_state = opts.algorithm == "gptq"
        self._quant: set[str] = set()
        self._ignore: list[str] = []
        self._samples: list[torch.Tensor] = []
        self._runner = None
        self._pending: dict[str, Int4Weight] = {}
        self._partial: Optional[Path] = None
        self._done: set[str] = set()
        self.rtn_fallback: list[str] = []     # GPTQ asked for, but no calibration input reached them

    # ------------------------------------------------------------------ planning
    def validate(self, ckpt: Checkpoint) -> None:
        check_high_precision_source(ckpt)
        o = self.opts
        ignore, skip = policy_ignore(ckpt), Ignore(o.ignore)
        unfit: dict[str, list[tuple[str, int]]] = {}     # reason -> (tensor, size) it cannot quantize
        for t in ckpt.tensors.values():
            if high_precision_reason(t.name, t.dtype, t.shape) is not None:
                continue
            module = t.name[: -len(".weight")]
            if skip(module):
                ignore.add(module)
                continue
            n, k = t.shape
            if k % PACK:
                unfit.setdefault("pack", []).append((t.name, k))
            elif o.group_size != -1 and k % o.group_size:
                unfit.setdefault("group", []).append((t.name, k))
            elif o.fmt == "awq" and n % PACK:
                unfit.setdefault("awq", []).append((t.name, n))
            else:
                self._quant.add(t.name)
        check_ignore(ckpt, o.ignore, {n[: -len(".weight")] for n in self._quant}, ignore - policy_ignore(ckpt))
        problems = []   # every reason at once, so one rerun can fix them all
        for why, found in unfit.items():
            name, size = found[0]
            ignore_flag = _ignore_suggestion([f[0][: -len(".weight")] for f in found])
            if why == "pack":
                problems.append(f"tensor {name}: {size} input features do not pack into int32s of {PACK} "
                                f"4-bit values; keep it in high precision with --ignore {ignore_flag}")
            elif why == "group":
                problems.append(f"tensor {name}: --group-size {o.group_size} does not divide its {size} input "
                                f"features; pick a group size that does, or --ignore {ignore_flag}")
            else:
                problems.append(f"tensor {name}: AutoAWQ packs output features in eights, {size} is not a "
                                f"multiple of {PACK}; use the compressed-tensors format or --ignore {ignore_flag}")
        if problems:
            raise ValueError("; and ".join(problems))
        if not self._quant:
            raise ValueError(f"{ckpt.root} has no 2-D Linear weights to quantize")
        self._ignore = sorted(ignore)
        self.scale_dtype = scale_dtype_of(ckpt.config)
        if o.algorithm == "gptq":
            try:
                self.make_runner.check(ckpt.config)    # before DST.partial exists, as every refusal
            except ValueError as exc:
                raise ValueError(f"GPTQ calibration runs the model: {exc} (--algorithm rtn needs no model)") from None
            if _EMBED not in ckpt.tensors:
                raise ValueError(f"GPTQ runs the model from its embedding, and {ckpt.root} has no {_EMBED}")
            max_pos = ckpt.config.get("max_position_embeddings")
            if max_pos and o.calib_seq_len > max_pos:
                raise ValueError(f"--calib-seq-len {o.calib_seq_len} exceeds the model's max_position_embeddings "
                                 f"{max_pos}")
            eos = ckpt.config.get("eos_token_id")
            self._samples = calibration_samples(Path(o.calib_dataset), ckpt.root, o.calib_samples,
                                                o.calib_seq_len, eos[0] if isinstance(eos, list) else eos)
            vocab = ckpt.config.get("vocab_size")
            top = max(int(sample.max()) for sample in self._samples)
            if vocab and top >= vocab:
                raise ValueError(f"{ckpt.root / 'tokenizer.json'} gives token id {top} on the calibration text, "
                                 f"outside the model's vocab_size {vocab}: the tokenizer does not belong to "
                                 f"this model")

    def begin(self, partial: Path, done: set[str]) -> None:
        self._partial, self._done = partial, done

    def outputs(self, ckpt: Checkpoint, info: TensorInfo) -> list[OutSpec]:
        if info.name not in self._quant:
            return [(info.name, info.dtype, info.shape)]
        o = self.opts
        return tensor_specs(o.fmt, info.name[: -len(".weight")], *info.shape, o.group_size, o.symmetric,
                            o.act_order, self.scale_dtype)

    def new_config(self, config: dict) -> dict:
        config["quantization_config"] = self.quantization_config()
        return config

    def quantization_config(self) -> dict:
        o = self.opts
        return quantization_config(o.fmt, o.group_size, o.symmetric, o.act_order, o.method == "w4a8", self._ignore)

    # ------------------------------------------------------------------ conversion
    def convert(self, ckpt: Checkpoint, info: TensorInfo, reader: TensorReader) -> dict[str, torch.Tensor]:
        if info.name not in self._quant:
            return {info.name: reader.get(info.name)}
        return weight_tensors(self.opts.fmt, info.name[: -len(".weight")], self._quantized(ckpt, info, reader))

    def _rtn(self, w: torch.Tensor) -> Int4Weight:
        o = self.opts
        return rtn_quantize(w.to(self.device), o.group_size, o.symmetric, self.scale_dtype)

    def _quantized(self, ckpt: Checkpoint, info: TensorInfo, reader: TensorReader) -> Int4Weight:
        if self.opts.algorithm == "rtn":
            return self._rtn(reader.get(info.name))
        if self._runner is None:
            self._runner = self.make_runner(ckpt.config, reader.get(_EMBED),
                                            self._samples, self.device)
        layer = self._runner.layer_index(info.name)
        if layer is None:
            return self._rtn(reader.get(info.name))
        while info.name not in self._pending:
            if self._runner.next_layer > layer:
                raise RuntimeError(f"{info.name} asked for twice")
            self._calibrate_layer(ckpt, reader, self._runner.next_layer)
        return self._pending.pop(info.name)

    def _calibrate_layer(self, ckpt: Checkpoint, reader: TensorReader, i: int) -> None:
        """GPTQ over layer i (or its stored result, on resume), then the runner moves past it."""
        prefix = f"model.layers.{i}."
        weights = {n: reader.get(n) for n in ckpt.tensors if n.startswith(prefix)}
        todo = [n for n in weights if n in self._quant and ckpt.tensors[n].file not in self._done]
        stats = self._runner.capture(i, weights) if todo else None
        experts: dict[tuple[str, str], list[str]] = {}      # (experts prefix, projection) -> names
        for name in todo:
            m = _EXPERT.match(name)
            if m is None:
                self._pending[name] = self._gptq(weights[name], stats.hessians.get(name[: -len(".weight")]), name)
            else:
                experts.setdefault((m[1], m[3]), []).append(name)
        for names in experts.values():
            self._gptq_experts(names, weights, stats)
        out = dict(weights)
        for name in (n for n in weights if n in self._quant):
            q = self._pending[name] if name in todo else self._written(ckpt, name)
            out[name] = q.dequant(torch.float32)
        self._runner.advance(i, out)

    def _gptq(self, w: torch.Tensor, h: Optional[torch.Tensor], name: str) -> Int4Weight:
        o = self.opts
        if h is None or not bool(torch.diag(h).any()):
            self.rtn_fallback.append(name)
            return self._rtn(w)
        return gptq_quantize(w.to(self.device), h.to(self.device), o.group_size, o.symmetric, self.scale_dtype,
                             o.act_order, o.damp)

    def _expert_hessian(self, name: str, weights: dict[str, torch.Tensor], stats) -> Optional[torch.Tensor]:
        """X^T X over the inputs routed to this expert's matrix: x for gate/up, silu(x G^T) * (x U^T)
        (float weights) for down; None when no token was routed to it."""
        m = _EXPERT.match(name)
        x = stats.expert_rows(m[1], int(m[2]))
        if not x.numel():
            return None
        if m[3] == "down_proj":
            gate, up = (weights[f"{m[1]}.{m[2]}.{p}.weight"].to(x.device, torch.float32) for p in ("gate_proj", "up_proj"))
            x = F.silu(x @ gate.t()) * (x @ up.t())
        return x.t() @ x

    def _gptq_experts(self, names: list[str], weights: dict[str, torch.Tensor], stats) -> None:
        """One projection of a layer's routed experts, GPTQ'd together in chunks (one column loop
        per chunk; the Hessians of a chunk take at most _EXPERT_HESSIAN_BYTES)."""
        o = self.opts
        ready = []
        for name in names:
            h = self._expert_hessian(name, weights, stats)
            if h is None or not bool(torch.diag(h).any()):
                self.rtn_fallback.append(name)
                self._pending[name] = self._rtn(weights[name])
            else:
                ready.append((name, h.to(self.device)))
        if not ready:
            return
        k = ready[0][1].shape[0]
        chunk = max(1, _EXPERT_HESSIAN_BYTES // (k * k * 4))
        for c in range(0, len(ready), chunk):
            part = ready[c:c + chunk]
            w = torch.stack([weights[n].to(self.device, torch.float32) for n, _ in part])
            qs = gptq_quantize_batch(w, torch.stack([h for _, h in part]), o.group_size, o.symmetric,
                                     self.scale_dtype, o.act_order, o.damp)
            for (name, _), q in zip(part, qs):
                self._pending[name] = q

    def _written(self, ckpt: Checkpoint, name: str) -> Int4Weight:
        """The quantized weight a previous run wrote for `name` into the partial output."""
        module = name[: -len(".weight")]
        n, k = ckpt.tensors[name].shape
        spec = int4_spec({"quantization_config": self.quantization_config(),
                          "torch_dtype": ckpt.config.get("torch_dtype")})
        g = k if spec.group_size == -1 else spec.group_size
        with safe_open(str(self._partial / ckpt.tensors[name].file), framework="pt") as f:
            part = {role: f.get_tensor(f"{module}.{suffix}") for role, suffix in spec.names.items()
                    if f"{module}.{suffix}" in f.keys()}
        qweight = weight_to_memory(spec, part["qweight"], n, k, module)
        scales = scales_to_memory(spec, part["scales"], n, k // g, module)
        zeros = zeros_to_memory(spec, part["qzeros"], n, k // g, module) if "qzeros" in part else None
        g_idx = part["g_idx"].to(torch.int32) if "g_idx" in part else None
        return Int4Weight(unpack_int4(qweight, 1), scales, zeros, g_idx, g)
