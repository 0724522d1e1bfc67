"""SIGKILL the converter between shards, re-run: complete, byte-identical output."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from deepserve.cli.main import main
from deepserve.engine.fork_server import process_context
from deepserve.quant import convert_fp8_to_bf16, quantize_checkpoint
from deepserve.quant.pipeline import MANIFEST_NAME

FIRST = "model-00001-of-00002.safetensors"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _convert_slowly(argv: list[str]) -> None:
    """`deepserve convert ARGV`, sleeping after each shard (pipeline.py's test hook)."""
    os.environ["DEEPSERVE_CONVERT_TEST_SLEEP_S"] = "60"
    sys.exit(main(["convert", *argv, "--no-progress"]))


def _kill_after_first_shard(args: list[str], dst: Path, meanwhile=lambda: None) -> Path:
    """Run `deepserve convert ARGS` in a process of its own, forked from the engines' fork
    server (torch imported there already); once shard 1 is recorded, call `meanwhile()`, then
    SIGKILL it."""
    proc = process_context().Process(target=_convert_slowly, args=(args,))
    proc.start()
    partial = dst.with_name(dst.name + ".partial")
    manifest = partial / MANIFEST_NAME
    deadline = time.monotonic() + 60
    try:
        while True:
            if manifest.is_file() and FIRST in json.loads(manifest.read_text())["shards"]:
                break
            assert proc.is_alive(), f"converter exited with code {proc.exitcode}"
            assert time.monotonic() < deadline, "converter did not finish its first shard"
            time.sleep(0.05)
        assert not dst.exists()  # mid-run: nothing under the final name
        meanwhile()
    finally:
        proc.kill()  # SIGKILL; a no-op if it already exited (then the asserts above failed)
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert not dst.exists()
    assert (partial / FIRST).is_file() and not (partial / "config.json").exists()
    return partial


def test_sigkill_then_resume_skips_verified_shard(bf16_ckpt, tmp_path):
    dst = tmp_path / "fp8"
    partial = _kill_after_first_shard(
        ["quantize", str(bf16_ckpt), str(dst), "--method", "fp8-block"], dst)
    inode = (partial / FIRST).stat().st_ino

    rep = quantize_checkpoint(bf16_ckpt, dst, "fp8-block", progress=False)
    assert (rep.shards_converted, rep.shards_skipped) == (1, 1)
    assert (dst / FIRST).stat().st_ino == inode  # kept, not rewritten
    assert not partial.exists() and not (dst / MANIFEST_NAME).exists()

    fresh = tmp_path / "fresh"
    quantize_checkpoint(bf16_ckpt, fresh, "fp8-block", progress=False)
    assert _digests(dst) == _digests(fresh)


def test_resume_redoes_corrupted_shard_and_drops_temporaries(bf16_ckpt, tmp_path):
    fp8 = tmp_path / "fp8"
    quantize_checkpoint(bf16_ckpt, fp8, "fp8-block", progress=False)
    dst = tmp_path / "back"
    partial = _kill_after_first_shard(["fp8-to-bf16", str(fp8), str(dst)], dst)
    data = bytearray((partial / FIRST).read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the sha256 catches it
    (partial / FIRST).write_bytes(bytes(data))
    (partial / ".model-00002-of-00002.safetensors.tmp").write_bytes(b"half a shard")

    rep = convert_fp8_to_bf16(fp8, dst, progress=False)
    assert (rep.shards_converted, rep.shards_skipped) == (2, 0)
    fresh = tmp_path / "fresh"
    convert_fp8_to_bf16(fp8, fresh, progress=False)
    assert _digests(dst) == _digests(fresh)


def test_written_shards_are_readable_like_the_side_files(bf16_ckpt, tmp_path):
    """Weight shards get the same permissions as the config and tokenizer files written beside
    them (the process umask), not safetensors' private 0600."""
    old = os.umask(0o022)
    try:
        dst = tmp_path / "fp8"
        quantize_checkpoint(bf16_ckpt, dst, "fp8-block", progress=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dst.iterdir()}
    assert modes["config.json"] == 0o644
    assert {m for n, m in modes.items() if n.endswith(".safetensors")} == {0o644}, modes


def test_a_source_shard_rewritten_in_place_is_converted_again(bf16_ckpt, tmp_path):
    """The first source shard replaced by other weights of the same size after the kill: the
    re-run converts that shard again instead of keeping the one made from the old weights, and
    ends identical to a clean conversion of the new source."""
    dst = tmp_path / "fp8"
    _kill_after_first_shard(["quantize", str(bf16_ckpt), str(dst), "--method", "fp8-block"], dst)
    shard = bf16_ckpt / FIRST
    before = shard.stat()
    save_file({n: -t for n, t in load_file(str(shard)).items()}, str(shard), metadata={"format": "pt"})
    # a later write: a file system with coarse timestamps may not tell it apart within the test
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))
    assert shard.stat().st_size == before.st_size

    rep = quantize_checkpoint(bf16_ckpt, dst, "fp8-block", progress=False)
    assert (rep.shards_converted, rep.shards_skipped) == (2, 0)
    fresh = tmp_path / "fresh"
    quantize_checkpoint(bf16_ckpt, fresh, "fp8-block", progress=False)
    assert _digests(dst) == _digests(fresh)


