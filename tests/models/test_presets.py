"""Config presets of the real models: their key numbers, and each one building with
--load-format dummy once --hf-overrides shrinks it to a couple of tiny layers."""
import pytest
import torch

from deepserve.config import EngineArgs, is_preset, list_presets, load_hf_config
from deepserve.models.loader import load_model
from tests.models.paged_harness import prefill_logits

PRESETS = ["deepseek-r1", "deepseek-v3", "deepseek-v2-lite", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b",
           "r1-distill-qwen-14b", "r1-distill-qwen-32b", "r1-distill-llama-8b", "r1-distill-llama-70b"]

# preset -> the numbers of the published config.json
KEY_NUMBERS = {
    "deepseek-r1": dict(architecture="DeepseekV3ForCausalLM", hidden_size=7168, num_hidden_layers=61,
                        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4,
                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                        v_head_dim=128, vocab_size=129280, num_attention_heads=128, first_k_dense_replace=3,
                        moe_intermediate_size=2048, intermediate_size=18432, n_shared_experts=1,
                        routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
                        num_nextn_predict_layers=1, max_position_embeddings=163840),
    "deepseek-v3": dict(architecture="DeepseekV3ForCausalLM", hidden_size=7168, num_hidden_layers=61,
                        n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536, vocab_size=129280),
    "deepseek-v2-lite": dict(architecture="DeepseekV2ForCausalLM", hidden_size=2048, num_hidden_layers=27,
                             n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, q_lora_rank=None,
                             kv_lora_rank=512, num_attention_heads=16, first_k_dense_replace=1,
                             moe_intermediate_size=1408, intermediate_size=10944, vocab_size=102400,
                             scoring_func="softmax", topk_method="greedy"),
    "r1-distill-qwen-1.5b": dict(architecture="Qwen2ForCausalLM", hidden_size=1536, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                                 vocab_size=151936, rope_theta=10000),
    "r1-distill-qwen-7b": dict(architecture="Qwen2ForCausalLM", hidden_size=3584, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                               vocab_size=152064),
    "r1-distill-qwen-14b": dict(architecture="Qwen2ForCausalLM", hidden_size=5120, num_hidden_layers=48,
                                num_attention_heads=40, num_key_value_heads=8, intermediate_size=13824,
                                vocab_size=152064, rope_theta=1000000.0),
    "r1-distill-qwen-32b": dict(architecture="Qwen2ForCausalLM", hidden_size=5120, num_hidden_layers=64,
                                num_attention_heads=40, num_key_value_heads=8, intermediate_size=27648,
                                vocab_size=152064),
    "r1-distill-llama-8b": dict(architecture="LlamaForCausalLM", hidden_size=4096, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                                vocab_size=128256, rope_theta=500000.0),
    "r1-distill-llama-70b": dict(architecture="LlamaForCausalLM", hidden_size=8192, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                                 vocab_size=128256),
}

TINY_DENSE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=512)
TINY_MLA = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_attention_heads=4,
                num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, vocab_size=512)


def test_every_preset_is_listed():
    assert list_presets() == sorted(PRESETS)
    assert all(is_preset(name) for name in PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_key_numbers(name):
    cfg = load_hf_config(name)
    for key, value in KEY_NUMBERS[name].items():
        assert getattr(cfg, key) == value, f"{name}: {key} = {getattr(cfg, key)!r}, expected {value!r}"
    if name.startswith("deepseek"):
        assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 40
        assert cfg.rope_scaling["original_max_position_embeddings"] == 4096
    if name.startswith("r1-distill-llama"):
        assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.torch_dtype == "bfloat16"


def _overrides(name: str) -> dict:
    cfg = load_hf_config(name)
    if not name.startswith("deepseek"):
        return dict(TINY_DENSE)
    tiny = dict(TINY_MLA, num_hidden_layers=cfg.first_k_dense_replace + 1)  # dense layers + one MoE
    if cfg.q_lora_rank is not None:
        tiny["q_lora_rank"] = 24
    return tiny


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_with_dummy_weights(name):
    overrides = _overrides(name)
    engine = EngineArgs(model=name, hf_overrides=overrides, dtype="float32").create_engine_config()
    assert engine.model.load_format == "dummy"
    model = load_model(engine.model, torch.device("cpu"))
    params = dict(model.named_parameters())
    assert params["model.embed_tokens.weight"].shape == (512, 64)
    assert len(model.model.layers) == overrides["num_hidden_layers"]
    if name.startswith("deepseek"):
        cfg = engine.model.hf_config
        moe = model.model.layers[-1].mlp
        assert moe.experts.w13_weight.shape == (cfg.n_routed_experts, 2 * 16, 64)
        assert (moe.gate.e_score_correction_bias is not None) == (cfg.topk_method == "noaux_tc")
        attn = model.model.layers[0].self_attn
        assert hasattr(attn, "q_proj") == (cfg.q_lora_rank is None)
        assert attn.kv_cache_shapes(16) == [(16, 1, 32 + 8)]
    logits = prefill_logits(model, [[1, 2, 3, 4, 5], [9, 8, 7]])
    assert logits.shape == (8, 512) and torch.isfinite(logits).all()
    assert logits.std() > 0   # random weights, not zeros
