"""benchmarks/random_checkpoint.py: the random checkpoint it writes has exactly the tensors
transformers' class for the config expects (nothing missing, nothing unexpected; Llama's
attention_bias / mlp_bias biases included), and deepserve and transformers loading it give the
same logits; `matches` tells a checkpoint written for the folder's current config.json."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.bench.conftest import benchmark_module
from tests.models.hf_reference import assert_close_rel, load_ours
from tests.models.paged_harness import prefill_logits

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
             attention_bias=True, mlp_bias=True, torch_dtype="bfloat16")
QWEN2 = dict(LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=False, mlp_bias=False,
             tie_word_embeddings=True)
DEEPSEEK_V3 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=128, hidden_size=32,
                   intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=16,
                   v_head_dim=16, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                   topk_group=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                   scoring_func="sigmoid", topk_method="noaux_tc", max_position_embeddings=64, rms_norm_eps=1e-6,
                   rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16")


@pytest.fixture(scope="module")
def rc():
    return benchmark_module("random_checkpoint")


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2, DEEPSEEK_V3], ids=["llama_biases", "qwen2_tied", "deepseek_v3"])
def test_checkpoint_loads_alike_in_transformers_and_deepserve(rc, tmp_path, cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc.write(tmp_path, shard_bytes=20_000)                        # several shards
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_ours(tmp_path)
    prompt = [3, 17, 5, 99, 42, 7]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        got = prefill_logits(ours, [prompt], max_len=16)
    assert_close_rel(got[:, :cfg["vocab_size"]], want, rtol=1e-3)


def test_matches_only_the_config_it_was_written_for(rc, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2))
    assert not rc.matches(tmp_path)
    rc.write(tmp_path)
    assert rc.matches(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(QWEN2, num_hidden_layers=3)))
    assert not rc.matches(tmp_path)                                # peer_vllm.py writes it again
    rc.write(tmp_path)
    assert rc.matches(tmp_path) and "model.layers.2.mlp.up_proj.weight" in json.loads(
        (tmp_path / "model.safetensors.index.json").read_text())["weight_map"]


def test_deepseek_biases_are_refused(rc):
    with pytest.raises(ValueError, match="attention_bias"):
        rc.tensor_shapes(dict(DEEPSEEK_V3, attention_bias=True))
