"""Resumable shard-by-shard conversion of a checkpoint folder into a new one.

Every conversion (FP8 -> BF16, quantization) is a `Converter`: it checks the source, says
which tensors each source tensor becomes (names, dtypes, shapes: known from the headers, so
the output size and index exist before any weight is read) and converts them. The driver:

1. checks everything a user can get wrong (source format, destination exists, free disk)
   before writing anything;
2. builds the output in `DST.partial`: each shard is assembled in memory, written (by a
   writer thread, while the next shard is converted: at most two output shards in RAM) to a
   temporary name, renamed, then recorded with its size and sha256 in
   `DST.partial/.deepserve-convert.json`;
3. writes the index, config.json and side files, then renames `DST.partial` to `DST`.

A run holds a lock beside `DST.partial` from start to end, so the same command started twice
is refused rather than writing into the first one's folder. A killed run leaves nothing under
`DST`; the next run with the same source and task resumes, skipping shards whose size and
sha256 still match the manifest and whose source shards (those read up to and including them)
keep the size and mtime recorded there.
Test hook: env `DEEPSERVE_CONVERT_TEST_SLEEP_S` sleeps that long after each shard, so a test
can SIGKILL the converter between shards deterministically.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from deepserve.quant.checkpoint import INDEX_NAME, Checkpoint, TensorInfo, TensorReader
from deepserve.quant.files import (atomic_save_safetensors, atomic_write_json, copy_atomic, is_tmp_file,
                                   remove_tmp_files, sha256_file, side_files)

MANIFEST_NAME = ".deepserve-convert.json"
PARTIAL_SUFFIX = ".partial"
MANIFEST_VERSION = 1
# Slack on top of the estimated output size: filesystem blocks, index, config, side files.
_DISK_SLACK_BYTES = 16 << 20

OutSpec = tuple[str, torch.dtype, tuple[int, ...]]


class Converter:
    """One conversion; subclasses fill in the four methods."""

    task: str = ""
    # whether a shard's output depends on the shards converted before it (GPTQ calibrates each
    # layer on the activations of the layers before), not only on the tensors read for it
    carries_state: bool = False

    def validate(self, ckpt: Checkpoint) -> None:
        """Raise ValueError if `ckpt` is not in the format this conversion reads."""
        raise NotImplementedError

    def outputs(self, ckpt: Checkpoint, info: TensorInfo) -> list[OutSpec]:
        """What `info` becomes in the output; [] drops it (e.g. a consumed scale)."""
        raise NotImplementedError

    def convert(self, ckpt: Checkpoint, info: TensorInfo,
                reader: TensorReader) -> dict[str, torch.Tensor]:
        """The tensors `outputs` promised, computed from the source."""
        raise NotImplementedError

    def new_config(self, config: dict) -> dict:
        """config.json for the output folder."""
        raise NotImplementedError

    def begin(self, partial: Path, done: set[str]) -> None:
        """Called before the first shard is converted: `done` lists the shards already written
        (and verified) in `partial` by an earlier run of the same job."""


@dataclass
class ConversionReport:
    dst: Path
    shards_converted: int
    shards_skipped: int
    bytes_written: int
    seconds: float


def _plan(ckpt: Checkpoint, conv: Converter) -> dict[str, list[OutSpec]]:
    return {name: conv.outputs(ckpt, info) for name, info in ckpt.tensors.items()}


def _shard_bytes(ckpt: Checkpoint, plan: dict[str, list[OutSpec]], shard: str) -> int:
    return sum(torch.Size(shape).numel() * dtype.itemsize
               for name in ckpt.names_in(shard) for _, dtype, shape in plan[name])


def _job_id(ckpt: Checkpoint, conv: Converter) -> dict:
    src = ckpt.root.resolve()
    return {"version": MANIFEST_VERSION, "task": conv.task, "source": str(src),
            "source_shards": {s: (src / s).stat().st_size for s in ckpt.shards}}


def _source_stamps(root: Path, shards: set[str]) -> dict[str, list[int]]:
    """Size and modification time of source shards: a shard rewritten in place (other weights of
    the same shapes) keeps its size but not its mtime; hashing them would read the checkpoint."""
    stamps = {}
    for shard in sorted(shards):
        try:
            st = (root / shard).stat()
        except OSError:
            continue
        stamps[shard] = [st.st_size, st.st_mtime_ns]
    return stamps


def partial_dir(dst: Path) -> Path:
    """The folder DST is built in: beside DST, under its name as an absolute path has it, so
    `out/`, `.` or `..` name the folder they point at."""
    dst = Path(os.path.abspath(dst))
    return dst.with_name(dst.name + PARTIAL_SUFFIX)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise ValueError(f"destination {dst} must be outside the source {src} and not contain it")
    if dst.exists() and not overwrite:
        raise ValueError(f"destination {dst} already exists; pass --overwrite to replace it")
    if not dst.parent.is_dir():
        what = "is a file, not a folder" if dst.parent.exists() else "does not exist"
        raise FileNotFoundError(f"parent folder of destination {dst} {what}")


def _load_manifest(partial: Path, job: dict, overwrite: bool) -> dict:
    """The manifest of a resumable run in `partial`, or a fresh one (clearing a stale run)."""
    path = partial / MANIFEST_NAME
    if partial.exists():
        manifest = None
        if path.is_file():
            try:
                manifest = json.loads(path.read_text())
            except json.JSONDecodeError:
                manifest = None
            manifest = manifest if isinstance(manifest, dict) else None
        same = manifest is not None and all(manifest.get(k) == v for k, v in job.items())
        if same:
            return manifest
        # a run that stopped before its first shard (a refused checkpoint, a kill) left only its
        # manifest and temporaries: nothing to protect, so any job may start afresh there
        files = [p for p in partial.iterdir() if p.name != MANIFEST_NAME and not is_tmp_file(p)]
        if manifest is None and files:
            # no run of ours made it: --overwrite replaces DST, never a folder of someone else's
            raise ValueError(f"{partial} is in the way: it holds files but no conversion manifest "
                             f"({MANIFEST_NAME}); move it away")
        work = bool((manifest or {}).get("shards")) or bool(files)
        if work and not overwrite:
            raise ValueError(f"{partial} holds an unfinished conversion of another source or "
                             f"task; remove it or pass --overwrite")
    return {**job, "shards": {}}


def _verified_shards(partial: Path, manifest: dict, source: Path) -> dict[str, dict]:
    """The shards of `manifest` still intact in `partial` whose source shards read to make them
    are unchanged."""
    done = {}
    for shard, rec in manifest["shards"].items():
        p = partial / shard
        sources = rec.get("sources") or {}
        if (p.is_file() and p.stat().st_size == rec["size"] and sources
                and _source_stamps(source, set(sources)) == sources and sha256_file(p) == rec["sha256"]):
            done[shard] = rec
    return done


def _check_disk(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst.parent).free
    if needed + _DISK_SLACK_BYTES > free:
        raise ValueError(f"not enough disk space for {dst}: the output needs about "
                         f"{needed / 1e9:.2f} GB more, only {free / 1e9:.2f} GB free")


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    atomic_save_safetensors(path, tensors)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _test_sleep() -> None:
    delay = os.environ.get("DEEPSERVE_CONVERT_TEST_SLEEP_S")
    if delay:
        time.sleep(float(delay))


def run_conversion(src: Path, dst: Path, conv: Converter, ckpt: Checkpoint,
                   overwrite: bool = False, progress: bool = True) -> ConversionReport:
    """Convert `ckpt` (opened from `src`) into folder `dst` with `conv`, resumably."""
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    conv.validate(ckpt)
    plan = _plan(ckpt, conv)
    partial = partial_dir(dst)
    with _exclusive(partial):
        _check_paths(src, dst, overwrite)   # a run that held the lock may have finished DST since
        return _convert(dst, conv, ckpt, plan, partial, overwrite, progress)


# flock's answers on file systems that do not implement it
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class ConversionBusy(ValueError):
    """Another run holds DST.partial: its work there is its own to report."""


@contextlib.contextmanager
def _exclusive(partial: Path):
    """Hold the lock that keeps a second run (the same command started twice) out of `partial`:
    two writers would clear, overwrite and rename each other's files. The lock file sits beside
    `partial` (which is renamed away at the end) and is removed when done."""
    lock = partial.with_name(f".{partial.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:    # a read-only, unwritable or special folder (/proc, /sys)
            raise ValueError(f"cannot create files in {lock.parent}, where the output is built beside its "
                             f"destination: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConversionBusy(f"another deepserve convert is writing {partial}: let it finish, or stop it "
                                 f"and re-run") from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            break       # a file system without flock (some Lustre, FUSE mounts): run unguarded
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)    # the holder removed the file between our open and lock: take the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _convert(dst: Path, conv: Converter, ckpt: Checkpoint, plan: dict[str, list[OutSpec]],
             partial: Path, overwrite: bool, progress: bool) -> ConversionReport:
    manifest = _load_manifest(partial, _job_id(ckpt, conv), overwrite)
    done = _verified_shards(partial, manifest, ckpt.root) if partial.exists() else {}
    todo = [s for s in ckpt.shards if s not in done]
    _check_disk(dst, sum(_shard_bytes(ckpt, plan, s) for s in todo))

    if partial.exists() and not manifest["shards"] and not done:
        shutil.rmtree(partial)  # stale run of another job (allowed by --overwrite) or empty
    partial.mkdir(exist_ok=True)
    remove_tmp_files(partial)
    manifest["shards"] = dict(done)
    atomic_write_json(partial / MANIFEST_NAME, manifest)

    conv.begin(partial, set(done))
    t0, written = time.perf_counter(), 0
    reader = TensorReader(ckpt)
    bar = tqdm(total=len(ckpt.shards), initial=len(done), unit="shard", desc=conv.task,
               disable=not progress, dynamic_ncols=True)

    def commit(shard: str, fut: Future, sources: dict) -> None:
        nonlocal written
        manifest["shards"][shard] = {**fut.result(), "sources": sources}
        atomic_write_json(partial / MANIFEST_NAME, manifest)
        written += manifest["shards"][shard]["size"]
        bar.set_postfix_str(f"{written / 1e9 / max(time.perf_counter() - t0, 1e-9):.2f} GB/s")
        bar.update(1)
        _test_sleep()

    # One writer thread: shard i is written and hashed while shard i+1 is converted, so at
    # most two output shards are in memory; a shard is committed before the next is queued.
    pending: tuple[str, Future, dict] | None = None
    try:
        with ThreadPoolExecutor(max_workers=1) as writer:
            try:
                for shard in todo:
                    if not conv.carries_state:
                        reader.files_read.clear()
                    out: dict[str, torch.Tensor] = {}
                    for name in ckpt.names_in(shard):
                        if plan[name]:
                            out.update(conv.convert(ckpt, ckpt.tensors[name], reader))
                    if pending is not None:
                        commit(*pending)
                        pending = None
                    # the source shards this one was made from
                    pending = (shard, writer.submit(_write_shard, partial / shard, out),
                               _source_stamps(ckpt.root, reader.files_read | {shard}))
                    del out
            except BaseException:
                # a tensor refused (or Ctrl-C) while the previous shard was being written: that
                # shard is finished and kept, so a re-run resumes after it
                if pending is not None and pending[1].exception() is None:
                    commit(*pending)
                raise
            if pending is not None:
                commit(*pending)
    except ValueError:
        if not manifest["shards"]:   # a refusal before any shard was kept writes nothing
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()
        reader.close()

    _finish(ckpt, conv, plan, partial, dst)
    return ConversionReport(dst, len(todo), len(done), written, time.perf_counter() - t0)


def _finish(ckpt: Checkpoint, conv: Converter, plan: dict[str, list[OutSpec]],
            partial: Path, dst: Path) -> None:
    """Index, config and side files into `partial`, then move it to its final name and drop the
    manifest."""
    dst = Path(os.path.abspath(dst))
    if ckpt.has_index:
        weight_map = {out_name: ckpt.tensors[name].file
                      for name, specs in plan.items() for out_name, _, _ in specs}
        total = sum(_shard_bytes(ckpt, plan, s) for s in ckpt.shards)
        atomic_write_json(partial / INDEX_NAME, {
            "metadata": {**ckpt.index_metadata, "total_size": total},
            "weight_map": dict(sorted(weight_map.items()))})
    config = conv.new_config(dict(ckpt.config))
    # auto_map points at remote-code *.py files, which are never copied: drop the dangling link.
    config.pop("auto_map", None)
    atomic_write_json(partial / "config.json", config)
    for f in side_files(ckpt.root, skip={"config.json", INDEX_NAME}):
        copy_atomic(f, partial / f.name)
    if dst.exists() or dst.is_symlink():  # --overwrite: swap in the new folder, then drop the old one
        # a fresh hidden name beside DST: a DST.old of the user's is none of ours to replace
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.replaced-"))
        old.rmdir()
        os.replace(dst, old)
        os.replace(partial, dst)
        _remove(old)
    else:
        os.replace(partial, dst)
    # the manifest goes last: a run killed before the rename finds it and resumes
    (dst / MANIFEST_NAME).unlink()
