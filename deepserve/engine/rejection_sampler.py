"""Speculative-decoding verification: which draft tokens a sequence keeps, and the one token
the target model adds after them (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding", algorithm 1; Chen et al. 2023; vLLM's rejection sampler).

For each sequence the target model scored k + 1 positions: after the last accepted token,
and after each of its k draft tokens. Draft token j is accepted

- greedy rows: iff it equals the argmax of the target distribution at j;
- sampled rows: with probability min(1, p_j(d_j) / q_j(d_j)), p the target and q the draft
  distribution at j (a deterministic draft such as n-gram lookup is one-hot: q_j(d_j) = 1).

At the first rejected position j the emitted token is drawn from normalize(max(0, p_j - q_j))
(greedy: the argmax of p_j); when all k are accepted a bonus token is drawn from p_k. The
emitted tokens then follow the target distribution exactly, whatever the draft.

Randomness comes from the caller (`uniform`, and Exp(1) `noise` for the exponential race
argmax(p / noise) that samples p without a multinomial call or host sync), so a seeded request
can draw from its own generator, as `ops.sample` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RejectionOutput:
    token_ids: torch.Tensor     # [B, K+1] int64: accepted drafts, then the recovered/bonus token; -1 after
    num_emitted: torch.Tensor   # [B] int64: accepted drafts + 1

    def to_lists(self) -> list[list[int]]:
        """Each row's emitted tokens (one host sync)."""
        ids, n = self.token_ids.tolist(), self.num_emitted.tolist()
        return [row[:m] for row, m in zip(ids, n)]


def rejection_sample(target_probs: torch.Tensor, draft_ids: torch.Tensor, num_draft: torch.Tensor,
                     greedy: torch.Tensor, uniform: torch.Tensor, noise: torch.Tensor,
                     draft_probs: Optional[torch.Tensor] = None) -> RejectionOutput:
    """target_probs [B, K+1, V] fp32 (the target's final sampling distribution at each scored
    position; row b uses positions 0..num_draft[b]); draft_ids [B, K] int64 (entries at
    j >= num_draft[b] are ignored); num_draft [B] int64 in [0, K]; greedy [B] bool;
    uniform [B, K] U(0, 1) draws; noise [B, K+1, V] Exp(1) draws; draft_probs [B, K, V] or None
    (deterministic drafts: one-hot) -> RejectionOutput."""
    B, K1, V = target_probs.shape
    K = K1 - 1
    dev = target_probs.device
    cols = torch.arange(K1, device=dev)
    valid = cols[None, :K] < num_draft[:, None]                            # [B, K]
    safe_ids = torch.where(valid, draft_ids, torch.zeros_like(draft_ids))
    p_draft = target_probs[:, :K].gather(2, safe_ids[..., None])[..., 0]   # [B, K] p_j(d_j)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, safe_ids[..., None])[..., 0]       # [B, K] q_j(d_j)
    target_argmax = target_probs.argmax(dim=-1)                            # [B, K+1]
    accept = torch.where(greedy[:, None], safe_ids == target_argmax[:, :K],
                         uniform * q_draft < p_draft)                      # u < p/q without dividing
    accept &= valid
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)                 # leading accepted drafts

    # the draft distribution at every scored position, zero where no draft was made
    # (positions >= num_draft, including the bonus position K): there the residual is p itself
    q = torch.zeros_like(target_probs)
    if draft_probs is None:
        q[:, :K].scatter_(2, safe_ids[..., None], valid[..., None].to(q.dtype))
    else:
        q[:, :K] = draft_probs * valid[..., None]
    residual = (target_probs - q).clamp_min_(0.0)                          # [B, K+1, V]
    # p == q leaves nothing to reject into; such a position is never rejected, keep p there
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, target_probs, residual)
    recovered = (residual / noise).argmax(dim=-1)                          # [B, K+1]; scale-free
    recovered = torch.where(greedy[:, None], target_argmax, recovered)

    last = recovered.gather(1, num_accepted[:, None])                      # [B, 1]
    drafts = torch.cat((safe_ids, safe_ids.new_zeros(B, 1)), dim=1)
    out = torch.where(cols[None, :] < num_accepted[:, None], drafts, torch.full_like(drafts, -1))
    out.scatter_(1, num_accepted[:, None], last)
    return RejectionOutput(out, num_accepted + 1)