def test_the_same_command_started_twice_leaves_the_first_run_alone(bf16_ckpt, tmp_path, capsys):
    """A second run while the first one writes DST.partial: one line, exit 2, the first run's
    shard untouched; once the first is gone the command resumes from its shard."""
    dst = tmp_path / "fp8"
    argv = ["convert", "quantize", str(bf16_ckpt), str(dst), "--method", "fp8-block", "--no-progress"]
    partial = dst.with_name("fp8.partial")
    seen = {}

    def second_run():
        seen["inode"] = (partial / FIRST).stat().st_ino
        seen["code"] = main(argv)
        seen["err"] = capsys.readouterr().err
        seen["after"] = (partial / FIRST).stat().st_ino

    _kill_after_first_shard(argv[1:-1], dst, meanwhile=second_run)
    assert seen["code"] == 2 and seen["err"] == (
        f"deepserve convert: error: another deepserve convert is writing {partial}: let it finish, or stop it "
        "and re-run\n")
    assert seen["after"] == seen["inode"]
    assert main(argv) == 0
    assert "1 shard(s) converted, 1 already done and verified" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    quantize_checkpoint(bf16_ckpt, fresh, "fp8-block", progress=False)
    assert _digests(dst) == _digests(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp8", "fresh"]


def _stories_in_three_shards(root: Path) -> Path:
    from tests.conftest import DEMO_MODEL
    weights = load_file(str(DEMO_MODEL / "model.safetensors"))
    names = sorted(weights, key=lambda n: (n.split(".")[2].isdigit() and int(n.split(".")[2]), n))
    shards = {f"model-0000{i + 1}-of-00003.safetensors": {n: weights[n] for n in names[i::3]} for i in range(3)}
    shutil.copytree(DEMO_MODEL, root, ignore=shutil.ignore_patterns("model.safetensors"))
    for fname, tensors in shards.items():
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ts in shards.items() for n in ts}}))
    return root


@pytest.mark.parametrize("method,redone", [("fp8-block", 2), ("gptq", 3)])
def test_a_rewritten_source_shard_redoes_what_was_made_from_it(tmp_path, monkeypatch, method, redone):
    """Stopped after two of three shards, source shard 1 rewritten: fp8-block converts shard 1
    again and keeps shard 2 (made from shard 2 alone); GPTQ converts all three again (shard 2's
    layers were calibrated on activations through shard 1's)."""
    from deepserve.models.calibration import LayerRunner
    from deepserve.quant import Int4Options, files
    src = _stories_in_three_shards(tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a little dog. " * 40)
    kw = {} if method == "fp8-block" else dict(runner=LayerRunner, int4=Int4Options(
        group_size=32, ignore=(r"re:.*down_proj$",), calib_dataset=str(calib), calib_samples=2, calib_seq_len=32))
    name = "fp8-block" if method == "fp8-block" else "w4a16"
    dst = tmp_path / "out"
    real = files.atomic_save_safetensors

    def stop_at_third(path, tensors):
        if path.name.startswith("model-00003"):
            raise KeyboardInterrupt
        real(path, tensors)

    with monkeypatch.context() as m:
        m.setattr("deepserve.quant.pipeline.atomic_save_safetensors", stop_at_third)
        with pytest.raises(KeyboardInterrupt):
            quantize_checkpoint(src, dst, name, progress=False, **kw)
    assert len(json.loads((tmp_path / "out.partial" / MANIFEST_NAME).read_text())["shards"]) == 2
    shard = src / "model-00001-of-00003.safetensors"
    before = shard.stat()
    save_file({n: t * 1.01 for n, t in load_file(str(shard)).items()}, str(shard), metadata={"format": "pt"})
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns + 2_000_000_000))

    rep = quantize_checkpoint(src, dst, name, progress=False, **kw)
    assert (rep.shards_converted, rep.shards_skipped) == (redone, 3 - redone)
    fresh = tmp_path / "fresh"
    quantize_checkpoint(src, fresh, name, progress=False, **kw)
    assert _digests(dst) == _digests(fresh)
