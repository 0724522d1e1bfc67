"""Read a Hugging Face safetensors checkpoint folder without loading its tensors.

A conversion first needs the whole picture (every tensor's name, dtype, shape and shard) to
check the source format, estimate the output size and build the new index before it reads a
single weight. safetensors headers give all of that cheaply; `TensorReader` then fetches
single tensors lazily (memory-mapped), so a scale stored in another shard costs one small
read rather than a second shard in RAM.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from deepserve.quant.qconfig_fields import quantization_config

INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
    "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8,
    "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E8M0": torch.float8_e8m0fnu,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""
    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Checkpoint:
    """A checkpoint folder: config, shard files in order, and every tensor's header."""
    root: Path
    config: dict
    shards: list[str]
    tensors: dict[str, TensorInfo]
    has_index: bool
    index_metadata: dict = field(default_factory=dict)

    def names_in(self, shard: str) -> list[str]:
        return [t.name for t in self.tensors.values() if t.file == shard]

    def dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self.tensors.values()}


def no_safetensors(folder: Path) -> FileNotFoundError:
    """The error for a folder without *.safetensors weights, naming PyTorch pickle files if it
    holds them instead: deepserve reads no pickle (unpickling can run code; DESIGN: no remote
    code is ever executed), unlike vLLM, which also loads .bin / .pt weights."""
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))
    if not pickles:
        return FileNotFoundError(f"no *.safetensors files in {folder}")
    shown = ", ".join(pickles[:2]) + (f" and {len(pickles) - 2} more" if len(pickles) > 2 else "")
    return FileNotFoundError(
        f"no *.safetensors files in {folder}, only PyTorch pickle ({shown}), which deepserve does not load "
        f"(unpickling can run code): convert the folder to safetensors first, e.g. with transformers: "
        f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")


def _dtype_of(code: str, name: str, path: Path) -> torch.dtype:
    if code not in _DTYPES:
        raise ValueError(f"tensor {name} in {path} has unsupported dtype {code}")
    return _DTYPES[code]


def open_checkpoint(src: Path) -> Checkpoint:
    """Read config.json, the index (if any) and every shard header under `src`."""
    src = Path(src)
    if src.is_file():
        raise FileNotFoundError(f"source {src} is a file: give the checkpoint's folder ({src.parent})")
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint folder {src} does not exist")
    config_path = src / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {src}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    quantization_config(config)

    index_path = src / INDEX_NAME
    expected: dict[str, str] = {}
    metadata: dict = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            expected = dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path} is not a safetensors index ({exc!r})") from None
        metadata = dict(index.get("metadata") or {})
        shards = sorted(set(expected.values()))
    else:
        # every shard, as the engine's loader reads a folder without an index (models/weights.py):
        # a converted folder holds what the source serves (an MTP layer in its own shard too)
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        if not shards:
            raise no_safetensors(src)

    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        path = src / shard
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in {INDEX_NAME} does not exist")
        try:
            f = safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as exc:    # e.g. a truncated download
            raise ValueError(f"cannot read shard {path}: {exc}") from None
        with f:
            for name in f.keys():
                sl = f.get_slice(name)
                if name in tensors:
                    raise ValueError(f"tensor {name} appears in both {tensors[name].file} "
                                     f"and {shard}")
                tensors[name] = TensorInfo(name, shard, _dtype_of(sl.get_dtype(), name, path),
                                           tuple(sl.get_shape()))
    for name, shard in expected.items():
        if name not in tensors or tensors[name].file != shard:
            raise ValueError(f"{INDEX_NAME} maps {name} to {shard}, but that shard does not "
                             f"hold it")
    return Checkpoint(src, config, shards, tensors, bool(expected), metadata)


class TensorReader:
    """Fetch single tensors by name, keeping at most `max_open` shard handles open."""

    def __init__(self, ckpt: Checkpoint, max_open: int = 2):
        self.ckpt = ckpt
        self.max_open = max_open
        self._open: OrderedDict[str, object] = OrderedDict()
        self.files_read: set[str] = set()       # shards any tensor was fetched from

    def _handle(self, shard: str):
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        handle = safe_open(str(self.ckpt.root / shard), framework="pt")
        self._open[shard] = handle
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return handle

    def get(self, name: str) -> torch.Tensor:
        info = self.ckpt.tensors.get(name)
        if info is None:
            raise KeyError(f"tensor {name} is not in {self.ckpt.root}")
        self.files_read.add(info.file)
        return self._handle(info.file).get_tensor(name)

    def close(self) -> None:
        self._open.clear()
