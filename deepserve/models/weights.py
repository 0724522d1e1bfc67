"""Reading Hugging Face checkpoints: safetensors shards, FP8 dequantization, random weights.

Shards are opened one at a time with `safe_open`, tensor by tensor, so host memory holds at
most one shard beyond the model. DeepSeek's FP8 checkpoints store e4m3 weights with a fp32
`<name>_scale_inv` per 128x128 block; unless a quantized path is chosen they are dequantized
here, y = fp32(x) * s, cast to the model dtype.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors shards of a model folder, from its index when there is one."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"shard {folder / name} listed in {index.name} is missing")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return files


def iterate_checkpoint(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every shard, one shard open at a time."""
    from safetensors import SafetensorError, safe_open

    for path in checkpoint_files(folder):
        try:
            f = safe_open(str(path), framework="pt")
            names = list(f.keys())
        except (OSError, SafetensorError) as exc:
            raise ValueError(f"cannot read shard {path}: {exc}") from None
        for name in names:
            try:
                tensor = f.get_tensor(name)
            except (OSError, SafetensorError) as exc:
                raise ValueError(f"cannot read tensor {name} from shard {path}: {exc}") from None
            yield name, tensor
        del f


def dequant_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                      out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """e4m3 weight [N, K] with fp32 scale_inv [ceil(N/bn), ceil(K/bk)] -> out_dtype [N, K]."""
    n, k = weight.shape
    bn, bk = block
    expected = (math.ceil(n / bn), math.ceil(k / bk))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
                         f"with {bn}x{bk} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (weight.float() * scale).to(out_dtype)


def dequantize_fp8_stream(weights: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int],
                          out_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Pair each fp8 weight with its `_scale_inv` (either order within a shard) and dequantize."""
    pending_w: dict[str, torch.Tensor] = {}
    pending_s: dict[str, torch.Tensor] = {}
    for name, t in weights:
        if name.endswith("_scale_inv"):
            base = name[: -len("_scale_inv")]
            if base in pending_w:
                yield base, dequant_fp8_block(pending_w.pop(base), t, block, out_dtype)
            else:
                pending_s[base] = t
        elif t.dtype == torch.float8_e4m3fn:
            if name in pending_s:
                yield name, dequant_fp8_block(t, pending_s.pop(name), block, out_dtype)
            else:
                pending_w[name] = t
        else:
            yield name, t
    if pending_w:
        missing = sorted(pending_w)[0]
        raise ValueError(f"fp8 tensor {missing} has no {missing}_scale_inv in the checkpoint")


def load_params(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                stacked_params: list[tuple[str, str, object]],
                rename: Callable[[str], Optional[str]] = lambda n: n) -> set[str]:
    """Copy checkpoint tensors into `model`'s parameters through their weight loaders.

    `stacked_params` maps a checkpoint name part to (fused parameter part, shard id).
    Returns the names of the parameters that received data."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for pname, p in params.items():
        p.param_name = pname
    loaded: set[str] = set()
    for name, tensor in weights:
        name = rename(name)
        if name is None:
            continue
        for part, fused, shard_id in stacked_params:
            if f".{part}." in name and name.replace(part, fused) in params:
                target = name.replace(part, fused)
                break
        else:
            target, shard_id = name, None
        if target not in params:
            raise ValueError(f"checkpoint tensor {name} has no matching model parameter")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        if loader is None:
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {name}: checkpoint shape {tuple(tensor.shape)} does not match "
                                 f"the model's {tuple(param.shape)}")
            param.data.copy_(tensor)
        elif shard_id is None:
            loader(param, tensor)
        else:
            loader(param, tensor, shard_id)
        loaded.add(target)
    return loaded


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights with the model's shapes (for speed tests with real shapes).

    Norm weights are set to 1 and biases to 0 so activations stay in a sane range."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            continue
        if "norm" in name.split(".")[-2] if "." in name else False:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif p.device.type == "cpu":
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        else:
            p.normal_(0.0, std)
