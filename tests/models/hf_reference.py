"""Tiny random Hugging Face checkpoints built with transformers' own classes, and the
reference logits / greedy generations they give."""
from __future__ import annotations

from pathlib import Path

import torch

from deepserve.config import EngineArgs
from deepserve.models.loader import load_model


def save_tiny(model_cls, config, path: Path, seed: int = 0):
    torch.manual_seed(seed)
    model = model_cls(config).eval().float()
    # random non-trivial norms and biases so a skipped parameter shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model


def save_tiny_mla_moe(path: Path, **overrides) -> Path:
    """A tiny DeepSeek-V3 checkpoint (MLA, a dense layer then an MoE one of 4 experts in 2
    groups, a shared expert) in `path`; `overrides`: more config fields."""
    import transformers
    cfg = transformers.DeepseekV3Config(**{
        **dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
               n_group=2, topk_group=1, first_k_dense_replace=1, eos_token_id=None), **overrides})
    save_tiny(transformers.DeepseekV3ForCausalLM, cfg, path)
    return path


def load_ours(path: Path, **kwargs):
    cfg = EngineArgs(model=str(path), dtype="float32", **kwargs).create_engine_config()
    return load_model(cfg.model, torch.device("cpu"))


@torch.no_grad()
def hf_logits(model, prompts):
    return [model(torch.tensor([p])).logits[0] for p in prompts]


@torch.no_grad()
def hf_greedy(model, prompt, max_new):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                         min_new_tokens=max_new, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rtol * scale, f"max |diff| {err:.3e} exceeds {rtol} x max |ref| {scale:.3e}"
