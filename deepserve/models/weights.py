"""Reading Hugging Face checkpoints: safetensors shards, dequantization, random weights.

Shards are opened one at a time with `safe_open`, tensor by tensor, so host memory holds at
most one shard beyond the model. DeepSeek's FP8 checkpoints store e4m3 weights with a fp32
`<name>_scale_inv` per 128x128 block, compressed-tensors W8A8 ones int8 weights with a fp32
`<name>_scale` per output row. Tensors that feed no quantized layer (all of them on the
dequantize-at-load path; MoE experts and high-precision layers otherwise) are dequantized
here: fp8 as bf16(fp32(x) * s), exactly what `deepserve convert fp8-to-bf16` writes, then cast
to the model dtype; int8 as fp32(q) * s.
"""
from __future__ import annotations

import json
import logging
import math
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from deepserve.quant.checkpoint import no_safetensors
from deepserve.quant.fp8 import FP8_DTYPE, dequant_fp8_block, first_bad_value
from deepserve.quant.int8 import dequant_int8

logger = logging.getLogger(__name__)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a model folder, from its index when there is one."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index} is not a safetensors index ({exc!r})") from None
        if not all(isinstance(f, str) for f in files):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
        for name in files:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"shard {folder / name} listed in {index.name} is missing")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise no_safetensors(folder)
    return files


def iterate_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, one shard open at a time."""
    from safetensors import SafetensorError, safe_open

    shard_of: dict[str, str] = {}     # a tensor in two shards (e.g. a stale copy beside new shards)
    for path in checkpoint_files(folder):
        try:
            f = safe_open(str(path), framework="pt")
            names = list(f.keys())
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read shard {path}: {exc}") from None
        for name in names:
            if shard_of.setdefault(name, path.name) != path.name:
                raise ValueError(f"tensor {name} appears in both {shard_of[name]} and {path.name} in {folder}: "
                                 f"remove the stale shard")
            try:
                tensor = f.get_tensor(name)
            except (OSError, SafetensorError) as exc:
                raise ValueError(f"cannot read tensor {name} from shard {path}: {exc}") from None
            yield name, tensor
        del f


# checkpoint format -> (quantized weight dtype, scale suffix)
QUANT_FORMATS = {"fp8": (FP8_DTYPE, "_scale_inv"), "w8a8-int8": (torch.int8, "_scale")}


def _dequantize(fmt: str, name: str, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                out_dtype: torch.dtype) -> torch.Tensor:
    """`name` is the weight's checkpoint name: a bad scale is refused naming its tensor."""
    scale_name = name + QUANT_FORMATS[fmt][1]
    try:
        if fmt == "fp8":
            # through bf16, as `deepserve convert fp8-to-bf16` writes it, so a model served from
            # the FP8 folder sees exactly the weights of the converted BF16 folder
            return dequant_fp8_block(weight, scale, block, torch.bfloat16).to(out_dtype)
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"weight_scale has non-finite values ({first_bad_value(scale, positive=False)})")
        return dequant_int8(weight, scale.reshape(-1, 1).float(), out_dtype)
    except ValueError as exc:
        raise ValueError(f"tensor {scale_name}: {exc}") from None


