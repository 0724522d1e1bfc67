"""A one-layer Llama whose greedy next token is a fixed function of the current token, with a
real tokenizer: each token's embedding is a one-hot slot that the LM head maps to the next
token (the attention and MLP outputs are zero, so the layer is the identity). Tests that need
an exact greedy output (reasoning splits, tool calls, thinking budgets) write one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

VOCAB = 129280   # DeepSeek-R1's tokenizer


def write_chain_model(folder: Path, next_token: dict[int, int], tokenizer_dir: Path, eos: int,
                      vocab: int = VOCAB) -> Path:
    """`next_token`: current token id -> the token greedy decoding picks after it."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, heads, head_dim = 64, 64, 4, 16
    assert len(next_token) <= hidden, f"{len(next_token)} transitions, {hidden} slots"
    embed = torch.zeros(vocab, hidden)
    lm_head = torch.zeros(vocab, hidden)
    for slot, (cur, nxt) in enumerate(next_token.items()):
        embed[cur, slot] = 1.0
        lm_head[nxt, slot] = 10.0
    zeros = torch.zeros
    tensors = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head,
               "model.norm.weight": torch.ones(hidden),
               "model.layers.0.input_layernorm.weight": torch.ones(hidden),
               "model.layers.0.post_attention_layernorm.weight": torch.ones(hidden),
               # zero output projections: the layer is the identity, logits follow the token
               "model.layers.0.self_attn.q_proj.weight": torch.randn(heads * head_dim, hidden) * 0.02,
               "model.layers.0.self_attn.k_proj.weight": torch.randn(heads * head_dim, hidden) * 0.02,
               "model.layers.0.self_attn.v_proj.weight": torch.randn(heads * head_dim, hidden) * 0.02,
               "model.layers.0.self_attn.o_proj.weight": zeros(hidden, heads * head_dim),
               "model.layers.0.mlp.gate_proj.weight": torch.randn(inter, hidden) * 0.02,
               "model.layers.0.mlp.up_proj.weight": torch.randn(inter, hidden) * 0.02,
               "model.layers.0.mlp.down_proj.weight": zeros(hidden, inter)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": head_dim, "vocab_size": vocab,
              "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
              "eos_token_id": eos, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder
