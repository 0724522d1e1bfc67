"""Each user error is one line on stderr, exit code 2, and nothing is written."""
from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepserve.cli.main import main
from deepserve.quant import pipeline, quantize_checkpoint

Q_A = "model.layers.0.self_attn.q_a_proj.weight"


def _fails(capsys, argv, dst, *fragments):
    assert main(["convert", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deepserve convert: error: "), err
    for frag in fragments:
        assert frag in err, err
    assert not dst.with_name(dst.name + ".partial").exists()
    return err


def test_fp8_to_bf16_on_bf16_folder(bf16_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    _fails(capsys, ["fp8-to-bf16", str(bf16_ckpt), str(dst)], dst,
           "has no float8_e4m3fn weights", "bfloat16", "not an FP8 checkpoint")
    assert not dst.exists()


@pytest.fixture
def fp8_ckpt(bf16_ckpt, tmp_path):
    out = tmp_path / "fp8"
    quantize_checkpoint(bf16_ckpt, out, "fp8-block", progress=False)
    return out


def test_missing_scale_names_the_tensor(fp8_ckpt, tmp_path, capsys):
    index_path = fp8_ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = fp8_ckpt / index["weight_map"].pop(Q_A + "_scale_inv")
    with safe_open(str(shard), framework="pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if k != Q_A + "_scale_inv"}
    save_file(kept, str(shard))
    index_path.write_text(json.dumps(index))
    dst = tmp_path / "out"
    _fails(capsys, ["fp8-to-bf16", str(fp8_ckpt), str(dst)], dst,
           f"missing scale tensor {Q_A}_scale_inv for FP8 weight {Q_A}")
    assert not dst.exists()


@pytest.mark.parametrize("bad", [float("nan"), -1.0])
def test_non_finite_or_negative_scale_names_the_tensor(fp8_ckpt, tmp_path, capsys, bad):
    """A NaN or negative block scale would write NaN / sign-flipped bf16 weights: refused
    naming the scale tensor."""
    index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())
    shard = fp8_ckpt / index["weight_map"][Q_A + "_scale_inv"]
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[Q_A + "_scale_inv"][0, 0] = bad
    save_file(tensors, str(shard))
    assert main(["convert", "fp8-to-bf16", str(fp8_ckpt), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"deepserve convert: error: tensor {Q_A}_scale_inv: scale_inv has non-finite or "
                   f"non-positive values ({bad} at [0, 0])\n"), err
    assert not (tmp_path / "out").exists()


def test_quantize_refuses_quantized_source(fp8_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    _fails(capsys, ["quantize", str(fp8_ckpt), str(dst), "--method", "w8a8-int8"], dst,
           "is already quantized (quant_method='fp8'); quantize reads a BF16/FP16/FP32 checkpoint: convert it "
           "with fp8-to-bf16 first")
    assert not dst.exists()


def test_quantize_on_a_4bit_checkpoint_does_not_point_at_fp8_to_bf16(tmp_path, capsys):
    """fp8-to-bf16 reads DeepSeek's block FP8 only: an AWQ source is sent back to its unquantized model."""
    from deepserve.models.calibration import LayerRunner
    from deepserve.quant.quantize_int4 import Int4Options
    from tests.conftest import DEMO_MODEL
    awq, dst = tmp_path / "awq", tmp_path / "out"
    quantize_checkpoint(DEMO_MODEL, awq, "w4a16", progress=False, runner=LayerRunner,
                        int4=Int4Options(fmt="awq", algorithm="rtn", group_size=32, ignore=(r"re:.*mlp\..*",)))
    err = _fails(capsys, ["quantize", str(awq), str(dst), "--method", "fp8-block"], dst,
                 f"{awq} is already quantized (quant_method='awq'); quantize reads a BF16/FP16/FP32 checkpoint: "
                 "start from the unquantized model")
    assert "fp8-to-bf16" not in err


def test_destination_exists(bf16_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "fp8-block"], dst,
           f"destination {dst} already exists; pass --overwrite")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_too_little_disk(bf16_ckpt, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    dst = tmp_path / "out"
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "fp8-block"], dst,
           "not enough disk space", "0.00 GB free")
    assert not dst.exists()


def test_destination_under_a_file(bf16_ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    dst = tmp_path / "afile" / "out"
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "w8a8-int8"], dst,
           f"parent folder of destination {dst} is a file, not a folder")


def test_a_destination_folder_nothing_can_be_created_in(bf16_ckpt, tmp_path, capsys, monkeypatch):
    """(a read-only mount, an unwritable folder, /proc: the lock beside DST.partial is the first file)"""
    real_open = pipeline.os.open

    def os_open(path, *args, **kwargs):
        if str(path).endswith(".partial.lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(pipeline.os, "open", os_open)
    dst = tmp_path / "out"
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "w8a8-int8"], dst,
           f"cannot create files in {tmp_path}, where the output is built beside its destination: "
           "Permission denied")


def test_missing_source_and_shard(bf16_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    _fails(capsys, ["fp8-to-bf16", str(tmp_path / "nope"), str(dst)], dst,
           f"source checkpoint folder {tmp_path / 'nope'} does not exist")
    (bf16_ckpt / "model-00002-of-00002.safetensors").unlink()
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "w8a8-int8"], dst,
           "model-00002-of-00002.safetensors listed in model.safetensors.index.json "
           "does not exist")
    assert not dst.exists()


