"""`deepserve plan`: weight bytes per GPU against hand arithmetic and against our own models
built on the `meta` device, KV bytes per token, the choice and its reasons, the CLI, and
docs/PLAN.md staying equal to what the command prints."""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch

from deepserve.cli.main import main as cli_main
from deepserve.cli.plan import parse_size
from deepserve.config import HFConfig, load_hf_config
from deepserve.distributed.parallel_state import ParallelContext
from deepserve.distributed.plan import GiB, Candidate, Plan, _choose, choose_plan, evaluate_plans
from deepserve.distributed.plan_bytes import (Layout, kv_bytes_per_token_layer, param_count, stage_layers,
                                              weight_breakdown, weight_bytes_per_gpu)
from deepserve.config import ModelConfig
from deepserve.models.deepseek_v3 import DeepseekV3ForCausalLM
from deepserve.models.loader import build_model, stage_modules
from deepserve.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from deepserve.quant.ignore import checkpoint_ignore

REPO = Path(__file__).resolve().parents[2]

# DeepSeek-R1's config.json (the numbers the arithmetic below uses)
R1 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
      "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
      "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_routed_experts": 256, "n_shared_experts": 1,
      "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
      "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
      "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
      "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280,
      "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
      "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
      "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
# DeepSeek-R1-Distill-Llama-8B (Llama-3.1-8B)
LLAMA8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

D, V, L, K_DENSE = 7168, 129280, 61, 3
I, I_MOE, E, H = 18432, 2048, 256, 128
Q_LORA, KV_LORA, NOPE, ROPE, V_DIM = 1536, 512, 128, 64, 128


def r1():
    return HFConfig(R1)


def meta_param_bytes(cls, cfg, tp: int, ep: int = 1, **kw) -> int:
    """Parameter bytes of rank 0 of our model built with this parallel context (no memory used)."""
    with torch.device("meta"):
        model = cls(cfg, dtype=torch.bfloat16, pctx=ParallelContext(tp_rank=0, tp_size=tp, ep_size=ep), **kw)
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------- hand arithmetic
def test_r1_parameter_count_is_671b_plus_14b_mtp():
    attn = D * Q_LORA + Q_LORA + Q_LORA * H * (NOPE + ROPE) + D * (KV_LORA + ROPE) + KV_LORA \
        + KV_LORA * H * (NOPE + V_DIM) + H * V_DIM * D                    # 187,107,328
    dense_layer = attn + 2 * D + 3 * D * I
    moe_layer = attn + 2 * D + E * 3 * D * I_MOE + 3 * D * I_MOE + E * D + E   # experts, shared, gate + bias
    main = 2 * V * D + D + K_DENSE * dense_layer + (L - K_DENSE) * moe_layer
    mtp = moe_layer + 2 * V * D + 2 * D * D + 3 * D                     # block, embed+head, eh_proj, 3 norms
    assert attn == 187_107_328
    assert main == 671_026_419_200 == param_count(r1())
    assert mtp == param_count(r1(), include_mtp=True) - main
    assert round(main / 1e9) == 671 and round((main + mtp) / 1e9) == 684   # model card: "685B" with MTP