def dequantize_stream(weights: Iterable[tuple[str, torch.Tensor]], fmt: str, block: tuple[int, int],
                      out_dtype: torch.dtype, keep: Callable[[str], bool] = lambda name: False
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize the quantized weights of a `fmt` checkpoint ("fp8": e4m3 + `<name>_scale_inv`
    per block; "w8a8-int8": int8 + `<name>_scale` per row), pairing each weight with its scale
    in either order. Tensors for which `keep(name)` holds pass through as stored (they feed a
    quantized layer); everything else passes through unchanged."""
    qdtype, suffix = QUANT_FORMATS[fmt]
    pending_w: dict[str, torch.Tensor] = {}
    pending_s: dict[str, torch.Tensor] = {}
    kept_w: set[str] = set()      # quantized weights passed through: each needs its scale too
    kept_s: set[str] = set()
    float_w: dict[str, torch.dtype] = {}   # a scale beside one would replace the scale made at load
    for name, t in weights:
        # a weight's scale only: `self_attn.k_scale` (an fp8 KV scale) also ends in "_scale"
        if name.endswith(".weight" + suffix):
            base = name[: -len(suffix)]
            if not t.is_floating_point():
                raise ValueError(f"tensor {name}: a {fmt} scale must be floating point, got {t.dtype}")
            if keep(name):
                # fp8 scales are checked by their layers; an int8 layer multiplies by its scale as
                # stored, so a NaN / inf one would make its rows NaN without a word
                if fmt == "w8a8-int8" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"tensor {name}: weight_scale has non-finite values "
                                     f"({first_bad_value(t, positive=False)})")
                kept_s.add(base)
                yield name, t
            elif base in pending_w:
                yield base, _dequantize(fmt, base, pending_w.pop(base), t, block, out_dtype)
            else:
                pending_s[base] = t
        elif t.dtype == qdtype:
            if keep(name):
                kept_w.add(name)
                yield name, t
            elif name in pending_s:
                yield name, _dequantize(fmt, name, t, pending_s.pop(name), block, out_dtype)
            else:
                pending_w[name] = t
        else:
            if t.is_floating_point():
                float_w[name] = t.dtype
            yield name, t
    stray = sorted(kept_s & float_w.keys())
    if stray:
        raise ValueError(f"tensor {stray[0]}{suffix}: a {fmt} scale beside {stray[0]}, which is {float_w[stray[0]]}, "
                         f"not {qdtype}: a quantized weight comes with its scale, a 16-bit one without")
    if kept_w - kept_s:
        missing = sorted(kept_w - kept_s)[0]
        raise ValueError(f"{fmt} tensor {missing} has no {missing}{suffix} in the checkpoint")
    if pending_w:
        missing = sorted(pending_w)[0]
        raise ValueError(f"{fmt} tensor {missing} has no {missing}{suffix} in the checkpoint")
    if pending_s:
        extra = sorted(pending_s)[0]
        raise ValueError(f"scale tensor {extra}{suffix} has no {qdtype} weight {extra} in the checkpoint")


KV_SCALE_NAMES = ("k_scale", "v_scale", "kv_scale")
# the other names vLLM reads a layer's KV scales under (its QuantizationConfig / Fp8Config
# cache-scale mappers): ModelOpt's on the k / v projection, a fused qkv_proj's, and
# llm-compressor's (kv_cache_scheme) output scales of k_proj / v_proj
KV_SCALE_ALIASES = ((re.compile(r"\.self_attn\.[kv]_proj\.([kv])_scale$"), r".self_attn.\1_scale"),
                    (re.compile(r"\.self_attn\.qkv_proj\.([kv])_scale$"), r".self_attn.\1_scale"),
                    (re.compile(r"\.self_attn\.([qkv])_proj\.output_scale$"), r".self_attn.\1_scale"))


def load_kv_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Apply `name` if it is one of vLLM's per-layer fp8 KV scales (`<attention>.k_scale`,
    `.v_scale`, `.kv_scale`, the last one both; on the attention module or its `attn` child; or
    under an alias of KV_SCALE_ALIASES): the layer's `set_kv_scale` takes the value. False for
    any other tensor."""
    mapped = name
    for pattern, repl in KV_SCALE_ALIASES:
        mapped = pattern.sub(repl, mapped)
    prefix, _, leaf = mapped.rpartition(".")
    if leaf == "q_scale":
        return _skip_q_scale(model, name, tensor)
    if leaf not in KV_SCALE_NAMES:
        return False
    try:
        module = model.get_submodule(prefix)
    except AttributeError:
        raise ValueError(f"checkpoint tensor {name} has no attention layer at {prefix}") from None
    target = module if hasattr(module, "set_kv_scale") else getattr(module, "attn", None)
    if not hasattr(target, "set_kv_scale"):
        raise ValueError(f"checkpoint tensor {name}: {prefix} is not an attention layer with a KV cache")
    if tensor.numel() != 1:
        raise ValueError(f"fp8 KV scale {name} must hold one value, got shape {tuple(tensor.shape)}")
    value = float(tensor.float().reshape(()))
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"fp8 KV scale {name} must be finite and > 0, got {value}")
    target.set_kv_scale(leaf, value)
    return True


