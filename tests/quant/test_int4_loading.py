"""4-bit checkpoints (AutoAWQ GEMM, GPTQ, compressed-tensors pack-quantized) loaded into the
int4 linear method: every layer's output equals x @ dequant(W)^T exactly, with W computed in
the test from the integers it packed by each format's published rule (tests/quant/int4_formats.py);
TP shards (column, QKV, row, with and without act-order) give the full layer; tiny Llama and
Qwen2 checkpoints in every format give exactly the logits of the same model holding the
dequantized fp32 weights; bad checkpoints fail with one line naming the tensor.
"""
from __future__ import annotations

import logging

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM, SamplingParams
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                     RowParallelLinear)
from deepserve.layers.quantization_int4 import Int4LinearMethod
from deepserve.quant.int4 import int4_spec, int4_stream
from tests.models.hf_reference import save_tiny
from tests.quant.int4_formats import dequantize, format_tensors, gptq_tensors, quantization_config, quantize

FORMATS = [  # (format, group, symmetric, act order)
    ("awq", 32, False, False), ("awq", 128, False, False), ("awq", -1, False, False),
    ("gptq", 64, True, False), ("gptq", 32, False, False), ("gptq", 32, True, True),
    ("gptq", 64, False, True),
    ("compressed-tensors", 32, True, False), ("compressed-tensors", -1, True, False),
    ("compressed-tensors", 64, False, False), ("compressed-tensors", 32, True, True),
]
IDS = [f"{f}-g{g}-{'sym' if s else 'asym'}{'-actorder' if a else ''}" for f, g, s, a in FORMATS]


def _spec(fmt, group, sym, act_order, **kw):
    return int4_spec({"quantization_config": quantization_config(fmt, group, sym, act_order, **kw),
                      "torch_dtype": "float16"})


def _packed(fmt, group, sym, act_order, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    # projections of one input share its act-order permutation
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)) if act_order else None
    u, z, s, g_idx = quantize(w, group, sym, perm)
    return format_tensors(fmt, u, z, s, g_idx, sym, act_order), dequantize(u, z, s, g_idx)


def _load(layer, spec, tensors: dict, shard_id=None):
    layer.set_quant_method(Int4LinearMethod(spec))
    for name, t in tensors.items():
        param = getattr(layer, name, None)
        if param is None:   # dropped by the loader's stream (int4_stream) after its checks
            assert name == "weight_shape" or name == "g_idx" and not spec.act_order
            continue
        param.param_name = name
        param.weight_loader(param, t, shard_id)
    return layer


@pytest.mark.parametrize("fmt,group,sym,act_order", FORMATS, ids=IDS)
def test_layer_output_is_x_times_dequantized_weight(fmt, group, sym, act_order):
    spec = _spec(fmt, group, sym, act_order)
    tensors, w = _packed(fmt, group, sym, act_order, 64, 128, seed=1)
    x = torch.randn(5, 128)
    layer = _load(ReplicatedLinear(128, 64, bias=True), spec, tensors)
    layer.bias.data.copy_(torch.randn(64))
    qweight = getattr(layer, spec.names["qweight"])
    assert qweight.dtype == torch.int32 and qweight.shape == (64, 16)   # stays 4-bit in memory
    assert torch.equal(layer(x), F.linear(x, w, layer.bias))
    xb, bb = x.bfloat16(), layer.bias.bfloat16()
    assert torch.equal(layer.quant_method.apply(layer, xb, bb), F.linear(xb, w.bfloat16(), bb))


def _tp(rank, size=2):
    return ParallelContext(tp_rank=rank, tp_size=size)


