"""4-bit routed experts and plan bytes: tiny DeepSeek-V3 checkpoints in AWQ / GPTQ /
compressed-tensors with every Linear and expert 4-bit give exactly the logits of the model
holding the dequantized weights (experts packed in the FusedMoE; act-order experts dequantized
at load); 4-bit experts split over TP / EP ranks sum to the whole; `deepserve plan` counts the
bytes the engine allocates for 4-bit models (tiny Llama loaded, R1 built on the meta device)
and fits R1 W4A16 on 8 x 80 GiB. Checkpoints are packed by the formats' own rules
(tests/quant/int4_formats.py).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from deepserve import LLM
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.layers.moe_int4 import Int4Experts
from tests.models.hf_reference import save_tiny
from tests.quant.int4_formats import quantization_config
from tests.quant.test_int4_loading import PROMPTS, TOKENIZER, _packed, _quantize_folder, _spec


# ---------------------------------------------------------------------------- plan bytes
@pytest.mark.parametrize("fmt,plan_name,sym,act_order", [
    ("compressed-tensors", "w4a16", True, False), ("awq", "awq", False, False), ("gptq", "gptq", True, False),
    ("gptq", "gptq", True, True), ("compressed-tensors", "w4a16", True, True)])
def test_plan_counts_the_bytes_a_4bit_model_allocates(tmp_path, fmt, plan_name, sym, act_order):
    """`deepserve plan --quantization w4a16|awq|gptq` (groups of 128) counts exactly the
    parameter bytes of the loaded bf16 model (packed weights, fp16 scales, uint8 zeros; with
    act order the g_idx of every 4-bit layer, fused q/k/v and gate/up sharing one)."""
    from deepserve.config import HFConfig
    from deepserve.distributed.plan_bytes import Layout, weight_bytes_per_gpu
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path / "ref")
    q, _ = _quantize_folder(tmp_path / "ref", tmp_path, fmt, 128, sym, act_order)
    model = LLM(model=str(q), dtype="bfloat16", tokenizer=TOKENIZER).engine.runner.model
    allocated = sum(p.numel() * p.element_size() for p in model.parameters())
    g_idx = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("g_idx"))
    assert bool(g_idx) == act_order
    hf = HFConfig(json.loads((q / "config.json").read_text()))
    assert weight_bytes_per_gpu(hf, Layout(1, 1, 1), "bfloat16", plan_name) == allocated


# ---------------------------------------------------------------------------- MoE experts
DEEPSEEK_CASES = [("awq", 16, False, False), ("gptq", 16, True, False), ("compressed-tensors", -1, True, False),
                  ("gptq", 16, True, True)]


@pytest.mark.parametrize("fmt,group,sym,act_order", DEEPSEEK_CASES,
                         ids=[f"{c[0]}-g{c[1]}" + ("-actorder" if c[3] else "") for c in DEEPSEEK_CASES])
def test_deepseek_with_4bit_experts_equals_the_dequantized_model(tmp_path, fmt, group, sym, act_order):
    """Tiny DeepSeek-V3 with every Linear and routed expert 4-bit: experts stay packed in the
    FusedMoE (act-order ones with their g_idx), kv_b_proj is dequantized at load, and
    the logits equal those of the same model holding the dequantized fp32 weights."""
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    q, deq = _quantize_folder(tmp_path / "ref", tmp_path, fmt, group, sym, act_order)
    llm = LLM(model=str(q), dtype="float32", tokenizer=TOKENIZER)
    experts = llm.engine.runner.model.model.layers[2].mlp.experts
    assert isinstance(experts.quant, Int4Experts)
    packed = experts.w13_qweight if fmt != "compressed-tensors" else experts.w13_weight_packed
    assert packed.dtype == torch.int32 and packed.shape == (8, 64, 8)    # E, 2I, D/8
    if act_order:
        assert experts.w13_g_idx.shape == (8, 64) and experts.w2_g_idx.shape == (8, 32)   # E, D / E, I
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(deq), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    assert torch.equal(got, want), (got - want).abs().max()


def test_deepseek_w4a8_experts_stay_packed(tmp_path):
    """compressed-tensors W4A8 tiny DeepSeek-V3: routed experts packed with int8 per-token
    activations (ops.fused_moe_int4 act_int8), the model tracking the same model holding the
    dequantized weights with 16-bit activations (top-1 >= 95%, not equal: activations rounded)."""
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
    q, deq = _quantize_folder(tmp_path / "ref", tmp_path, "compressed-tensors", 16, True, False, activations=True)
    llm = LLM(model=str(q), dtype="float32", tokenizer=TOKENIZER)
    experts = llm.engine.runner.model.model.layers[2].mlp.experts
    assert isinstance(experts.quant, Int4Experts) and experts.w13_weight_packed.dtype == torch.int32
    assert experts.quant.spec.activations == "int8-token"
    got = torch.cat(llm.prompt_logits(PROMPTS))
    want = torch.cat(LLM(model=str(deq), dtype="float32", tokenizer=TOKENIZER).prompt_logits(PROMPTS))
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"DeepSeek W4A8 vs dequantized W4A16 weights: top-1 agreement {top1:.3f}")
    assert top1 >= 0.95 and not torch.equal(got, want)


@pytest.mark.parametrize("fmt,group,sym,act_order", [("awq", 16, False, False), ("compressed-tensors", -1, True, False),
                                                     ("gptq", 32, True, False), ("gptq", 16, False, True)])
def test_int4_experts_split_over_tp_and_ep_ranks_sum_to_the_whole(fmt, group, sym, act_order):
    """Two TP ranks (each a slice of I, down's groups sliced with it; with act order its g_idx
    sliced and every group kept) or two EP ranks (whole experts) of 4-bit experts, their partial
    outputs summed, give the one-process experts."""
    from deepserve.layers.moe import FusedMoE
    spec = _spec(fmt, group, sym, act_order)
    e, d, i = 4, 64, 64
    ckpt = {}
    for ex in range(e):
        for part, proj, (n, k) in (("w1", "gate_proj", (i, d)), ("w3", "up_proj", (i, d)), ("w2", "down_proj", (d, i))):
            ckpt[(ex, part)] = _packed(fmt, group, sym, act_order, n, k, seed=100 * ex + len(part) + n)[0]

    def build(pctx):
        moe = FusedMoE(e, d, i, pctx=pctx, reduce_results=False)
        Int4Experts(spec).create(moe)
        for (ex, part), tensors in ckpt.items():
            for suffix, t in tensors.items():
                which = "w2" if part == "w2" else "w13"
                p = getattr(moe, f"{which}_{suffix}", None)
                if p is not None:
                    p.weight_loader(p, t, (ex, part))
        return moe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, d, generator=g)
    wts, ids = torch.rand(3, 2, generator=g), torch.tensor([[0, 3], [1, 2], [3, 1]])
    whole = build(ParallelContext())(x, wts, ids)
    tp = [build(ParallelContext(tp_rank=r, tp_size=2))(x, wts, ids) for r in range(2)]
    torch.testing.assert_close(tp[0] + tp[1], whole, rtol=1e-5, atol=1e-5)
    ep = [build(ParallelContext(ep_rank=r, ep_size=2))(x, wts, ids) for r in range(2)]
    torch.testing.assert_close(ep[0] + ep[1], whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,layout,mtp", [("gptq", "tp8", True), ("gptq", "dp8-ep8", False),
                                            ("gptq", "tp2-pp4", False), ("compressed-tensors", "tp8", False)])
def test_r1_act_order_plan_counts_the_g_idx_the_engine_allocates(fmt, layout, mtp):
    """R1 as a GPTQ desc_act (or compressed-tensors actorder "group") checkpoint, built as the
    engine builds it on the meta device: `deepserve plan` counts every g_idx (per 4-bit Linear,
    per expert: one for gate and up, one for down) and the whole-row scales that row-parallel
    slices keep, exactly; the g_idx are counted (the plan grows over the same model without act order)."""
    from deepserve.config import HFConfig
    from deepserve.distributed.plan_bytes import Layout, weight_bytes_per_gpu
    from tests.distributed.test_plan import R1, engine_param_bytes
    plan_name = "gptq" if fmt == "gptq" else "w4a16"
    cfg = HFConfig({**R1, "quantization_config": quantization_config(fmt, 128, True, True)})
    lay = {"tp8": Layout(8, 1, 1), "dp8-ep8": Layout(1, 1, 8, True), "tp2-pp4": Layout(2, 4, 1)}[layout]
    planned = weight_bytes_per_gpu(cfg, lay, quantization=plan_name, include_mtp=mtp)
    assert planned == engine_param_bytes(cfg, lay, plan_name, mtp)
    plain = HFConfig({**R1, "quantization_config": quantization_config(fmt, 128, True, False)})
    assert planned > weight_bytes_per_gpu(plain, lay, quantization=plan_name, include_mtp=mtp)


@pytest.mark.parametrize("layout", ["tp8", "dp8-ep8"])
def test_r1_w4a16_plan_counts_what_the_engine_allocates_and_fits_8x80gib(layout):
    """R1 as a compressed-tensors W4A16 (group 128) checkpoint, built as the engine builds it
    on the meta device (4-bit linears and experts, bf16 scales): `deepserve plan --quantization
    w4a16` counts its bytes exactly, and finds a layout on one node of 8 x 80 GiB."""
    from deepserve.config import HFConfig
    from deepserve.distributed.plan import choose_plan
    from deepserve.distributed.plan_bytes import Layout, weight_bytes_per_gpu
    from tests.distributed.test_plan import R1, engine_param_bytes
    cfg = HFConfig({**R1, "quantization_config": quantization_config("compressed-tensors", 128, True, False)})
    lay = Layout(8, 1, 1) if layout == "tp8" else Layout(1, 1, 8, True)
    assert weight_bytes_per_gpu(cfg, lay, quantization="w4a16") == engine_param_bytes(cfg, lay, "w4a16")
    plan = choose_plan(HFConfig(R1), 8, 80 * 2 ** 30, quantization="w4a16")
    assert plan.chosen is not None and plan.chosen.layout == Layout(1, 1, 8, True)


@pytest.mark.parametrize("arch,quantization", [("llama", "awq"), ("deepseek", "compressed-tensors")])
def test_dummy_4bit_weights_for_speed_tests(tmp_path, arch, quantization):
    """`--load-format dummy --quantization awq|gptq|compressed-tensors`: 4-bit layers and experts
    with random weights of std ~0.02 (group 128 by default), the same for the same seed."""
    from deepserve.ops.int4 import dequant_int4
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       max_position_embeddings=256, tie_word_embeddings=False)
        save_tiny(transformers.LlamaForCausalLM, cfg, tmp_path / "ref")
    else:
        from tests.models.test_deepseek import r1_style, save_deepseek
        save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "ref")
        cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
        cfg.update(hidden_size=128, moe_intermediate_size=128, intermediate_size=128, q_lora_rank=128, v_head_dim=32)
        (tmp_path / "ref" / "config.json").write_text(json.dumps(cfg))
    kw = dict(dtype="float32", tokenizer=TOKENIZER, load_format="dummy", quantization=quantization)
    llm = LLM(model=str(tmp_path / "ref"), **kw)
    model = llm.engine.runner.model
    down = model.model.layers[0].mlp.down_proj
    q, s, z = (getattr(down, down.quant_method.spec.names.get(r, "-"), None) for r in ("qweight", "scales", "qzeros"))
    w = dequant_int4(q, s, z, None, down.quant_method.group_size)
    assert q.dtype == torch.int32 and abs(w.std().item() - 0.02) < 0.002
    if arch == "deepseek":
        assert isinstance(model.model.layers[2].mlp.experts.quant, Int4Experts)
    a = torch.cat(llm.prompt_logits(PROMPTS))
    assert torch.isfinite(a).all()
    b = torch.cat(LLM(model=str(tmp_path / "ref"), **kw).prompt_logits(PROMPTS))
    assert torch.equal(a, b)
