"""`deepserve convert` refusing a tensor after it wrote some shards says that they are kept in
DST.partial and how to resume; after the source is fixed, the same command resumes there."""
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepserve.cli.main import main
from deepserve.quant import quantize_checkpoint
from tests.quant.conftest import BIAS, CONFIG, E, SHARD1, SHARD2, _tensor, write_checkpoint

SCALE = "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv"   # in the second shard


def test_a_tensor_refused_in_the_second_shard_keeps_the_first(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    s2 = {n: _tensor(n, s, gen) for n, s in SHARD2.items()}
    s2[BIAS] = torch.randn(E, generator=gen)
    bf16 = write_checkpoint(tmp_path / "bf16", {"model-00001-of-00002.safetensors": {
        n: _tensor(n, s, gen) for n, s in SHARD1.items()}, "model-00002-of-00002.safetensors": s2}, CONFIG)
    quantize_checkpoint(bf16, tmp_path / "fp8", "fp8-block", progress=False)
    shard = tmp_path / "fp8" / "model-00002-of-00002.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    good = tensors[SCALE].clone()
    tensors[SCALE][0, 0] = float("nan")
    save_file(tensors, str(shard))

    out = tmp_path / "bf16-out"
    argv = ["convert", "fp8-to-bf16", str(tmp_path / "fp8"), str(out), "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"deepserve convert: error: tensor {SCALE}: scale_inv has non-finite or non-positive values (nan at [0, 0]); "
        f"what was written stays in {out}.partial: re-run the same command to resume\n")
    assert not out.exists() and (tmp_path / "bf16-out.partial" / "model-00001-of-00002.safetensors").is_file()

    tensors[SCALE] = good
    save_file(tensors, str(shard))
    assert main(argv) == 0
    assert "1 shard(s) converted, 1 already done and verified" in capsys.readouterr().out
