"""Tiny DeepSeek-V3-like checkpoints for the conversion tests.

Two shards with an index, Hugging Face names (q_a_proj, kv_a_proj_with_mqa, experts, the
router `mlp.gate`, e_score_correction_bias, norms, embed_tokens, lm_head) and shapes that are
not multiples of 128, so every FP8 scale grid has partial edge blocks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

H, V, I, E = 200, 300, 72, 3  # hidden, vocab, expert intermediate, experts

SHARD1 = {
    "model.embed_tokens.weight": (V, H),
    "model.layers.0.input_layernorm.weight": (H,),
    "model.layers.0.self_attn.q_a_proj.weight": (136, H),
    "model.layers.0.self_attn.q_a_layernorm.weight": (136,),
    "model.layers.0.self_attn.q_b_proj.weight": (260, 136),
    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight": (144, H),
    "model.layers.0.self_attn.kv_a_layernorm.weight": (128,),
    "model.layers.0.self_attn.kv_b_proj.weight": (257, 128),
    "model.layers.0.self_attn.o_proj.weight": (H, 260),
    "model.layers.0.mlp.gate_proj.weight": (V, H),
    "model.layers.0.mlp.up_proj.weight": (V, H),
    "model.layers.0.mlp.down_proj.weight": (H, V),
}
SHARD2 = {
    "model.layers.1.post_attention_layernorm.weight": (H,),
    "model.layers.1.mlp.gate.weight": (E, H),
    "model.layers.1.mlp.shared_experts.gate_proj.weight": (I, H),
    "model.layers.1.mlp.shared_experts.down_proj.weight": (H, I),
    **{f"model.layers.1.mlp.experts.{e}.{p}.weight": ((I, H) if p != "down_proj" else (H, I))
       for e in range(E) for p in ("gate_proj", "up_proj", "down_proj")},
    "model.norm.weight": (H,),
    "lm_head.weight": (V, H),
}
QUANTIZED = {n for n in {**SHARD1, **SHARD2}
             if len({**SHARD1, **SHARD2}[n]) == 2 and not any(
                 k in n for k in ("embed_tokens", "lm_head", "mlp.gate.weight"))}
BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "hidden_size": H, "vocab_size": V, "torch_dtype": "bfloat16",
          "auto_map": {"AutoModel": "modeling_deepseek.DeepseekV3Model"}}


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    w = 0.05 * torch.randn(shape, generator=gen)
    w[0, 0] = 3.0  # an outlier: its block's scale must follow it
    if name.endswith("experts.0.gate_proj.weight"):
        w[:, :128] = 0.0  # an all-zero block: scale must stay finite, values zero
    return w.to(torch.bfloat16)


def write_checkpoint(root: Path, shards: dict[str, dict[str, torch.Tensor]], config: dict) -> Path:
    """Write `shards` (file -> tensors), their index, config and side files under `root`."""
    root.mkdir(parents=True)
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    total = sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values())
    (root / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (root / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    (root / "modeling_deepseek.py").write_text("raise SystemExit('remote code must not run')\n")
    return root


@pytest.fixture
def bf16_ckpt(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    s1 = {n: _tensor(n, s, gen) for n, s in SHARD1.items()}
    s2 = {n: _tensor(n, s, gen) for n, s in SHARD2.items()}
    s2[BIAS] = torch.randn(E, generator=gen)  # fp32, as in the official release
    return write_checkpoint(tmp_path / "bf16", {"model-00001-of-00002.safetensors": s1,
                                                "model-00002-of-00002.safetensors": s2}, CONFIG)
