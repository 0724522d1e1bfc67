"""`deepserve convert` as a user meets it when something outside the checkpoint goes wrong: a
GPTQ run on a model it cannot calibrate is refused before anything is written, a run that left
only its manifest behind does not block the next conversion into the same folder, and a full
disk or a refused write is one line that says where the finished shards wait."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepserve.cli.main import main
from deepserve.models.calibration import LayerRunner
from deepserve.quant import Int4Options, files, quantize_checkpoint
from deepserve.quant.pipeline import MANIFEST_NAME
from tests.conftest import DEMO_MODEL as STORIES


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepserve convert: error: "), err
    return err


def _stories_as(tmp_path, architecture: str):
    src = tmp_path / "src"
    shutil.copytree(STORIES, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, architectures=[architecture])))
    return src


def test_gptq_on_an_architecture_it_cannot_run_writes_nothing(tmp_path, capsys):
    src, dst = _stories_as(tmp_path, "MistralForCausalLM"), tmp_path / "out"
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a little dog. " * 40)
    argv = ["convert", "quantize", str(src), str(dst), "--method", "w4a16", "--group-size", "32",
            "--ignore", r"re:model\.layers\.\d+\.mlp\.down_proj$", "--calib-dataset", str(calib),
            "--calib-samples", "2", "--calib-seq-len", "32", "--no-progress"]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "'MistralForCausalLM'" in err and "--algorithm rtn" in err, err
    assert not dst.exists() and not dst.with_name("out.partial").exists()


@pytest.mark.parametrize("temporary", [False, True])
def test_a_partial_with_only_a_manifest_does_not_block_another_conversion(tmp_path, capsys, temporary):
    """A run killed (or refused) before its first shard leaves DST.partial with its manifest and
    no shard, one killed while writing its first shard a hidden temporary too: a later conversion
    of another kind into DST starts afresh there, without --overwrite."""
    dst = tmp_path / "out"
    partial = dst.with_name("out.partial")
    partial.mkdir()
    (partial / MANIFEST_NAME).write_text(json.dumps(
        {"version": 1, "task": "quantize w4a16 gptq(...)", "source": "/elsewhere", "source_shards": {},
         "shards": {}}))
    if temporary:
        (partial / ".model.safetensors.tmp").write_bytes(b"half a shard")
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert json.loads((dst / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert not partial.exists()


def test_a_partial_holding_another_jobs_shards_is_still_protected(tmp_path, capsys):
    dst = tmp_path / "out"
    quantize_checkpoint(STORIES, dst, "w4a16", progress=False,
                        int4=Int4Options(algorithm="rtn", group_size=32,
                                         ignore=(r"re:model\.layers\.\d+\.mlp\.down_proj$",)),
                        runner=LayerRunner)
    partial = dst.with_name("out.partial")
    dst.rename(partial)
    (partial / MANIFEST_NAME).write_text(json.dumps(
        {"version": 1, "task": "another", "source": "/elsewhere", "source_shards": {},
         "shards": {"model.safetensors": {"size": 1, "sha256": "0"}}}))
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]) == 2
    assert "holds an unfinished conversion" in _one_line_error(capsys)
    assert (partial / "model.safetensors").is_file()


def test_disk_full_is_one_line_naming_the_file_and_the_partial(tmp_path, capsys, monkeypatch):
    dst = tmp_path / "out"

    def full_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(files, "save_file", full_disk)
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "w8a8-int8", "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "No space left on device" in err and ".model.safetensors.tmp" in err, err
    assert "out.partial: re-run the same command to resume" in err, err
    assert not dst.exists()


def test_a_refused_folder_creation_says_nothing_was_written(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if self.name == "out.partial":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    dst = tmp_path / "out"
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "Permission denied" in err and "out.partial; nothing was written" in err, err


def _save_then_interrupt(path, tensors):
    """The first shard written, then Ctrl-C."""
    files.atomic_save_safetensors(path, tensors)
    raise KeyboardInterrupt


def test_an_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first shard: exit 130 and a line saying the work waits in DST.partial."""
    dst = tmp_path / "out"
    monkeypatch.setattr("deepserve.quant.pipeline.atomic_save_safetensors", _save_then_interrupt)
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err == f"deepserve convert: interrupted; what was written stays in {dst}.partial: re-run the same " \
                  "command to resume\n", err
    assert not dst.exists() and dst.with_name("out.partial").is_dir()