def test_bad_device(bf16_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "fp8-block",
                    "--device", "tpu:x"], dst,
           "--device must be auto, cpu, cuda or cuda:N, got 'tpu:x'")
    assert not dst.exists()


def test_device_help_does_not_promise_identical_gptq_output(capsys):
    """GPTQ runs the calibration forwards and its Hessian updates on --device, whose summation
    order differs between CPU and GPU: the help promises identical bytes for rounding only."""
    with pytest.raises(SystemExit):
        main(["convert", "quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GPTQ follows the device's arithmetic" in text
    assert "the output is bit-identical on every device" not in text


def test_truncated_shard_and_malformed_config_are_one_line(bf16_ckpt, tmp_path, capsys):
    """A shard cut short inside its data (an interrupted download: the header is whole) and a
    config.json whose quantization_config is a string raised a SafetensorError / AttributeError
    traceback; both are named before anything is written."""
    dst = tmp_path / "out"
    shard = bf16_ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _fails(capsys, ["quantize", str(bf16_ckpt), str(dst), "--method", "w8a8-int8"], dst,
           f"cannot read shard {shard}: ", "file not fully covered")
    shard.write_bytes(data)
    config = json.loads((bf16_ckpt / "config.json").read_text())
    (bf16_ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": "fp8"}))
    for argv in (["quantize", "--method", "fp8-block"], ["fp8-to-bf16"]):
        _fails(capsys, [argv[0], str(bf16_ckpt), str(dst), *argv[1:]], dst,
               "config.json quantization_config must be an object with a quant_method, got str 'fp8'")
    assert not dst.exists()


def test_calibration_text_with_odd_records(tmp_path):
    """ShareGPT turns whose value is not a string are skipped (a TypeError from str.join), and
    a .jsonl line that is not JSON is named by its line number."""
    from deepserve.quant.calib_data import read_texts
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([{"conversations": [{"value": 5}, {"value": "hello"}]},
                                {"conversations": [{"from": "human"}]}, {"text": "plain"}]))
    assert read_texts(conv) == ["hello", "plain"]
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"text": "one"}\n\n{"text": "two"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 4 is not valid JSON: Expecting value"):
        read_texts(lines)


def test_a_resumed_gptq_run_must_read_the_same_calibration_file(tmp_path, monkeypatch):
    """The resume key named the --calib-dataset path as typed: resumed from another directory
    (the same relative path, another file) or after the file changed, an interrupted GPTQ run
    went on with other samples and its output mixed layers calibrated on both."""
    from deepserve.quant.quantize_int4 import Int4Options
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "calib.txt").write_text("once upon a time")
    (tmp_path / "b" / "calib.txt").write_text("the quick brown fox jumps")

    def task(cwd, dataset="calib.txt"):
        monkeypatch.chdir(tmp_path / cwd)
        return Int4Options(calib_dataset=dataset).task
    assert task("a") == task("b", str(tmp_path / "a" / "calib.txt"))   # the same file
    assert task("a") != task("b")
    before = task("a")
    (tmp_path / "a" / "calib.txt").write_text("once upon a time, there was")
    assert task("a") != before


def test_a_resumed_gptq_run_must_run_on_the_same_kind_of_device(tmp_path):
    """GPTQ output follows the device's arithmetic: a run begun on cuda and resumed on cpu is
    another job (never one output mixing both); rounding alone writes the same bytes anywhere."""
    from deepserve.models.calibration import LayerRunner
    from deepserve.quant.quantize_int4 import Int4Options, QuantizeInt4
    calib = tmp_path / "calib.txt"
    calib.write_text("once upon a time")

    def task(device, algorithm):
        opts = Int4Options(algorithm=algorithm, calib_dataset=str(calib) if algorithm == "gptq" else None)
        return QuantizeInt4(opts, device=device, runner=LayerRunner).task
    assert task("cpu", "gptq") != task("cuda", "gptq")
    assert task("cuda:0", "gptq") == task("cuda:1", "gptq")
    assert task("cpu", "rtn") == task("cuda", "rtn")


def test_a_scale_beside_a_16bit_weight_is_named(fp8_ckpt, tmp_path, capsys):
    """A half-converted FP8 folder (one weight already bf16, its scale_inv left): the scale was
    copied into the BF16 output, which then failed to load ('no matching model parameter')."""
    index = json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())
    shard = fp8_ckpt / index["weight_map"][Q_A]
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[Q_A] = tensors[Q_A].to(torch.bfloat16)
    save_file(tensors, str(shard))
    dst = tmp_path / "out"
    _fails(capsys, ["fp8-to-bf16", str(fp8_ckpt), str(dst)], dst,
           f"scale tensor {Q_A}_scale_inv has no float8_e4m3fn weight {Q_A} (found bfloat16)")
    assert not dst.exists()
