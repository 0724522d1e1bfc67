"""compressed-tensors `float-quantized` FP8 checkpoints (tensor, channel and block strategies,
dynamic activations): a tiny Llama written by the format's rule (e4m3 weight, fp32
`weight_scale`, w = fp32(q) * s) keeps its weights in e4m3 and gives exactly the logits of the
same e4m3 values written in DeepSeek's fp8 format with the equivalent block scales, and follows
the model holding the dequantized weights; bad checkpoints fail with one line naming the tensor.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from deepserve import LLM
from tests.models.hf_reference import load_ours, save_tiny
from tests.quant.test_int4_loading import PROMPTS, TOKENIZER, write_variant

FP8 = torch.float8_e4m3fn


def _ct_config(strategy: str, activations: bool = True) -> dict:
    w = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
         "block_structure": [128, 128] if strategy == "block" else None}
    a = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w,
                                          "input_activations": a if activations else None}},
            "ignore": ["lm_head"]}


def _quantize(w: torch.Tensor, strategy: str):
    """w [N, K] -> (e4m3 q, the checkpoint's scale, the scale on every element [N, K])."""
    n, k = w.shape
    if strategy == "tensor":
        s = (w.abs().amax() / 448).reshape(1)
        full = s.expand(n, k)
    elif strategy == "channel":
        s = w.abs().amax(1, keepdim=True) / 448                        # [N, 1]
        full = s.expand(n, k)
    else:
        s = torch.empty(math.ceil(n / 128), math.ceil(k / 128))
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                s[i, j] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().amax() / 448
        full = s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (w / full).to(FP8), s.float(), full


def _folders(ref, root, strategy):
    """The compressed-tensors folder, the same e4m3 values in DeepSeek's fp8 format (its scale
    blocks: 128x128 for "block", else 1x128 rows repeating the scale), and the dequantized one."""
    tensors = load_file(str(ref / "model.safetensors"))
    ct, ds, deq = {}, {}, {}
    for name, w in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith(("proj.weight", "proj_with_mqa.weight"))):
            ct[name] = ds[name] = deq[name] = w
            continue
        q, s, full = _quantize(w, strategy)
        ct[name], ct[name + "_scale"] = q, s
        kb = math.ceil(w.shape[1] / 128)
        ds[name] = q
        ds[name + "_scale_inv"] = {"block": s, "tensor": full[::128, ::128].contiguous(),
                                   "channel": full[:, ::128][:, :kb].contiguous()}[strategy]
        deq[name] = q.float() * full
    deepseek = {"quant_method": "fp8", "activation_scheme": "dynamic",
                "weight_block_size": [1, 128] if strategy == "channel" else [128, 128]}
    return {"ct": write_variant(ref, root / "ct", ct, _ct_config(strategy)),
            "deepseek": write_variant(ref, root / "deepseek", ds, deepseek),
            "deq": write_variant(ref, root / "deq", deq, None)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("ctfp8") / "ref"
    save_tiny(transformers.LlamaForCausalLM, cfg, path)
    return path


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_ct_fp8_equals_the_same_values_in_deepseek_format(tiny, tmp_path, strategy):
    folders = _folders(tiny, tmp_path, strategy)
    llm = LLM(model=str(folders["ct"]), dtype="float32", tokenizer=TOKENIZER)
    layer = llm.engine.runner.model.model.layers[1].mlp.down_proj
    assert layer.weight.dtype == FP8 and layer.weight.shape == (256, 384)
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(folders["deepseek"]), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()
    # and it is the model of the dequantized weights, up to the fp8 activations (the random
    # model's near-tied logits make top-1 agreement a poor measure here: KL instead)
    ref = torch.cat(LLM(model=str(folders["deq"]), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    plain = torch.cat(LLM(model=str(tiny), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    kl_plain = torch.nn.functional.kl_div(plain.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                          reduction="batchmean").item()
    assert kl < 1e-3 and kl < kl_plain, (kl, kl_plain)


@pytest.mark.parametrize("strategy", ["tensor", "block", "channel"])
def test_ct_fp8_deepseek_routed_experts(tmp_path, strategy):
    """A tiny DeepSeek-V3 with every Linear and routed expert FP8: "tensor" and "block" keep the
    experts e4m3 on the fused-MoE kernels' 128x128 grid, "channel" (RedHatAI's *-FP8-dynamic MoE
    releases; they were refused) e4m3 with one scale a row; each with exactly the logits of the
    same values in DeepSeek's format, and close to the dequantized model's (KL)."""
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    folders = _folders(tmp_path / "ref", tmp_path, strategy)
    llm = LLM(model=str(folders["ct"]), dtype="float32", tokenizer=TOKENIZER)
    experts = llm.engine.runner.model.model.layers[2].mlp.experts
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == FP8
    if strategy == "channel":       # one scale a row of each expert matrix, as the checkpoint's
        assert tuple(experts.w13_weight_scale_inv.shape) == (8, 64, 1)
        ckpt = load_file(str(folders["ct"] / "model.safetensors"))
        assert torch.equal(experts.w2_weight_scale_inv[3], ckpt["model.layers.2.mlp.experts.3.down_proj.weight_scale"])
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(folders["deepseek"]), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()
    ref = torch.cat(LLM(model=str(folders["deq"]), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert kl < 1e-3, kl


def test_bad_ct_fp8_checkpoints_fail_naming_the_tensor(tiny, tmp_path):
    folders = _folders(tiny, tmp_path, "channel")
    folder = folders["ct"]
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"

    def fails(ts, match, qc=None):
        save_file(ts, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"] = qc or _ct_config("channel")
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=match):
            LLM(model=str(folder), dtype="float32", tokenizer=TOKENIZER)

    fails({**tensors, name + "_scale": torch.ones(3, 1)},
          rf"^tensor {name}_scale: a 'channel' strategy scale of a \[384, 256\] weight is \[384, 1\], got \(3, 1\)$")
    fails({k: v for k, v in tensors.items() if k != name + "_scale"}, rf"^fp8 tensor {name} has no {name}_scale")
    fails({**tensors, name + "_scale": torch.full((384, 1), float("nan"))},
          rf"^tensor {name}_scale: weight_scale has non-finite or non-positive values \(nan at \[0, 0\]\)$")
    fails({**tensors, "model.layers.0.mlp.up_proj.input_scale": torch.ones(1)},
          r"^tensor model.layers.0.mlp.up_proj.input_scale: a static activation scale, but the quantization_config "
          r"names dynamic activations")
    static = _ct_config("channel")
    static["config_groups"]["group_0"]["input_activations"]["dynamic"] = False     # per token: only tensor is static
    fails(tensors, r"activations 8-bit float token \(dynamic=False, symmetric=True\) are not supported", static)
    mixed = _ct_config("channel")
    mixed["config_groups"]["group_1"] = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int"}}
    fails(tensors, r"config_groups \['group_0', 'group_1'\]: deepserve serves one FP8 scheme", mixed)


def test_per_tensor_fp8_without_weight_block_size_loads_as_the_tensor_strategy(tiny, tmp_path):
    """`quant_method` "fp8" without `weight_block_size` (AutoFP8, vLLM's Fp8Config) stores one
    scalar `weight_scale` per tensor: it loaded as DeepSeek's 128x128 blocks and failed with
    "weight_scale has no matching model parameter". It serves the compressed-tensors "tensor"
    checkpoint's logits; a block `weight_scale_inv` under such a config says what to add."""
    folders = _folders(tiny, tmp_path, "tensor")
    tensors = load_file(str(folders["ct"] / "model.safetensors"))
    tensors = {n: t.reshape(()) if n.endswith("weight_scale") else t for n, t in tensors.items()}
    autofp8 = write_variant(folders["ct"], tmp_path / "autofp8", tensors,
                            {"quant_method": "fp8", "activation_scheme": "dynamic"})
    llm = LLM(model=str(autofp8), dtype="float32", tokenizer=TOKENIZER)
    assert llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(folders["ct"]), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()
    cfg = json.loads((folders["deepseek"] / "config.json").read_text())
    del cfg["quantization_config"]["weight_block_size"]
    (folders["deepseek"] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"^tensor model\.layers\.\d\..*weight_scale_inv: a DeepSeek block scale, but "
                                         r"the quantization_config names no weight_block_size"):
        load_ours(folders["deepseek"])


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
def test_ct_fp8_weights_without_input_activations_run_weight_only(tiny, tmp_path, strategy):
    """A compressed-tensors FP8 group with no input_activations (W8A16, vLLM's
    CompressedTensorsW8A16Fp8) keeps its activations unquantized: the weights stay e4m3 and the
    logits are exactly those of the model holding the dequantized weights (the activations were
    quantized to fp8 as for a dynamic scheme)."""
    folders = _folders(tiny, tmp_path, strategy)
    cfg = json.loads((folders["ct"] / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    (folders["ct"] / "config.json").write_text(json.dumps(cfg))
    llm = LLM(model=str(folders["ct"]), dtype="float32", tokenizer=TOKENIZER)
    assert llm.engine.runner.model.model.layers[1].mlp.down_proj.weight.dtype == FP8
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(folders["deq"]), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("strategy", ["block", "channel"])
def test_ct_fp8_weight_only_routed_experts_match_transformers(tmp_path, strategy):
    """A tiny DeepSeek-V3 whose every Linear and routed expert is compressed-tensors FP8 without
    input_activations: the experts stay e4m3 and run W8A16 like the dense layers, so the logits
    are transformers' DeepseekV3 holding the exactly dequantized weights (fp32, 1e-4 of the
    largest; kv_b_proj, which MLA keeps in 16 bits, dequantized through bf16 as the loader and
    the converter do); the experts run W8A8 (activations quantised to fp8) fall outside it."""
    from tests.models.hf_reference import assert_close_rel, hf_logits
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    folders = _folders(tmp_path / "ref", tmp_path, strategy)
    deq = load_file(str(folders["deq"] / "model.safetensors"))
    save_file({n: t.bfloat16().float() if ".kv_b_proj." in n else t for n, t in deq.items()},
              str(folders["deq"] / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folders["ct"] / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    (folders["ct"] / "config.json").write_text(json.dumps(cfg))
    llm = LLM(model=str(folders["ct"]), dtype="float32", tokenizer=TOKENIZER)
    experts = llm.engine.runner.model.model.layers[2].mlp.experts
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == FP8 and experts.quant.weight_only
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(folders["deq"]), torch_dtype=torch.float32).eval()
    want = torch.cat(hf_logits(hf, PROMPTS))
    got = torch.cat(llm.prompt_logits(PROMPTS))
    assert_close_rel(got, want)
    for layer in llm.engine.runner.model.model.layers[2:]:
        layer.mlp.experts.quant.weight_only = False
    w8a8 = torch.cat(llm.prompt_logits(PROMPTS))
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_rel(w8a8, want)