def test_r1_bf16_bytes_per_gpu_tp8_by_hand():
    tp = 8
    vocab = 2 * math.ceil(V / tp) * D + D                                # embed + lm_head slices, final norm
    attn = D * Q_LORA + Q_LORA + Q_LORA * (H // tp) * 192 + D * 576 + KV_LORA \
        + KV_LORA * (H // tp) * 256 + (H // tp) * V_DIM * D + 2 * D      # q_a, kv_a, norms replicated
    dense = 3 * D * (I // tp)
    moe = E * 3 * D * (I_MOE // tp) + 3 * D * (I_MOE // tp)               # experts and shared, TP-split
    router = (E * D + E) * 4                                             # fp32, replicated
    expected = 2 * (vocab + L * attn + K_DENSE * dense + (L - K_DENSE) * moe) + (L - K_DENSE) * router
    assert expected == 169_773_604_864
    assert weight_bytes_per_gpu(r1(), Layout(8, 1, 1)) == expected


def fp8(rows: int, cols: int) -> int:
    """A quantized Linear: e4m3 values + one fp32 scale per row per 128 columns (row-expanded)."""
    return rows * cols + 4 * rows * math.ceil(cols / 128)


def fp8_expert(rows: int, cols: int) -> int:
    """A routed expert's matrix: e4m3 values + one fp32 scale per 128x128 block."""
    return rows * cols + 4 * math.ceil(rows / 128) * math.ceil(cols / 128)


def test_r1_fp8_bytes_per_gpu_by_hand():
    # TP=8, experts TP-split; kv_b_proj stays bf16 (the absorbed MLA reads it)
    assert fp8(576, D) == 576 * D + 4 * 576 * 56
    kv_b = 2 * (H // 8 * 256) * KV_LORA
    attn = fp8(Q_LORA, D) + fp8(H // 8 * 192, Q_LORA) + fp8(576, D) + kv_b + fp8(D, H // 8 * 128)
    high = 2 * (2 * math.ceil(V / 8) * D + D + L * (Q_LORA + KV_LORA + 2 * D))   # embed, head, norms (bf16)
    dense = 3 * fp8(I // 8, D)
    moe = E * 3 * fp8_expert(I_MOE // 8, D) + 3 * fp8(I_MOE // 8, D) + (E * D + E) * 4  # routed, shared, router
    expected = high + L * attn + K_DENSE * dense + (L - K_DENSE) * moe
    assert weight_bytes_per_gpu(r1(), Layout(8, 1, 1), quantization="fp8") == expected
    # TP=1 x DP=8 with EP: 32 whole experts per GPU, attention and shared expert whole
    attn1 = fp8(Q_LORA, D) + fp8(H * 192, Q_LORA) + fp8(576, D) + 2 * H * 256 * KV_LORA + fp8(D, H * 128)
    high1 = 2 * (2 * V * D + D + L * (Q_LORA + KV_LORA + 2 * D))
    moe1 = E // 8 * 3 * fp8_expert(I_MOE, D) + 3 * fp8(I_MOE, D) + (E * D + E) * 4
    expected1 = high1 + L * attn1 + K_DENSE * 3 * fp8(I, D) + (L - K_DENSE) * moe1
    assert weight_bytes_per_gpu(r1(), Layout(1, 1, 8, ep=True), quantization="fp8") == expected1
    assert round(expected1 / GiB, 1) == 95.5


def test_llama8b_bytes_per_gpu_by_hand():
    cfg = HFConfig(LLAMA8B)
    d, inter, layers, vocab, hd = 4096, 14336, 32, 128256, 128
    per_layer = d * 32 * hd + 2 * d * 8 * hd + 32 * hd * d + 3 * d * inter + 2 * d
    assert param_count(cfg) == 2 * vocab * d + d + layers * per_layer == 8_030_261_248
    for tp in (1, 2, 8):
        layer = (d * 32 * hd + 2 * d * 8 * hd + 32 * hd * d + 3 * d * inter) // tp + 2 * d
        expected = 2 * (2 * (vocab // tp) * d + d + layers * layer)
        assert weight_bytes_per_gpu(cfg, Layout(tp, 1, 1)) == expected, tp
    assert weight_bytes_per_gpu(cfg, Layout(1, 1, 1)) == 2 * 8_030_261_248
    # TP=8: embed + head 2 x 16032 x 4096 = 131,334,144; a layer (16,777,216 q + 2 x 4,194,304 k/v
    # + 16,777,216 o + 176,160,768 MLP) / 8 + 8192 norms = 27,271,168, x 32 = 872,677,376;
    # + 4096 final norm = 1,004,015,616 parameters, 2 bytes each
    assert weight_bytes_per_gpu(cfg, Layout(8, 1, 1)) == 2 * 1_004_015_616


def test_pp_stages_split_layers_and_vocab():
    # the engine's split (pp_layer_range): the remainder on the first stages
    assert [list(r) for r in stage_layers(10, 4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [len(r) for r in stage_layers(61, 4)] == [16, 15, 15, 15]
    cfg = HFConfig(LLAMA8B)
    first, last = weight_breakdown(cfg, Layout(1, 2, 1))
    assert first["embedding"] == last["lm_head"] == 128256 * 4096 * 2
    assert first["lm_head"] == last["embedding"] == 0
    total = sum(first.values()) + sum(last.values())
    assert total == weight_bytes_per_gpu(cfg, Layout(1, 1, 1))


def test_kv_bytes_per_token():
    assert kv_bytes_per_token_layer(r1(), 1, 2) * L == 576 * 2 * 61 == 70_272
    assert kv_bytes_per_token_layer(r1(), 8, 2) == 576 * 2            # MLA latent replicated on TP ranks
    llama = HFConfig(LLAMA8B)
    assert kv_bytes_per_token_layer(llama, 1, 2) == 2 * 8 * 128 * 2
    assert kv_bytes_per_token_layer(llama, 8, 2) == 2 * 1 * 128 * 2
    assert kv_bytes_per_token_layer(llama, 16, 2) == 2 * 1 * 128 * 2    # at least one KV head


# --------------------------------------------------------------------------- against our models
@pytest.mark.parametrize("tp", [1, 2, 8, 16])
def test_llama_matches_meta_model(tp):
    # a short rope table: LlamaAttention builds its cos/sin cache on the CPU, layer by layer
    cfg = HFConfig({**LLAMA8B, "max_position_embeddings": 4096})
    assert weight_bytes_per_gpu(cfg, Layout(tp, 1, 1)) == meta_param_bytes(LlamaForCausalLM, cfg, tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qwen2_tied_with_bias_matches_meta_model(tp):
    cfg = HFConfig({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "num_hidden_layers": 4,
                    "vocab_size": 151937, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True})
    assert weight_bytes_per_gpu(cfg, Layout(tp, 1, 1)) == meta_param_bytes(Qwen2ForCausalLM, cfg, tp)


@pytest.mark.parametrize("tp,ep,mtp", [(8, 1, False), (8, 32, True), (1, 8, False)])
def test_r1_matches_meta_model(tp, ep, mtp):
    expected = meta_param_bytes(DeepseekV3ForCausalLM, r1(), tp, ep, load_mtp=mtp)
    layout = Layout(tp, 1, ep // tp, ep > 1)
    assert weight_bytes_per_gpu(r1(), layout, include_mtp=mtp) == expected


@pytest.mark.parametrize("tp,ep", [(1, 1), (2, 1), (2, 4)])
def test_v2_lite_shape_matches_meta_model(tp, ep):
    # q_lora_rank null (one q_proj), softmax/greedy routing (no correction bias), 1 dense layer
    cfg = HFConfig({**R1, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
                    "q_lora_rank": None, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "intermediate_size": 512, "moe_intermediate_size": 64, "n_routed_experts": 8,
                    "n_shared_experts": 2, "num_hidden_layers": 3, "first_k_dense_replace": 1,
                    "topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1,
                    "vocab_size": 1000, "num_nextn_predict_layers": 0})
    layout = Layout(tp, 1, ep // tp, ep > 1)
    assert weight_bytes_per_gpu(cfg, layout) == meta_param_bytes(DeepseekV3ForCausalLM, cfg, tp, ep)


def engine_param_bytes(cfg, layout: Layout, quantization, include_mtp: bool = False) -> int:
    """Parameter bytes on the heaviest GPU of `layout`, from the model as the engine builds it
    (models/loader.build_model: quantized linears and experts, scales, padding, this rank's
    slices, on the meta device); with PP, each stage counts only the modules it holds."""
    mc = ModelConfig(model="r1", hf_config=cfg, dtype="bfloat16", max_model_len=4096, tokenizer="",
                     load_format="dummy", quantization=quantization)
    best = 0
    for stage in range(layout.pp):
        pctx = ParallelContext(tp_size=layout.tp, pp_rank=stage, pp_size=layout.pp, dp_size=layout.dp,
                               ep_size=layout.ep_size)
        model = build_model(mc, torch.device("meta"), pctx, quantization, load_mtp=include_mtp)
        parts = stage_modules(model, pctx) if layout.pp > 1 else [model]
        if include_mtp and stage == layout.pp - 1 and layout.pp > 1:
            parts.append(model.mtp)
        params = {id(p): p for m in parts for p in m.parameters()}
        best = max(best, sum(p.numel() * p.element_size() for p in params.values()))
    return best


@pytest.mark.parametrize("quantization", [None, "fp8", "w8a8-int8"])
@pytest.mark.parametrize("layout,mtp", [(Layout(8, 1, 1), True), (Layout(1, 1, 8, True), True),
                                        (Layout(2, 4, 1), False), (Layout(8, 1, 1, True), False)])
def test_plan_counts_what_the_engine_allocates_for_r1(layout, mtp, quantization):
    """`deepserve plan`'s per-GPU weight bytes equal the parameters of R1 built as the engine
    builds it, in bf16, fp8 and w8a8-int8 (int8 experts), under TP8, DP8 x EP8, TP2 x PP4 and
    TP8 x EP8 (to 1%; exact today)."""
    planned = weight_bytes_per_gpu(r1(), layout, quantization=quantization, include_mtp=mtp)
    built = engine_param_bytes(r1(), layout, quantization, mtp)
    assert abs(planned - built) <= 0.01 * built, (planned, built)
    assert planned == built


# modules a quantized R1 checkpoint leaves in 16-bit, in each format's own field and syntax: a
# parent module (the dense MLP of layer 0), one projection, all routed experts of a layer, an MTP
# module and a regex (compressed-tensors)
_FP8_IGNORED = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
                "ignored_layers": ["model.layers.0.mlp", "model.layers.5.self_attn.q_a_proj",
                                   "model.layers.4.mlp.experts", "model.layers.61.mlp.shared_experts"]}


def _ct_ignored(bits: int) -> dict:
    from tests.quant.int4_formats import quantization_config
    qc = quantization_config("compressed-tensors", 128, True, False) if bits == 4 else {
        "quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True}}}}
    return {**qc, "ignore": ["lm_head", "re:model\\.layers\\.[0-2]\\.mlp\\..*", "model.layers.5.self_attn.o_proj",
                             "re:.*layers\\.4\\.mlp\\.experts\\..*", "model.layers.61.self_attn.kv_a_proj_with_mqa"]}


@pytest.mark.parametrize("quantization", ["fp8", "w8a8-int8", "w4a16"])
@pytest.mark.parametrize("layout,mtp", [(Layout(8, 1, 1), True), (Layout(2, 4, 1), False), (Layout(1, 1, 8, True), True)])
def test_plan_counts_modules_the_checkpoint_leaves_unquantized_at_16_bits(layout, mtp, quantization):
    """An R1 checkpoint whose quantization_config leaves modules unquantized (DeepSeek fp8
    `ignored_layers`, compressed-tensors `ignore` with `re:` entries): the plan counts them in
    bf16, as the engine builds them (they were counted at 1 or 0.5 bytes a value), to 1% and exact.
    The caller names them (quant/ignore.py's checkpoint_ignore); by default none is."""
    qc = _FP8_IGNORED if quantization == "fp8" else _ct_ignored(4 if quantization == "w4a16" else 8)
    cfg = HFConfig({**R1, "quantization_config": qc})
    planned = weight_bytes_per_gpu(cfg, layout, quantization=quantization, include_mtp=mtp,
                                   ignored=checkpoint_ignore(cfg))
    built = engine_param_bytes(cfg, layout, quantization, mtp)
    assert abs(planned - built) <= 0.01 * built, (planned, built)
    assert planned == built
    def total(c, ignored=None):
        return sum(sum(s.values()) for s in weight_breakdown(c, layout, quantization=quantization, include_mtp=mtp,
                                                             ignored=ignored))
    assert total(cfg, checkpoint_ignore(cfg)) > total(r1()) == total(cfg)


def test_fp8_kv_cache_halves_kv_bytes_per_token_in_the_plan():
    bf16 = evaluate_plans(r1(), 8, 141 * GiB, quantization="fp8", max_model_len=32768)
    fp8 = evaluate_plans(r1(), 8, 141 * GiB, quantization="fp8", max_model_len=32768, kv_cache_dtype="fp8")
    assert fp8.chosen.layout == bf16.chosen.layout
    assert 2 * fp8.chosen.kv_bytes_per_token == bf16.chosen.kv_bytes_per_token == 61 * 576 * 2
    assert fp8.chosen.tokens == 2 * bf16.chosen.tokens or abs(fp8.chosen.tokens - 2 * bf16.chosen.tokens) <= 8
    out = run_cli("plan deepseek-r1 --gpus 8 --gpu-memory 141GiB --quantization fp8 --kv-cache-dtype fp8".split())[1]
    assert "KV cache fp8 (e4m3)" in out and "--enable-expert-parallel --kv-cache-dtype fp8" in out


def test_fp8_experts_pad_to_the_block_grid_in_plan_and_model():
    """V2-Lite's experts (I = 1408 = 11 blocks) whole on a rank, and an I that is not a
    multiple of 128 padded up, as FusedMoE.use_fp8 stores it."""
    cfg = HFConfig({**R1, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512,
                    "moe_intermediate_size": 96, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                    "num_hidden_layers": 3, "first_k_dense_replace": 1, "vocab_size": 1000,
                    "q_lora_rank": 64, "kv_lora_rank": 64, "num_nextn_predict_layers": 0})
    for layout in (Layout(1, 1, 1), Layout(1, 1, 2, True)):
        assert weight_bytes_per_gpu(cfg, layout, quantization="fp8") == engine_param_bytes(cfg, layout, "fp8")


# --------------------------------------------------------------------------- the choice
def test_r1_bf16_on_8_h200_does_not_fit_and_names_what_would():
    plan = evaluate_plans(r1(), 8, 141 * GiB)
    assert plan.chosen is None
    assert all(c.reason for c in plan.candidates)
    assert any(s.startswith("--quantization fp8 on the same 8 GPUs (TP=1 PP=1 DP=8 EP=8") for s in plan.suggestions)
    assert any(s.startswith("16 x 141 GiB GPUs in 2 nodes") for s in plan.suggestions)
    with pytest.raises(ValueError, match=r"weights alone are 1250 GiB.*--quantization fp8"):
        choose_plan(r1(), 8, 141 * GiB)


def test_r1_fp8_on_8_h200_chooses_dp_attention_with_ep():
    plan = choose_plan(r1(), 8, 141 * GiB, quantization="fp8")
    best = plan.chosen
    assert best.layout == Layout(1, 1, 8, ep=True)
    usable = int(141 * GiB * 0.9) - 4 * GiB
    weights = weight_bytes_per_gpu(r1(), best.layout, quantization="fp8")
    assert best.tokens == (usable - weights) // 70_272 * 8
    assert plan.parallel_args() == dict(tensor_parallel_size=1, pipeline_parallel_size=1,
                                        data_parallel_size=8, enable_expert_parallel=True)
    tp8 = next(c for c in plan.candidates if c.layout == Layout(8, 1, 1))
    assert tp8.tokens == (usable - weight_bytes_per_gpu(r1(), tp8.layout, quantization="fp8")) // 70_272
    assert tp8.reason == f"fewer KV tokens than the chosen ({tp8.tokens:,} < {best.tokens:,})"
    pp8 = next(c for c in plan.candidates if c.layout == Layout(1, 8, 1))
    assert pp8.reason.startswith("PP 8 not needed")


def test_r1_on_h100_nodes_keeps_tp_in_a_node():
    plan = choose_plan(r1(), 32, 80 * GiB, nodes=4)
    assert plan.chosen.layout == Layout(1, 4, 8, ep=True)     # one PP stage per node, EP inside it
    crossing = {c.layout.tp: c.reason for c in plan.candidates if c.any_pp_dp}
    assert crossing == {16: "TP 16 crosses nodes (8 GPUs per node)", 32: "TP 32 crosses nodes (8 GPUs per node)"}
    assert evaluate_plans(r1(), 16, 80 * GiB, nodes=2).chosen is None     # 1250 GiB > 16 x 68 GiB


def test_heads_divisibility_and_max_model_len_rejections():
    qwen = load_hf_config("r1-distill-qwen-1.5b")     # 12 heads, 2 KV heads
    plan = evaluate_plans(qwen, 8, 80 * GiB, quantization="fp8")
    reasons = {c.layout.tp: c.reason for c in plan.candidates if c.any_pp_dp}
    assert reasons[8] == "num_attention_heads 12 not divisible by TP 8"
    tp4 = [c.reason for c in plan.candidates if c.layout.tp == 4]
    assert tp4 and all(r == "intermediate_size / TP = 2240 is not a multiple of the fp8 block 128" for r in tp4)
    small = evaluate_plans(HFConfig(LLAMA8B), 1, 24 * GiB, max_model_len=131072)
    assert small.chosen is None
    (only,) = small.candidates
    usable = int(24 * GiB * 0.9) - 2 * GiB
    held = (usable - 16_060_522_496) // 131_072
    assert only.reason == f"KV cache holds {held:,} tokens per replica, fewer than max-model-len 131,072"


def test_ties_prefer_fewer_pp_then_smaller_tp():
    def cand(tp, pp, tokens):
        return Candidate(Layout(tp, pp, 1), fits=True, tokens_per_replica=tokens)
    plan = Plan(None, [cand(2, 1, 100), cand(1, 2, 100), cand(1, 1, 100), cand(4, 1, 90)], 4, 2, GiB,
                "bfloat16", None, 10, 0.9, 0, False, 1, 0, 0)
    _choose(plan)
    assert plan.chosen.layout == Layout(1, 1, 1)
    reasons = [c.reason for c in plan.candidates]
    assert reasons == ["as many KV tokens; the chosen has a smaller TP",
                       "as many KV tokens; the chosen has fewer PP stages", None,
                       "fewer KV tokens than the chosen (90 < 100)"]


# --------------------------------------------------------------------------- CLI and docs
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_parse_size():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("141 GiB") == 141 * GiB
    assert parse_size("80GB") == 80 * 10 ** 9
    assert parse_size("1.5G") == int(1.5 * GiB)
    with pytest.raises(ValueError, match="'80 gigs'"):
        parse_size("80 gigs")


def test_cli_reports_and_errors():
    rc, out, _ = run_cli(["plan", "deepseek-r1", "--gpus", "8", "--gpu-memory", "141GiB", "--quantization", "fp8"])
    assert rc == 0
    assert "chosen     TP=1 PP=1 DP=8 EP=8" in out
    assert "--tensor-parallel-size 1 --pipeline-parallel-size 1 --data-parallel-size 8 --enable-expert-parallel" in out
    rc, out, _ = run_cli(["plan", "deepseek-r1", "--gpus", "8", "--gpu-memory", "141GiB", "--quantization",
                          "w8a8-int8"])
    assert rc == 0 and "weights    int8 (per-row scales) Linear weights and routed experts, the rest bfloat16" in out
    assert "chosen     TP=1 PP=1 DP=8 EP=8" in out
    rc, out, _ = run_cli(["plan", "deepseek-r1", "--gpus", "8", "--gpu-memory", "141GiB"])
    assert rc == 1 and "NO LAYOUT FITS" in out and "--quantization fp8 on the same 8 GPUs" in out
    rc, _, err = run_cli(["plan", "deepseek-r1", "--gpus", "12", "--nodes", "5", "--gpu-memory", "80GiB"])
    assert rc == 2 and "--gpus 12 must be a positive multiple of --nodes 5" in err
    rc, _, err = run_cli(["plan", "no-such-model", "--gpus", "1", "--gpu-memory", "80GiB"])
    assert rc == 2 and "no-such-model" in err


def test_docs_plan_md_is_what_the_command_prints():
    text = (REPO / "docs" / "PLAN.md").read_text()
    blocks = re.findall(r"```\n\$ deepserve (plan [^\n]*)\n(.*?)\n```", text, flags=re.S)
    assert len(blocks) == 7
    for command, shown in blocks:
        _, out, _ = run_cli(command.split())
        assert out.rstrip("\n") == shown, command


def test_a_quantized_folder_is_planned_in_its_stored_format(tmp_path):
    """Without --quantization a model folder is planned as `serve` loads it: a DeepSeek FP8
    folder in fp8 (it printed bf16 bytes), exactly as with --quantization fp8; a preset stays
    in the model dtype (random weights); a 4-bit folder in its own group size, the Linear layers it
    keeps in high precision counted so; an msModelSlim one is refused naming the flag to pass."""
    import json

    import transformers

    from deepserve.quant import quantize_checkpoint
    from tests.models.test_deepseek import r1_style, save_deepseek
    save_deepseek(transformers.DeepseekV3ForCausalLM, r1_style(), tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8-block", progress=False)
    args = ["plan", str(tmp_path / "fp8"), "--gpus", "1", "--gpu-memory", "80GiB"]
    rc, out, _ = run_cli(args)
    assert rc == 0 and "weights    fp8 (128x128 blocks) Linear weights" in out
    assert out == run_cli(args + ["--quantization", "fp8"])[1] != run_cli(args + ["--quantization", "none"])[1]
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True,
                                  "version": "gemm"}     # 16: divides every input (q_lora_rank 48)
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    rc, out, _ = run_cli(args)
    assert rc == 0 and "weights    awq 4-bit (groups of 16) Linear weights" in out   # the folder's group size
    cfg["quantization_config"]["modules_to_not_convert"] = ["o_proj"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    rc, kept, _ = run_cli(args)
    assert rc == 0 and "Linear weights, the rest float32 (with the modules its quantization_config leaves " \
                       "unquantized)" in kept and kept != out    # o_proj counted in bf16
    assert "weights    bfloat16;" in run_cli(["plan", "deepseek-r1", "--gpus", "8", "--gpu-memory", "141GiB"])[1]
    cfg.pop("quantization_config")                     # msModelSlim: the description file says it
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "fp8" / "quant_model_description.json").write_text(json.dumps({"model_quant_type": "W8A8"}))
    rc, _, err = run_cli(args)
    assert rc == 2 and "msModelSlim W8A8 folder" in err and "--quantization w8a8-int8" in err
    assert run_cli(args + ["--quantization", "w8a8-int8"])[0] == 0


def test_serves_automatic_plan_counts_a_folders_stored_weights(tmp_path):
    """`serve` without parallel sizes (a hostfile, or several local GPUs) plans with the format
    the engine holds the weights in: an fp8 R1 folder was planned in bf16 (1.3 TB), and no
    layout of 2 nodes of 8 x 80 GiB "fit" the checkpoint the guides serve on them."""
    from deepserve.cli.plan import weights_format
    from deepserve.distributed.cluster_serve import auto_plan
    folder = tmp_path / "r1"
    folder.mkdir()
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(dict(R1, quantization_config=fp8)))
    plan = auto_plan({"model": str(folder), "max_model_len": 8192}, 16, 80 * GiB, 2, weights_format)
    assert plan.quantization == "fp8"
    expected = choose_plan(load_hf_config(str(folder)), 16, 80 * GiB, nodes=2, quantization="fp8", max_model_len=8192)
    assert plan.parallel_args() == expected.parallel_args()
    with pytest.raises(ValueError, match="loads AutoAWQ checkpoints and this one is fp8"):
        auto_plan({"model": str(folder), "quantization": "awq"}, 16, 80 * GiB, 2, weights_format)


def test_serves_automatic_plan_counts_the_modules_a_folder_leaves_unquantized(tmp_path):
    """cli/plan.py's weights_format gives the automatic plan the folder's unquantized modules too
    (distributed/ reads no quantization_config itself): counted in bf16, as `deepserve plan` does."""
    from deepserve.cli.plan import weights_format
    from deepserve.distributed.cluster_serve import auto_plan
    folder = tmp_path / "r1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(R1, quantization_config=_FP8_IGNORED)))
    plan = auto_plan({"model": str(folder), "max_model_len": 8192}, 16, 80 * GiB, 2, weights_format)
    cfg = load_hf_config(str(folder))
    assert plan.total_weight_bytes == weight_bytes_per_gpu(cfg, Layout(1, 1, 1), "bfloat16", "fp8",
                                                           ignored=checkpoint_ignore(cfg))
    assert plan.total_weight_bytes > weight_bytes_per_gpu(cfg, Layout(1, 1, 1), "bfloat16", "fp8")


@pytest.mark.parametrize("qc", [
    {"quant_method": "fp8", "activation_scheme": "static"},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                                           "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True,
                              "dynamic": False}}}, "ignore": ["lm_head", "model.layers.1.mlp.down_proj"]},
])
def test_plan_counts_static_fp8_input_scales(qc):
    """A static-activation FP8 checkpoint's Linears each hold one fp32 input_scale (one for fused
    q/k/v and gate/up, none where the checkpoint leaves the module unquantized): counted."""
    cfg = HFConfig({"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "quantization_config": qc})
    mc = ModelConfig(model="m", hf_config=cfg, dtype="bfloat16", max_model_len=4096, tokenizer="",
                     load_format="dummy", quantization="fp8")
    model = build_model(mc, torch.device("meta"), ParallelContext(), "fp8")
    scales = sum(1 for n, _ in model.named_parameters() if n.endswith("input_scale"))
    assert scales == 4 * 2 - int("ignore" in qc)       # qkv, o, gate_up, down a layer
    built = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes_per_gpu(cfg, Layout(1, 1, 1), quantization="fp8", ignored=checkpoint_ignore(cfg)) == built


@pytest.mark.parametrize("strategy, ok", [("channel", True), ("tensor", True), ("block", False)])
def test_per_channel_fp8_layouts_split_anywhere(strategy, ok):
    """A compressed-tensors FP8 folder with one scale a row or tensor: TP 2 of an intermediate
    size of 384 (192 a rank, not whole 128 blocks) is a layout, as the engine loads it; with
    128x128 block scales it is not."""
    from deepserve.distributed.plan_bytes import structural_problem
    w = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    cfg = HFConfig({"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 384,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                    "quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized",
                                            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}})
    problem = structural_problem(cfg, Layout(2, 1, 1), "fp8")
    assert (problem is None) == ok, problem