@pytest.mark.parametrize("fmt,group,sym,act_order", FORMATS, ids=IDS)
def test_tp_shards_give_the_full_layer(fmt, group, sym, act_order):
    spec = _spec(fmt, group, sym, act_order)
    x = torch.randn(3, 256)
    # column: each rank's rows
    tensors, w = _packed(fmt, group, sym, act_order, 96, 256, seed=2)
    outs = [_load(ColumnParallelLinear(256, 96, pctx=_tp(r)), spec, tensors)(x) for r in range(2)]
    assert torch.equal(torch.cat(outs, -1), F.linear(x, w))
    # q/k/v stacked, one KV head replicated over the two ranks
    qkv = {s: _packed(fmt, group, sym, act_order, n, 256, seed=3 + i)
           for i, (s, n) in enumerate([("q", 64), ("k", 32), ("v", 32)])}
    outs = []
    for r in range(2):
        layer = QKVParallelLinear(256, 32, 2, 1, pctx=_tp(r))
        layer.set_quant_method(Int4LinearMethod(spec))
        for s, (tensors, _) in qkv.items():
            for name, t in tensors.items():
                if hasattr(layer, name):
                    getattr(layer, name).weight_loader(getattr(layer, name), t, s)
        outs.append(layer(x))
    want = {s: F.linear(x, qkv[s][1]) for s in qkv}
    assert torch.equal(outs[0][:, :32], want["q"][:, :32]) and torch.equal(outs[1][:, :32], want["q"][:, 32:])
    for r in range(2):
        assert torch.equal(outs[r][:, 32:], torch.cat([want["k"], want["v"]], -1))
    # row: input features split; with act-order every rank keeps all groups' scales
    tensors, w = _packed(fmt, group, sym, act_order, 40, 256, seed=9)
    parts = [_load(RowParallelLinear(256, 40, pctx=_tp(r), reduce_results=False), spec, tensors)(x.chunk(2, -1)[r])
             for r in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], F.linear(x, w), rtol=1e-5, atol=1e-5)
    halves = w.chunk(2, -1)
    for r in range(2):
        assert torch.equal(parts[r], F.linear(x.chunk(2, -1)[r], halves[r]))


# ---------------------------------------------------------------------------- whole models
def _quantize_folder(ref: Path, dst: Path, fmt, group, sym, act_order, skip=(), activations=False):
    """(4-bit folder, dequantized fp32 folder) from the fp32 folder `ref`."""
    tensors = load_file(str(ref / "model.safetensors"))
    spec = _spec(fmt, group, sym, act_order, skip=skip)
    q_out, f_out = {}, {}
    g = torch.Generator().manual_seed(7)
    perms = {}
    for name, t in sorted(tensors.items()):
        module = name[: -len(".weight")]
        linear = (name.endswith(".weight") and t.dim() == 2 and "embed" not in name and "norm" not in name
                  and "lm_head" not in name and not name.endswith("mlp.gate.weight"))
        if not linear or spec.skipped(module):
            q_out[name] = f_out[name] = t
            continue
        perm = None
        if act_order:   # the projections of one input share its reordering
            key = (module.rsplit(".", 1)[0], t.shape[1],
                   module.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
            perm = perms.setdefault(key, torch.randperm(t.shape[1], generator=g))
        u, z, s, g_idx = quantize(t, group, sym, perm)
        for suffix, packed in format_tensors(fmt, u, z, s, g_idx, sym, act_order).items():
            q_out[f"{module}.{suffix}"] = packed
        f_out[name] = dequantize(u, z, s, g_idx)
    qc = quantization_config(fmt, group, sym, act_order, skip=skip, activations=activations)
    return (write_variant(ref, dst / fmt, q_out, qc, torch_dtype="float16"),
            write_variant(ref, dst / "dequantized", f_out, None))


def write_variant(ref: Path, folder: Path, tensors: dict, qc, torch_dtype=None) -> Path:
    """`folder`: the checkpoint `ref` with `tensors` as its weights and `qc` (if any) as its
    quantization_config."""
    folder.mkdir(parents=True)
    for f in ref.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    if qc:
        cfg["quantization_config"] = qc
        if torch_dtype:
            cfg["torch_dtype"] = torch_dtype
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


TOKENIZER = str(Path(__file__).resolve().parents[2] / "deepserve" / "assets" / "stories260k")
PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 7, 7, 123, 200, 11, 54, 9], [250, 1, 77, 77, 13, 140, 6, 93]]
MODELS = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """arch -> a tiny fp32 checkpoint folder of that architecture, written on first use."""
    folders = {}

    def get(arch: str) -> Path:
        if arch not in folders:
            cls, config = MODELS[arch]
            cfg = config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=False)
            folders[arch] = tmp_path_factory.mktemp(arch) / "ref"
            save_tiny(cls, cfg, folders[arch])
        return folders[arch]
    return get


