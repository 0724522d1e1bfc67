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
