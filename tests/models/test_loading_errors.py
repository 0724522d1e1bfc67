"""Bad checkpoints give one clear error naming the file, tensor, shapes or architecture."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve.config import EngineArgs
from tests.models.hf_reference import load_ours, save_tiny

CFG = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture()
def tiny(tmp_path):
    save_tiny(transformers.LlamaForCausalLM, CFG, tmp_path / "m")
    return tmp_path / "m"


def _shard(folder, n=2):
    """Rewrite the single model.safetensors as n shards with an index."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_same(tiny, tmp_path):
    ref = load_ours(tiny)
    shutil.copytree(tiny, tmp_path / "sharded")
    _shard(tmp_path / "sharded")
    ours = load_ours(tmp_path / "sharded")
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_missing_shard_names_file(tiny):
    _shard(tiny)
    (tiny / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_ours(tiny)


def test_missing_tensor_named(tiny):
    t = load_file(tiny / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, tiny / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load_ours(tiny)


def test_misshaped_tensor_names_both_shapes(tiny):
    t = load_file(tiny / "model.safetensors")
    t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(32, 31)
    save_file(t, tiny / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj\.weight.*\(32, 31\).*\(32, 32\)"):
        load_ours(tiny)


def test_corrupt_shard_is_clear(tiny):
    data = (tiny / "model.safetensors").read_bytes()
    (tiny / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read shard .*model.safetensors"):
        load_ours(tiny)


def test_unknown_architecture_lists_supported(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MambaForCausalLM.*LlamaForCausalLM"):
        load_ours(tiny)


def test_fp8_checkpoint_stays_fp8_and_bad_scales_are_named(tiny, tmp_path):
    """A DeepSeek-style fp8 checkpoint (e4m3 + weight_scale_inv per 128x128 block) keeps its
    e4m3 values and block scales as stored (the layer expands each scale over its block's rows);
    missing, mis-shaped or non-finite scales are refused naming the tensor."""
    t = load_file(tiny / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"
    w = t[name]
    t[name] = (w / 0.5).to(torch.float8_e4m3fn)
    t[name + "_scale_inv"] = torch.tensor([[0.5]])
    save_file(t, tiny / "model.safetensors")
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tiny / "config.json").write_text(json.dumps(cfg))
    layer = load_ours(tiny).model.layers[0].mlp.gate_up_proj
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.weight[:48].view(torch.uint8), t[name].view(torch.uint8))
    assert torch.equal(layer.weight_scale_inv[:48], torch.full((48, 1), 0.5))
    for bad, why in ((torch.tensor([[0.5, 0.5]]), "scale shape"), (torch.tensor([[float("nan")]]), "non-finite")):
        t[name + "_scale_inv"] = bad
        save_file(t, tiny / "model.safetensors")
        with pytest.raises(ValueError, match=rf"^tensor {name}_scale_inv: .*{why}"):
            load_ours(tiny)
    del t[name + "_scale_inv"]
    save_file(t, tiny / "model.safetensors")
    with pytest.raises(ValueError, match=r"gate_proj\.weight_scale_inv"):
        load_ours(tiny)
    cfg["quantization_config"]["activation_scheme"] = "static"     # static input scales need per-tensor weights
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^quantization_config activation_scheme 'static' with weight_block_size "
                                         r"\[128, 128\] is not supported \(nor by vLLM\)"):
        load_ours(tiny)


@pytest.mark.parametrize("bad, why", [(float("inf"), "non-finite or non-positive"), (0.0, "non-finite or non-positive"),
                                      ("shape", r"scale_inv shape \(2, 1\) does not match")])
def test_fp8_scales_of_layers_dequantized_at_load_are_checked(tmp_path, bad, why):
    """A DeepSeek FP8 checkpoint's kv_b_proj (dequantized at load: the absorbed MLA reads it in
    the model dtype) with an infinite, zero or mis-shaped block scale is refused naming the
    tensor, as the fp8 layers refuse theirs (an inf scale would make the layer's weights inf)."""
    from deepserve.quant import quantize_checkpoint
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8-block", progress=False)
    name = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    (shard,) = (tmp_path / "fp8").glob("*.safetensors")
    t = load_file(shard)
    t[name] = torch.ones(2, 1) if bad == "shape" else torch.full_like(t[name], bad)
    save_file(t, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"^tensor {name}: .*{why}"):
        load_ours(tmp_path / "fp8")


def test_engine_args_validation_names_value():
    with pytest.raises(ValueError, match="block_size must be a power of two >= 1, got 12"):
        EngineArgs(block_size=12)
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in \\(0, 1\\], got 1.5"):
        EngineArgs(gpu_memory_utilization=1.5)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        EngineArgs(model="no-such-model").create_engine_config()


@pytest.mark.parametrize("quantization", [None, "w8a8-int8"])
def test_loading_streams_shard_by_shard(tmp_path, monkeypatch, quantization):
    """A tiny DeepSeek FP8 checkpoint in 6 shards, served as stored (fp8) and as int8 (each fp8
    tensor dequantized at load, then quantized): while shard i is read, of the tensors read
    from shard i - 2 or earlier at most one is alive outside the model's parameters (load_params' loop variable, the last tensor it took, while
    a layer's experts stream past it): host memory holds about two shards beside the model."""
    import weakref

    from deepserve.models import loader
    from deepserve.quant import quantize_checkpoint
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8-block", progress=False)
    # six shards of consecutive names, as a real index groups a layer's tensors
    folder, tensors = tmp_path / "fp8", load_file(tmp_path / "fp8" / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names, weight_map = sorted(tensors), {}
    for i in range(6):
        part = {k: tensors[k] for k in names[i * len(names) // 6:(i + 1) * len(names) // 6]}
        save_file(part, folder / f"model-{i + 1:05d}-of-00006.safetensors", metadata={"format": "pt"})
        weight_map.update({k: f"model-{i + 1:05d}-of-00006.safetensors" for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    del tensors, part
    shard_of = {name: int(f.split("-")[1]) for name, f in weight_map.items()}
    read = {}                                   # name -> weakref of the tensor read
    held = []               # per tensor read: those of shard i - 2 or earlier alive then, not parameters
    built = []

    def tracking(folder):
        for name, t in real(folder):
            owned = {p.untyped_storage().data_ptr() for p in built[0].parameters()}
            # (no strong reference to an old tensor outlives this line)
            held.append([n for n, ref in read.items() if shard_of[n] <= shard_of[name] - 2
                         and ref() is not None and ref().untyped_storage().data_ptr() not in owned])
            read[name] = weakref.ref(t)
            yield name, t
    real, build = loader.iterate_checkpoint, loader.build_model
    monkeypatch.setattr(loader, "iterate_checkpoint", tracking)
    monkeypatch.setattr(loader, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    load_ours(tmp_path / "fp8", **({"quantization": quantization} if quantization else {}))
    assert set(read) == set(weight_map) and max(shard_of.values()) == 6
    assert max(map(len, held)) <= 1, max(held, key=len)