def test_a_destination_written_with_a_slash_or_as_dot_is_the_folder_it_names(tmp_path, capsys, monkeypatch):
    """`out/` is built in out.partial, and the interrupt line names that folder; `.` with
    --overwrite is the current folder, built beside it as HERE.partial."""
    dst = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr("deepserve.quant.pipeline.atomic_save_safetensors", _save_then_interrupt)
        assert main(["convert", "quantize", str(STORIES), f"{dst}/", "--method", "fp8-block", "--no-progress"]) == 130
    assert capsys.readouterr().err == (f"deepserve convert: interrupted; what was written stays in {dst}.partial: "
                                       "re-run the same command to resume\n")
    assert not dst.exists()

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["convert", "quantize", str(STORIES), ".", "--method", "fp8-block", "--overwrite",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((here / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert not (tmp_path / "here.partial").exists()


def test_a_weights_file_given_as_the_source_is_named_as_a_file(tmp_path, capsys):
    """SRC pointing at model.safetensors: one line saying it is a file and which folder to give."""
    assert main(["convert", "quantize", str(STORIES / "model.safetensors"), str(tmp_path / "out"),
                 "--method", "fp8-block", "--no-progress"]) == 2
    assert _one_line_error(capsys) == (f"deepserve convert: error: source {STORIES / 'model.safetensors'} is a "
                                       f"file: give the checkpoint's folder ({STORIES})\n")


def test_a_gptq_refusal_in_the_first_shard_leaves_no_partial(tmp_path, capsys):
    """A tensor the calibration model has no place for is refused once GPTQ starts: one line, and
    no DST.partial is left holding only a manifest."""
    src, dst = tmp_path / "src", tmp_path / "out"
    shutil.copytree(STORIES, src)
    weights = load_file(str(src / "model.safetensors"))
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(64, 64)
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time there was a little dog. " * 40)
    assert main(["convert", "quantize", str(src), str(dst), "--method", "w4a16", "--group-size", "32",
                 "--ignore", r"re:model\.layers\.\d+\.mlp\.down_proj$", "--calib-dataset", str(calib),
                 "--calib-samples", "2", "--calib-seq-len", "32", "--no-progress"]) == 2
    assert "model.layers.0.mlp.extra_proj.weight" in _one_line_error(capsys)
    assert not dst.exists() and not dst.with_name("out.partial").exists()


def test_a_folder_named_like_the_partial_that_no_run_made_is_never_removed(tmp_path, capsys):
    """DST.partial holding files but no manifest is not a conversion's: refused even with
    --overwrite (which replaces DST), and left as it was."""
    dst = tmp_path / "out"
    partial = dst.with_name("out.partial")
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    argv = ["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]
    for extra in ([], ["--overwrite"]):
        assert main([*argv, *extra]) == 2
        assert _one_line_error(capsys) == (f"deepserve convert: error: {partial} is in the way: it holds files but "
                                           f"no conversion manifest ({MANIFEST_NAME}); move it away\n")
    assert [p.name for p in partial.iterdir()] == ["notes.txt"] and not dst.exists()


def test_overwrite_replaces_only_the_destination(tmp_path, capsys):
    """--overwrite swaps the new folder in for DST; a DST.old beside it is the user's and stays."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old output")
    backup = tmp_path / "out.old"
    backup.mkdir()
    (backup / "keep.txt").write_text("a backup")
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--overwrite",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert not (dst / "stale.txt").exists() and (dst / "model.safetensors").is_file()
    assert (backup / "keep.txt").read_text() == "a backup"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.old"]


def test_a_run_stopped_at_its_final_rename_is_finished_by_the_next(tmp_path, capsys, monkeypatch):
    """Stopped between the last file written into DST.partial and its rename to DST: the same
    command finishes the job (no shard converted again), with no manifest left in DST."""
    dst = tmp_path / "out"
    argv = ["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]
    real = os.replace

    def stopped(a, b):
        if Path(b) == dst:
            raise KeyboardInterrupt
        real(a, b)

    with monkeypatch.context() as m:
        m.setattr("deepserve.quant.pipeline.os.replace", stopped)
        assert main(argv) == 130
    capsys.readouterr()
    assert not dst.exists()
    assert main(argv) == 0
    assert "0 shard(s) converted, 1 already done and verified" in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in STORIES.iterdir())
    assert not (dst / MANIFEST_NAME).exists() and not dst.with_name("out.partial").exists()


def test_a_file_system_without_flock_still_converts(tmp_path, capsys, monkeypatch):
    """Shared storage that does not implement flock (ENOLCK): the run goes on without the lock
    that keeps a second run out, and writes the same output."""
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("deepserve.quant.pipeline.fcntl.flock", no_flock)
    dst = tmp_path / "out"
    assert main(["convert", "quantize", str(STORIES), str(dst), "--method", "fp8-block", "--no-progress"]) == 0, \
        capsys.readouterr().err
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    assert main(["convert", "quantize", str(STORIES), str(fresh), "--method", "fp8-block", "--no-progress"]) == 0
    assert (dst / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]