MODEL_CASES = [("llama", "awq", 32, False, False, ("layers.1.mlp.down_proj",)),
               ("qwen2", "awq", 64, False, False, ()),
               ("llama", "gptq", 64, True, True, ()), ("qwen2", "gptq", 32, False, False, ()),
               ("llama", "compressed-tensors", 32, True, False, ()),
               ("qwen2", "compressed-tensors", -1, False, True, ("re:.*layers\\.0\\.self_attn\\.o_proj$",))]


@pytest.mark.parametrize("arch,fmt,group,sym,act_order,skip", MODEL_CASES,
                         ids=[f"{c[0]}-{c[1]}-g{c[2]}" + ("-actorder" if c[4] else "") for c in MODEL_CASES])
def test_model_logits_equal_the_dequantized_model(tiny_folders, tmp_path, arch, fmt, group, sym, act_order, skip):
    ref = tiny_folders(arch)
    q, deq = _quantize_folder(ref, tmp_path, fmt, group, sym, act_order, skip)
    llm = LLM(model=str(q), dtype="float32", tokenizer=TOKENIZER)
    model = llm.engine.runner.model
    packed = [n for n, p in model.named_parameters() if p.dtype == torch.int32 and p.dim() == 2]
    assert len(packed) == 2 * 4 - len(skip)        # qkv, o, gate_up, down per layer, minus skipped
    got = torch.cat(llm.prompt_logits(PROMPTS))
    ref_llm = LLM(model=str(deq), dtype="float32", tokenizer=TOKENIZER)
    want = torch.cat(ref_llm.prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()
    params = SamplingParams(temperature=0.0, max_tokens=12)
    a = llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0].outputs[0].token_ids
    b = ref_llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0].outputs[0].token_ids
    assert a == b


# ---------------------------------------------------------------------------- bad input
def test_bad_4bit_checkpoints_fail_naming_the_tensor_and_value():
    spec = _spec("awq", 32, False, False)
    tensors, _ = _packed("awq", 32, False, False, 64, 128, seed=1)
    with pytest.raises(ValueError, match=r"tensor qweight: packed 4-bit weight torch.int32 \(128, 8\) .*awq stores int32 \(128, 4\)"):
        _load(ReplicatedLinear(128, 32), spec, tensors)
    with pytest.raises(ValueError, match="group size 48 does not divide the 128 input features"):
        ReplicatedLinear(128, 64).set_quant_method(Int4LinearMethod(_spec("gptq", 48, True, False)))
    with pytest.raises(ValueError, match="8-bit weights are not supported"):
        int4_spec({"quantization_config": {**quantization_config("gptq", 32, True, False), "bits": 8}})
    ct = _spec("compressed-tensors", 32, True, False)
    stream = int4_stream([("m.weight_packed", torch.zeros(4, 16, dtype=torch.int32)),
                          ("m.weight_shape", torch.tensor([4, 64]))], ct, lambda m: True, torch.float32)
    with pytest.raises(ValueError, match=r"tensor m.weight_shape: \[4, 64\] does not match m.weight_packed \[4, 16\]"):
        list(stream)
    with pytest.raises(ValueError, match="not a whole number of 64-wide groups"):
        RowParallelLinear(192, 64, pctx=_tp(0)).set_quant_method(Int4LinearMethod(_spec("awq", 64, False, False)))


