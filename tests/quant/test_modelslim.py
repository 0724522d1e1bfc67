"""msModelSlim W8A8 checkpoints (quant_model_description.json, int8 weight + weight_scale /
weight_offset, static or dynamic activations) on deepserve's int8 path.

An all-W8A8_DYNAMIC checkpoint holding the int8 weights of a compressed-tensors W8A8 folder
gives exactly that folder's logits (tiny Llama, tiny DeepSeek-V3 whose experts stay int8 and
whose kv_b_proj is dequantized at load); a static W8A8 layer equals the test's own formula
((x_q - offset) @ q^T) * input_scale * weight_scale, whole and as two TP ranks.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM
from deepserve.config import EngineArgs
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.linear import ColumnParallelLinear, RowParallelLinear
from deepserve.layers.quantization_modelslim import ModelSlimW8A8StaticMethod
from deepserve.models.loader import load_model
from deepserve.quant import quantize_checkpoint
from tests.models.hf_reference import save_tiny
from tests.models.test_deepseek import r1_style, save_deepseek

TOKENIZER = str(Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "stories260k")
PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 200, 11, 54, 9], [250, 1, 77, 77, 13, 140, 6, 93]]


def to_modelslim(src: Path, dst: Path) -> Path:
    """A compressed-tensors W8A8 int8 folder rewritten as msModelSlim W8A8_DYNAMIC."""
    dst.mkdir()
    desc = {"model_quant_type": "W8A8_DYNAMIC"}
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
            continue
        tensors = load_file(str(f))
        for name, t in list(tensors.items()):
            if t.dtype == torch.int8:
                module = name[: -len(".weight")]
                tensors[module + ".weight_offset"] = torch.zeros(t.shape[0], 1)
                desc[name] = "W8A8_DYNAMIC"
            elif name.endswith(".weight"):
                desc[name] = "FLOAT"
        save_file(tensors, str(dst / f.name), metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        for name, shard in list(data["weight_map"].items()):
            if desc.get(name) == "W8A8_DYNAMIC":
                data["weight_map"][name[: -len(".weight")] + ".weight_offset"] = shard
        index.write_text(json.dumps(data))
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "quant_model_description.json").write_text(json.dumps(desc))
    return dst


def _logits(path: Path, **kw) -> torch.Tensor:
    return torch.cat(LLM(model=str(path), dtype="float32", tokenizer=TOKENIZER, **kw).prompt_logits(PROMPTS))


@pytest.mark.parametrize("arch", ["llama", "deepseek"])
def test_dynamic_checkpoint_equals_compressed_tensors_int8(arch, tmp_path):
    ref = tmp_path / "ref"
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=192,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)
        save_tiny(transformers.LlamaForCausalLM, cfg, ref)
    else:
        save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), ref)
    quantize_checkpoint(ref, tmp_path / "ct", "w8a8-int8", progress=False)
    slim = to_modelslim(tmp_path / "ct", tmp_path / "slim")
    llm = LLM(model=str(slim), dtype="float32", tokenizer=TOKENIZER, quantization="ascend")
    int8 = [n for n, p in llm.engine.runner.model.named_parameters() if p.dtype == torch.int8]
    assert int8 and all("kv_b_proj" not in n for n in int8)
    if arch == "deepseek":
        assert "model.layers.2.mlp.experts.w13_weight" in int8 and "model.layers.2.mlp.experts.w2_weight" in int8
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = _logits(tmp_path / "ct")
    assert torch.equal(got, want), (got - want).abs().max()


def _static_tensors(n, k, seed, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    w_scale = torch.rand(n, 1, generator=g) * 1e-3 + 1e-4
    in_scale = torch.tensor([0.02])
    quant_bias = (-offset * q.long().sum(1)).int()
    return {"weight": q, "weight_scale": w_scale, "weight_offset": torch.zeros(n, 1),
            "input_scale": in_scale, "input_offset": torch.tensor([offset]), "quant_bias": quant_bias}


def _static_reference(x, t):
    xq = torch.clamp(torch.round(x.double() / t["input_scale"].double() + t["input_offset"].double()), -128, 127)
    acc = (xq - t["input_offset"].double()) @ t["weight"].double().t()
    return (acc * t["input_scale"].double() * t["weight_scale"].double().t()).float()


def _load_static(layer, tensors):
    layer.set_quant_method(ModelSlimW8A8StaticMethod())
    for name, t in tensors.items():
        if name == "weight_offset":
            continue   # checked to be zero and dropped by the loader's stream
        param = getattr(layer, name)
        param.weight_loader(param, t)
    return layer


def test_static_w8a8_layer_matches_its_formula_whole_and_tp_sharded():
    t = _static_tensors(40, 64, seed=1)
    x = torch.randn(5, 64)
    want = _static_reference(x, t)
    whole = _load_static(ColumnParallelLinear(64, 40), t)(x)
    torch.testing.assert_close(whole, want, rtol=1e-6, atol=1e-6)
    cols = [_load_static(ColumnParallelLinear(64, 40, pctx=ParallelContext(tp_rank=r, tp_size=2)), t)(x)
            for r in range(2)]
    assert torch.equal(torch.cat(cols, -1), whole)
    rows = [_load_static(RowParallelLinear(64, 40, pctx=ParallelContext(tp_rank=r, tp_size=2),
                                           reduce_results=False), t)(x.chunk(2, -1)[r]) for r in range(2)]
    torch.testing.assert_close(rows[0] + rows[1], want, rtol=1e-5, atol=1e-5)   # quant_bias added once


def test_nonzero_weight_offset_is_refused(tmp_path):
    from deepserve.quant.modelslim import modelslim_stream
    desc = {"m.weight": "W8A8_DYNAMIC"}
    stream = modelslim_stream([("m.weight_offset", torch.ones(4, 1))], desc, lambda m: True, torch.float32)
    with pytest.raises(ValueError, match="tensor m.weight_offset: nonzero weight offsets"):
        list(stream)


def test_mtp_layer_is_int8_where_the_description_says(tmp_path):
    """R1's MTP layer (model.layers.61, here 3) is named differently in the model (mtp.0.*): its
    Linears still get the method the description gives their checkpoint modules, so the layer
    loads exactly as from the compressed-tensors folder the checkpoint was made from."""
    from tests.cli.conftest import R1_TOKENIZER, build_tiny_r1

    if not R1_TOKENIZER.is_dir():
        pytest.skip(f"{R1_TOKENIZER} not found (CI clones the repo beside shared/)")
    quantize_checkpoint(build_tiny_r1(tmp_path / "r1"), tmp_path / "ct", "w8a8-int8", progress=False)
    slim = to_modelslim(tmp_path / "ct", tmp_path / "slim")

    def mtp_params(path, **kw):
        config = EngineArgs(model=str(path), dtype="float32", **kw).create_engine_config().model
        model = load_model(dataclasses.replace(config, load_mtp=True), torch.device("cpu"))
        return dict(model.mtp.named_parameters())

    got, want = mtp_params(slim, quantization="ascend"), mtp_params(tmp_path / "ct")
    assert got.keys() == want.keys()
    assert got["0.mtp_block.mlp.shared_experts.down_proj.weight"].dtype == torch.int8
    assert got["0.mtp_block.self_attn.q_a_proj.weight"].dtype == torch.int8
    for name, param in got.items():
        assert torch.equal(param, want[name]), name
