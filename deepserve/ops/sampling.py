"""Token sampling from logits without a host sync, torch reference.

Temperature, top-k, top-p (nucleus) and min-p filters per row, then the exponential-race
trick (gpt-fast, DeepSeek): argmax(p / q) with q ~ Exp(1) draws from p without a
multinomial call. Rows with temperature 0 are greedy. `noise` (the Exp(1) draws) is given
by the caller so that seeded requests draw from their own generators.
"""
from __future__ import annotations

import torch

from deepserve.ops.registry import register


@register("sample", "torch")
def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32; temperature/top_p/min_p [B] fp32; top_k [B] int (0 = off);
    noise [B, V] Exp(1) draws -> token ids [B] (int64)."""
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, logits.argmax(dim=-1))


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """The distribution `sample` draws from, [B, V], normalised; rows with temperature 0 get the
    temperature-1 distribution (their callers take the argmax)."""
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = logits / temp[:, None]
    vocab = logits.shape[-1]
    # top-k and top-p on the sorted logits, then scatter the mask back
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
    drop = ranks >= k[:, None]
    probs_sorted = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    cum = probs_sorted.cumsum(dim=-1)
    drop |= (cum - probs_sorted) > top_p[:, None]   # keep the smallest prefix reaching top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    # min-p: drop tokens below min_p x the top probability (min_p = 0 drops nothing)
    probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