def test_non_finite_4bit_scales_are_refused_naming_the_tensor():
    """A NaN scale, or one past float16's range (the _spec's scale dtype), in a 4-bit Linear or
    expert would turn its group's outputs into NaN: refused naming the tensor."""
    from deepserve.layers.moe import FusedMoE
    from deepserve.layers.moe_int4 import Int4Experts
    for fmt, bad in (("awq", float("nan")), ("gptq", 1e6)):
        tensors, _ = _packed(fmt, 32, True, False, 32, 128, seed=1)
        tensors["scales"] = tensors["scales"].float()
        tensors["scales"][1, 2] = bad
        with pytest.raises(ValueError, match=rf"^tensor scales: scales have non-finite values \(in torch.float16: "
                                             rf"{bad} at \[1, 2\]\)$"):
            _load(ReplicatedLinear(128, 32), _spec(fmt, 32, True, False), tensors)
    spec = _spec("compressed-tensors", 32, True, False)
    moe = FusedMoE(2, 64, 64)
    Int4Experts(spec).create(moe)
    tensors, _ = _packed("compressed-tensors", 32, True, False, 64, 64, seed=2)
    tensors["weight_scale"][0, 0] = float("inf")
    moe.w13_weight_scale.param_name = "model.layers.1.mlp.experts.w13_weight_scale"
    with pytest.raises(ValueError, match=r"experts.w13_weight_scale.*scales have non-finite values"):
        moe.w13_weight_scale.weight_loader(moe.w13_weight_scale, tensors["weight_scale"], (1, "w1"))


def test_bad_group_size_in_a_checkpoint_names_its_modules(tiny_folders, tmp_path):
    """A 4-bit checkpoint whose group size does not divide a layer's input features is refused
    naming the checkpoint modules of that layer (q/k/v fused into one), and 4-bit experts
    naming their FusedMoE; 8-bit pack-quantized weights name their bit width."""
    from deepserve.layers.moe import FusedMoE
    from deepserve.layers.moe_int4 import quantize_int4_experts
    from tests.models.hf_reference import load_ours
    q, _ = _quantize_folder(tiny_folders("llama"), tmp_path, "compressed-tensors", 32, True, False)
    cfg = json.loads((q / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights["group_size"] = 48
    (q / "config.json").write_text(json.dumps(cfg))
    layer = "model.layers.0.self_attn"
    with pytest.raises(ValueError, match=rf"^{layer}.q_proj, {layer}.k_proj, {layer}.v_proj: .*group size 48 "
                                         r"does not divide the 128 input features$"):
        load_ours(q)
    weights["group_size"], weights["num_bits"] = 32, 8
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^compressed-tensors format 'pack-quantized' with 8-bit weights "):
        load_ours(q)
    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = FusedMoE(4, 64, 40)
    with pytest.raises(ValueError, match=r"^mlp.experts: .*group size 16 does not divide the input features 64 "
                                         r"\(gate/up\) and 40 \(down\)$"):
        quantize_int4_experts(model, _spec("compressed-tensors", 16, True, False))


# ---------------------------------------------------------------------------- W4A8
@pytest.mark.parametrize("group", [32, -1])
def test_w4a8_layer_is_int8_tokens_times_dequantized_weight(group):
    """compressed-tensors W4A8: activations quantized per token to int8 (amax / 127), the
    4-bit weight dequantized; compared in float64 with the test's own quantizer."""
    spec = _spec("compressed-tensors", group, True, False, activations=True)
    assert spec.method == "w4a8-int8"
    tensors, w = _packed("compressed-tensors", group, True, False, 48, 128, seed=4)
    x = torch.randn(6, 128) * torch.linspace(0.1, 3, 6)[:, None]
    layer = _load(ColumnParallelLinear(128, 48), spec, tensors)
    sx = x.double().abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x.double() / sx).clamp(-127, 127)
    want = ((xq * sx) @ w.double().t()).float()
    torch.testing.assert_close(layer(x), want, rtol=1e-6, atol=1e-6)
    assert not torch.equal(layer(x), F.linear(x, w))     # the activations really were quantized


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_w4a8_model_tracks_the_dequantized_model(tiny_folders, tmp_path, arch):
    ref = tiny_folders(arch)
    q, deq = _quantize_folder(ref, tmp_path, "compressed-tensors", 32, True, False, activations=True)
    got = torch.cat(LLM(model=str(q), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(deq), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"W4A8 vs dequantized W4A16 weights: top-1 agreement {top1:.3f}")
    assert top1 >= 0.95 and not torch.equal(got, want)


def test_stories260k_in_4bit_keeps_its_story(tmp_path):
    """The real trained tiny Llama (stories260k) with its attention and gate/up projections in
    compressed-tensors 4-bit (round-to-nearest, asymmetric, group 16; down_proj's 172
    input features do not pack into int32s, so the checkpoint ignores it): teacher-forced on the
    fp32 model's 200-token greedy story, the 4-bit model's top-1 agrees >= 90%."""
    stories = Path(TOKENIZER)
    q, _ = _quantize_folder(stories, tmp_path, "compressed-tensors", 16, False, False, skip=("re:.*down_proj$",))
    ref = LLM(model=str(stories), dtype="float32")
    prompt = ref.tokenizer.encode("Once upon a time, there was a little girl named Lily.")
    story = ref.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=200,
                                                                       ignore_eos=True))[0].outputs[0].token_ids
    llm = LLM(model=str(q), dtype="float32", tokenizer=str(stories))
    assert llm.engine.runner.model.model.layers[0].mlp.gate_up_proj.weight_packed.dtype == torch.int32
    logits = llm.prompt_logits([prompt + list(story)])[0]
    top1 = logits[len(prompt) - 1:-1].argmax(-1)
    agree = (top1 == torch.tensor(story)).float().mean().item()
    print(f"stories260k 4-bit: top-1 agreement with fp32 over {len(story)} tokens {agree:.3f}")
    assert len(story) == 200 and agree >= 0.90


