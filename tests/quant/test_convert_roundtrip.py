"""`deepserve convert`: BF16 -> fp8-block -> BF16 bit for bit, and the w8a8-int8 format."""
from __future__ import annotations

import json
import math

import torch
from conftest import BIAS, QUANTIZED
from safetensors import safe_open

from deepserve.cli.main import main
from deepserve.quant import convert_fp8_to_bf16, quantize_checkpoint

SCALE = "_scale_inv"


def load_folder(root):
    """Every tensor of a checkpoint folder, read through its index."""
    index = json.loads((root / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(root / fname), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == fname
                out[name] = f.get_tensor(name)
    assert set(out) == set(index["weight_map"])
    return out, index


def ref_dequant(q, s):
    """Per-block oracle: bf16(fp32(q) * s) one 128x128 block at a time."""
    y = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(math.ceil(q.shape[0] / 128)):
        for j in range(math.ceil(q.shape[1] / 128)):
            r, c = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            y[r, c] = (q[r, c].float() * s[i, j]).to(torch.bfloat16)
    return y


def test_fp8_block_roundtrip_bit_exact(bf16_ckpt, tmp_path, capsys):
    src, _ = load_folder(bf16_ckpt)
    fp8_dir, back_dir = tmp_path / "fp8", tmp_path / "back"
    assert main(["convert", "quantize", str(bf16_ckpt), str(fp8_dir), "--method", "fp8-block",
                 "--no-progress"]) == 0
    assert "2 shard(s) converted" in capsys.readouterr().out

    fp8, fp8_index = load_folder(fp8_dir)
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3",
                                          "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    assert set(fp8) == set(src) | {n + SCALE for n in QUANTIZED}
    for name, t in src.items():
        if name in QUANTIZED:
            assert fp8[name].dtype == torch.float8_e4m3fn
            assert fp8[name + SCALE].shape == (math.ceil(t.shape[0] / 128),
                                               math.ceil(t.shape[1] / 128))
            assert fp8_index["weight_map"][name + SCALE] == fp8_index["weight_map"][name]
        else:  # embeddings, lm_head, norms, router gate, bias: untouched
            assert fp8[name].dtype == t.dtype and torch.equal(fp8[name], t), name
    assert fp8[BIAS].dtype == torch.float32

    rep = convert_fp8_to_bf16(fp8_dir, back_dir, progress=False)
    assert (rep.shards_converted, rep.shards_skipped) == (2, 0)
    back, back_index = load_folder(back_dir)
    assert set(back) == set(src)  # no scale entries left
    assert not any(k.endswith(SCALE) for k in back_index["weight_map"])
    total = sum(t.numel() * t.element_size() for t in back.values())
    assert back_index["metadata"]["total_size"] == total
    for name, t in back.items():
        if name in QUANTIZED:
            want = ref_dequant(fp8[name], fp8[name + SCALE])
            assert t.dtype == torch.bfloat16
            assert torch.equal(t.view(torch.int16), want.view(torch.int16)), name
            # and the round trip stays close to the original weights
            err = (t.float() - src[name].float()).abs().max().item()
            assert err <= 2 ** -4 * src[name].float().abs().max().item(), name
        else:
            assert torch.equal(t, src[name]), name

    cfg = json.loads((back_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert "auto_map" not in cfg and cfg["model_type"] == "deepseek_v3"
    names = sorted(p.name for p in back_dir.iterdir())
    assert names == sorted(["config.json", "generation_config.json", "tokenizer_config.json",
                            "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"])  # no *.py, no manifest
    assert not (tmp_path / "back.partial").exists()


def test_w8a8_int8_compressed_tensors_format(bf16_ckpt, tmp_path):
    dst = tmp_path / "int8"
    quantize_checkpoint(bf16_ckpt, dst, "w8a8-int8", progress=False)
    src, _ = load_folder(bf16_ckpt)
    out, index = load_folder(dst)
    assert set(out) == set(src) | {n + "_scale" for n in QUANTIZED}
    for name, t in src.items():
        if name not in QUANTIZED:
            assert torch.equal(out[name], t), name
            continue
        q, s = out[name], out[name + "_scale"]
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (t.shape[0], 1)
        w = t.float()
        assert torch.equal(q, torch.round(w / s).clamp(-127, 127).to(torch.int8))
        err = (q.float() * s - w).abs()
        assert bool((err <= s * 0.5 * (1 + 1e-5)).all()), name
        assert (err.norm() / w.norm()).item() < 0.02, name

    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["strategy"], w["dynamic"]) == \
        (8, "int", True, "channel", False)
    assert (a["num_bits"], a["type"], a["symmetric"], a["strategy"], a["dynamic"]) == \
        (8, "int", True, "token", True)
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.gate"]


def test_overwrite_replaces_destination(bf16_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    assert main(["convert", "quantize", str(bf16_ckpt), str(dst), "--method", "w8a8-int8",
                 "--overwrite", "--no-progress"]) == 0
    assert not (dst / "stale.txt").exists()
    assert (dst / "model-00002-of-00002.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "out"]


def test_folder_without_index_converts_every_shard(bf16_ckpt, tmp_path):
    """Without an index the engine loads every *.safetensors file (an MTP layer may sit in a
    shard of its own beside model.safetensors): the converter converts them all, not only
    model.safetensors."""
    (bf16_ckpt / "model.safetensors.index.json").unlink()
    (bf16_ckpt / "model-00001-of-00002.safetensors").rename(bf16_ckpt / "model.safetensors")
    (bf16_ckpt / "model-00002-of-00002.safetensors").rename(bf16_ckpt / "model-mtp.safetensors")
    source = {}
    for shard in bf16_ckpt.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            source.update({n: f.get_slice(n).get_dtype() for n in f.keys()})
    dst = tmp_path / "out"
    quantize_checkpoint(bf16_ckpt, dst, "fp8-block", progress=False)
    out = {}
    for shard in dst.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            out.update({n: f.get_slice(n).get_dtype() for n in f.keys()})
    assert set(source) == {n for n in out if not n.endswith(SCALE)}
    assert out["model.layers.1.mlp.experts.2.down_proj.weight"] == "F8_E4M3"       # from the second file
