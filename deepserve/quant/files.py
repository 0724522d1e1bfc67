"""File helpers for conversions: atomic writes, checksums and the side files a model needs.

Every file a conversion produces is first written under a hidden temporary name in the same
folder and renamed over its final name only once complete and flushed, so a killed process
never leaves a truncated file under a name a loader would trust (DESIGN.md invariant 8).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TMP_SUFFIX = ".tmp"
# Files a model folder carries besides its weights are small; anything bigger is data we
# should not silently duplicate (e.g. a stray pytorch_model.bin).
SIDE_FILE_MAX_BYTES = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def tmp_path(path: Path) -> Path:
    """The hidden temporary name `path` is written under before the final rename."""
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def _fsync_and_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = tmp_path(path)
    tmp.write_text(text)
    _fsync_and_replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = tmp_path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600): give the shard the mode
    # of the side files beside it, so a server running as another user can read it
    os.chmod(tmp, _umask_mode())
    _fsync_and_replace(tmp, path)


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_tmp_file(path: Path) -> bool:
    """Whether `path` is a temporary `tmp_path` names (a killed run may leave one)."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def remove_tmp_files(folder: Path) -> None:
    """Delete temporaries a killed run left behind (they are never trusted)."""
    for p in folder.iterdir():
        if is_tmp_file(p):
            p.unlink()


def side_files(src: Path, skip: set[str]) -> list[Path]:
    """Small non-weight, non-code files to copy: tokenizer, generation config, license..."""
    out = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in skip or p.name.startswith("."):
            continue
        if p.suffix == ".py" or p.name.endswith(_WEIGHT_SUFFIXES):
            continue  # never carry remote code; weights are what we are converting
        if p.stat().st_size > SIDE_FILE_MAX_BYTES:
            continue
        out.append(p)
    return out


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = tmp_path(dst)
    shutil.copyfile(src, tmp)
    _fsync_and_replace(tmp, dst)