def test_gptq_v2_zero_points_are_stored_as_is():
    """GPTQModel's checkpoint_format gptq_v2 stores z itself (v1 stores z - 1): the same packed
    integers read under each convention give the layer the zeros the packer meant."""
    g = torch.Generator().manual_seed(8)
    u, z, s, g_idx = quantize(torch.randn(32, 64, generator=g) * 0.05, 32, False)
    x = torch.randn(3, 64, generator=g)
    for v1 in (True, False):
        qc = {**quantization_config("gptq", 32, False, False), "checkpoint_format": "gptq" if v1 else "gptq_v2"}
        spec = int4_spec({"quantization_config": qc, "torch_dtype": "float16"})
        tensors = gptq_tensors(u, z, s, g_idx, v1=v1)
        del tensors["g_idx"]
        layer = _load(ReplicatedLinear(64, 32), spec, tensors)
        assert torch.equal(layer(x), F.linear(x, dequantize(u, z, s, g_idx)))


@pytest.mark.parametrize("fmt,dropped", [(None, "model.layers.0.self_attn.q_proj.weight"),
                                         ("awq", "model.layers.1.mlp.up_proj.qzeros"),
                                         ("compressed-tensors", "model.layers.0.self_attn.v_proj.weight_scale"),
                                         ("msmodelslim", "model.layers.0.self_attn.q_proj.weight_scale")])
def test_a_missing_part_of_a_fused_parameter_is_named(tiny_folders, tmp_path, fmt, dropped):
    """q/k/v and gate/up load into one fused parameter each: a checkpoint lacking one part
    (here q_proj's weight, up_proj's zero points, v_proj's 4-bit or q_proj's msModelSlim int8 scales) is
    refused naming that tensor, not loaded with the slice left uninitialised (or at scale 1)."""
    from deepserve.quant import quantize_checkpoint
    from tests.models.hf_reference import load_ours
    ref = tiny_folders("llama")
    if fmt == "msmodelslim":
        from tests.quant.test_modelslim import to_modelslim
        quantize_checkpoint(ref, tmp_path / "int8", "w8a8-int8", progress=False)
        folder = to_modelslim(tmp_path / "int8", tmp_path / "modelslim")
    else:
        folder = ref if fmt is None else _quantize_folder(ref, tmp_path, fmt, 32, False, False)[0]
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors[dropped]
    broken = write_variant(folder, tmp_path / "broken", tensors, None)
    with pytest.raises(ValueError, match=rf"^checkpoint lacks tensor {re.escape(dropped)} \(the other parts of "):
        load_ours(broken)