def _skip_q_scale(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """A checkpoint's fp8 query scale (llm-compressor's attention scheme writes `self_attn.q_scale`
    beside the KV scales): vLLM loads it for backends that quantize queries to fp8 and ignores it
    elsewhere; deepserve's attention keeps queries in the model dtype, so it is checked and left
    unused, said once a model."""
    if tensor.numel() != 1 or not tensor.is_floating_point() or not math.isfinite(float(tensor.float().reshape(-1)[0])):
        raise ValueError(f"fp8 query scale {name} must hold one finite value, got {tensor.dtype} {tuple(tensor.shape)}")
    if not getattr(model, "unused_q_scale", None):
        logger.warning("the checkpoint's fp8 query scales (%s, ...) are not used: deepserve's attention keeps "
                       "queries in the model dtype", name)
        model.unused_q_scale = name
    return True


@contextmanager
def named_as_checkpoint(target: str, name: str):
    """A weight loader's ValueError names the fused parameter it fills (`qkv_proj.weight[0]`,
    `experts.w13_weight_scale_inv expert 3 w3`), which the checkpoint does not hold: restate it
    with the checkpoint tensor `name` a user can find."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(re.sub(re.escape(target) + r"(\[[^\]]*\]| expert \d+ w[123])?", name, str(exc))) from None


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                stacked_params: list[tuple[str, str, object]],
                rename: Callable[[str], Optional[str]] = lambda n: n) -> set[str]:
    """Copy checkpoint tensors into `model`'s parameters through their weight loaders.

    `stacked_params` maps a checkpoint name part to (fused parameter part, shard id).
    fp8 KV scales go to their attention layers (`load_kv_scale`); an all-zero bias of a layer
    that has none is skipped (AutoGPTQ writes one for every Linear). A fused parameter must get
    every one of its parts (q, k and v; gate and up): one the checkpoint lacks would leave that
    slice uninitialised, so it is refused naming the missing tensor. Returns the names of the
    parameters that received data."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for pname, p in params.items():
        p.param_name = pname
    loaded: set[str] = set()
    parts_seen: dict[str, tuple[str, set]] = {}     # fused parameter -> (fused name part, shard ids)
    for stored, tensor in weights:
        name = rename(stored)
        if name is None or load_kv_scale(model, name, tensor):
            continue
        for part, fused, shard_id in stacked_params:
            if f".{part}." in name and name.replace(part, fused) in params:
                target = name.replace(part, fused)
                break
        else:
            target, shard_id = name, None
        if target not in params:
            if name.endswith(".bias") and not bool(tensor.any()):
                continue    # AutoGPTQ saves a zero bias for every quantized Linear: adding it is a no-op
            raise ValueError(f"checkpoint tensor {name} has no matching model parameter")
        param = params[target]
        if tensor.dtype in (FP8_DTYPE, torch.int8) and param.dtype != tensor.dtype:
            raise ValueError(f"checkpoint tensor {name} is {tensor.dtype} but parameter {target} is "
                             f"{param.dtype}: no quantized layer takes it and it was not dequantized")
        if param.is_floating_point() and not tensor.is_floating_point():
            # copy_ would turn the integers into floats without a word (a norm weight stored as int32)
            raise ValueError(f"checkpoint tensor {name} is {tensor.dtype}, not floating point as parameter "
                             f"{target} ({param.dtype}) needs")
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name}: checkpoint shape {tuple(tensor.shape)} does not match "
                                 f"the model's {tuple(param.shape)}")
            param.data.copy_(tensor)
        elif shard_id is None:
            loader(param, tensor)
        else:
            with named_as_checkpoint(target, stored):
                loader(param, tensor, shard_id)
            parts_seen.setdefault(target, (fused, set()))[1].add(shard_id)
        loaded.add(target)
    for target, (fused, got) in parts_seen.items():
        got = got | getattr(params[target], "filled_shards", frozenset())   # scales made at load
        for part, f, shard_id in stacked_params:
            if f == fused and shard_id not in got:
                raise ValueError(f"checkpoint lacks tensor {target.replace(fused, part)} "
                                 f"(the other parts of {target} are there)")
    return loaded


def _seeded_normal(shape, key: str, std: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std^2) values that depend only on `key` (and the device kind), not on the layout."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype) * std


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights with the model's shapes (for speed tests with real shapes).

    Every checkpoint tensor is drawn from a seed keyed by its name (and shard), in full, and
    handed to the parameter's weight loader, which keeps this rank's slice: the same seed gives
    the same model under any TP / PP / EP / DP layout on the same device kind. Norm weights are
    1 and biases 0 so activations stay in a sane range."""
    done: set[int] = set()
    for mname, module in model.named_modules():
        if not hasattr(module, "dummy_shards"):
            continue
        for param, shard_id, full_shape in module.dummy_shards():
            float_param = param.dtype in (torch.float32, torch.float16, torch.bfloat16)
            if (param.device.type == "meta" or param.dim() == 1
                    or not (float_param or getattr(param, "quantize_on_load", False))):
                continue  # another pipeline stage's, a bias (zero below), quantized (own init)
            dtype = param.dtype if float_param else torch.bfloat16
            pname = next(n for n, p in module.named_parameters() if p is param)
            full = _seeded_normal(full_shape, f"{seed}:{mname}.{pname}:{shard_id}", std, param.device, dtype)
            if shard_id is None:
                param.weight_loader(param, full)
            else:
                param.weight_loader(param, full, shard_id)
            done.add(id(param))
    for name, p in model.named_parameters():
        if id(p) in done or p.device.type == "meta" or getattr(p, "filled", False):
            continue  # loaded above, another stage's, or scales the quantizing loader made
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        module = name.rsplit(".", 2)[-2] if name.count(".") else ""
        if "norm" in module:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.copy_(_seeded_normal(p.shape, f"{seed}:{name}", std, p.device, p.dtype))