def test_unknown_quantization_config_fields_are_named_and_meaningful_ones_refused(caplog):
    """A quantization_config field the format does not define loads with a warning naming it;
    fields known to change what the integers mean (GPTQModel's per-module `dynamic` overrides of bits or groups, a
    compressed-tensors transform, fp8 other than e4m3) are refused naming them. Fields that only
    record how the checkpoint was made load without a word."""
    from deepserve.models.loader import checkpoint_quantization

    def stored(qc):
        return checkpoint_quantization({"quantization_config": qc, "torch_dtype": "float16"})
    for fmt in ("awq", "gptq", "compressed-tensors"):
        qc = quantization_config(fmt, 32, fmt != "awq", False)
        with caplog.at_level(logging.WARNING, logger="deepserve"):
            caplog.clear()
            assert stored({**qc, "frobnicate": 1}) == stored(qc)    # loads, and the warning names the field
        assert f"quantization_config ({fmt}): unknown field(s) 'frobnicate'" in caplog.text
    ct = quantization_config("compressed-tensors", 32, True, False)
    ct["config_groups"]["group_0"]["weights"]["zero_scale"] = 2.0
    with caplog.at_level(logging.WARNING, logger="deepserve"):
        caplog.clear()
        stored(ct)
    assert "compressed-tensors group group_0 weights: unknown field(s) 'zero_scale'" in caplog.text
    with pytest.raises(ValueError, match=r"^quantization_config \(gptq\): dynamic '.\*mlp.\*': .* deepserve does not"):
        stored({**quantization_config("gptq", 32, True, False), "dynamic": {".*mlp.*": {"bits": 8}}})
    assert stored({**quantization_config("gptq", 32, True, False), "dynamic": {"-:.*mlp.*": {}}}) == "gptq"
    with pytest.raises(ValueError, match=r"^quantization_config \(fp8\): fmt 'e5m2' is not supported"):
        stored({"quant_method": "fp8", "fmt": "e5m2", "activation_scheme": "dynamic", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match=r"^quantization_config \(compressed-tensors\): transform_config"):
        stored({**quantization_config("compressed-tensors", 32, True, False), "transform_config": {"x": 1}})
    # as AutoGPTQ / transformers / llm-compressor / AutoAWQ write them
    assert stored({**quantization_config("gptq", 32, True, False), "damp_percent": 0.01, "true_sequential": True,
                   "static_groups": False, "model_file_base_name": "model", "dynamic": None}) == "gptq"
    assert stored({**quantization_config("gptq", 32, True, False), "lm_head": False, "pack_dtype": "int32",
                   "act_group_aware": True, "mse": 0.0, "meta": {"quantizer": ["gptqmodel:4.2.0"]}}) == "gptq"
    assert stored({**quantization_config("awq", 32, False, False), "do_fuse": False, "backend": "autoawq"}) == "awq"
    ct = quantization_config("compressed-tensors", 32, True, False)
    ct["config_groups"]["group_0"]["weights"].update(observer="minmax", observer_kwargs={}, block_structure=None)
    assert stored({**ct, "sparsity_config": {}, "quantization_status": "compressed", "version": "0.9"}) == "w4a16"


def test_a_quantization_flag_that_conflicts_with_the_checkpoint_names_both():
    """`--quantization` naming another format than the checkpoint's says which format the
    checkpoint is in (was "cannot serve a w4a16 / a awq checkpoint"); on a high-precision
    checkpoint a 4-bit name says how to get 4-bit weights."""
    from deepserve.models.loader import choose_quantization
    assert choose_quantization("compressed-tensors", "w4a8-int8") == "w4a8-int8"
    with pytest.raises(ValueError, match=r"^--quantization awq cannot serve this compressed-tensors W4A16 "
                                         r"checkpoint: .*leave --quantization out"):
        choose_quantization("awq", "w4a16")
    with pytest.raises(ValueError, match=r"^--quantization compressed-tensors cannot serve this AutoAWQ checkpoint"):
        choose_quantization("compressed-tensors", "awq")
    with pytest.raises(ValueError, match=r"^--quantization gptq loads GPTQ checkpoints and this one is high "
                                         r"precision \(add --load-format dummy"):
        choose_quantization("gptq", None)


def test_an_fp8_row_parallel_layer_too_narrow_to_split_says_tp_1():
    """fp8 scale blocks are 128 wide: a row-parallel layer of 64 input features has no TP split
    that keeps whole blocks (the message asked for 'a tensor-parallel size that divides 0')."""
    from deepserve.layers.quantization import Fp8BlockLinearMethod
    with pytest.raises(ValueError, match=r"its 64 input features allow no split: use --tensor-parallel-size 1$"):
        RowParallelLinear(64, 32, pctx=_tp(0)).set_quant_method(Fp8BlockLinearMethod())
    with pytest.raises(ValueError, match=r"use a tensor-parallel size that divides 3$"):
        RowParallelLinear(384, 32, pctx=_tp(0, 4)).set_quant_method(Fp8BlockLinearMethod())


def test_config_groups_that_differ_only_in_targets_are_one_scheme(tiny_folders, tmp_path):
    """llm-compressor writes one config group per targets list: two groups with the same 4-bit
    scheme (here attention and MLP) were refused as "one 4-bit scheme per checkpoint"; they
    load, each module quantized as its group says, and give the dequantized model's logits.
    Groups whose schemes differ are still refused, naming them."""
    from deepserve.quant.ct_fp8 import ct_fp8_scheme
    q, deq = _quantize_folder(tiny_folders("llama"), tmp_path, "compressed-tensors", 32, True, False)
    cfg = json.loads((q / "config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"]
    scheme = groups.pop("group_0")
    groups["attention"] = {**scheme, "targets": ["re:.*self_attn\\..*_proj$"]}
    groups["mlp"] = {**scheme, "targets": ["re:.*mlp\\..*_proj$"]}
    cfg["quantization_config"]["format"] = "mixed-precision"
    (q / "config.json").write_text(json.dumps(cfg))
    got = torch.cat(LLM(model=str(q), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(deq), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want)
    groups["mlp"] = {**scheme, "weights": {**scheme["weights"], "group_size": 64}}
    with pytest.raises(ValueError, match=r"config_groups \['attention', 'mlp'\]: deepserve serves one 4-bit scheme"):
        int4_spec(cfg)
    fp8 = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
           "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"a": {**fp8, "targets": ["re:.*self_attn.*"]}, "b": {**fp8, "targets": ["re:.*mlp.*"]}}}
    assert ct_fp8_scheme(qc).strategy == "channel"


def test_autogptq_zero_biases_and_side_quantize_config(tiny_folders, tmp_path):
    """AutoGPTQ saves a zero `bias` for every quantized Linear, also of models without biases
    (Llama): such a checkpoint was refused ("bias has no matching model parameter"); the zero
    biases are skipped (a nonzero one is still refused). AutoGPTQ checkpoints from before its
    transformers integration keep their settings in quantize_config.json only: refused naming
    that file, not tensor by tensor; a 16-bit folder beside such a file loads."""
    from tests.models.hf_reference import load_ours
    q, deq = _quantize_folder(tiny_folders("llama"), tmp_path, "gptq", 32, True, False)
    tensors = load_file(str(q / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".qweight")]:
        tensors[name[: -len("qweight")] + "bias"] = torch.zeros(tensors[name].shape[1], dtype=torch.float16)
    biased = write_variant(q, tmp_path / "biased", tensors, None)
    got = torch.cat(LLM(model=str(biased), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(deq), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want)
    tensors["model.layers.1.mlp.up_proj.bias"][3] = 0.5
    nonzero = write_variant(q, tmp_path / "nonzero", tensors, None)
    with pytest.raises(ValueError, match=r"^checkpoint tensor model.layers.1.mlp.up_proj.bias has no matching"):
        load_ours(nonzero)
    cfg = json.loads((q / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    del qc["quant_method"]
    (q / "config.json").write_text(json.dumps(cfg))
    (q / "quantize_config.json").write_text(json.dumps(qc))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(q))}/quantize_config.json holds AutoGPTQ's settings but "
                                         r"config.json has no quantization_config"):
        load_ours(q)
    shutil.copy(q / "quantize_config.json", deq / "quantize_config.json")
    load_ours(deq)
