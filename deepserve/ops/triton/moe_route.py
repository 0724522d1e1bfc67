"""MoE router (DeepSeek V2/V3 family) as one Triton kernel per batch: a program per token.

A program loads the token's E router logits, scores them (softmax or sigmoid), adds the
noaux_tc correction bias for choosing, keeps the best `topk_group` of `n_group` expert
groups (ranked by their best score, or by the sum of their two best biased scores for
noaux_tc), and picks the top k experts by repeated arg-max; weights are the unbiased
scores, optionally renormalised, then scaled. Replaces about fifteen small torch kernels
with one launch. Semantics are those of `deepserve.ops.moe.moe_route`, whose docstring
cites the DeepSeek-V2/V3 papers; picks come out in descending order like torch.topk.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deepserve.ops.moe import check_route_methods
from deepserve.ops.registry import register
from deepserve.ops.triton._common import next_pow2, pdl_begin, pdl_launch, unit_last


@triton.jit
def _moe_route_kernel(logits_ptr, bias_ptr, w_out_ptr, id_out_ptr, logits_stride, n_experts, scaling,
                      TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr,
                      GROUP_SIZE: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                      GROUP_TOP2: tl.constexpr, LIMIT_GROUPS: tl.constexpr, NORMALIZE: tl.constexpr,
                      BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_begin(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    # experts laid out as [N_GROUP, GROUP_SIZE] (GROUP_SIZE padded to a power of two)
    g = tl.arange(0, N_GROUP)[:, None]
    j = tl.arange(0, GROUP_SIZE)[None, :]
    true_group = n_experts // N_GROUP
    expert = g * true_group + j
    valid = j < true_group
    x = tl.load(logits_ptr + tok * logits_stride + expert, mask=valid, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    else:
        e = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
        scores = e / tl.sum(tl.sum(e, axis=1), axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))
    if LIMIT_GROUPS:
        best = tl.max(choice, axis=1)                                     # [G]
        if GROUP_TOP2:
            first = tl.argmax(choice, axis=1)
            rest = tl.where(j == first[:, None], float("-inf"), choice)
            group_score = best + tl.max(rest, axis=1)
        else:
            group_score = best
        gi = tl.arange(0, N_GROUP)
        keep = tl.zeros([N_GROUP], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            pick = tl.argmax(group_score, axis=0)
            keep = keep | (gi == pick)
            group_score = tl.where(gi == pick, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    flat_choice = tl.reshape(choice, [N_GROUP * GROUP_SIZE])
    flat_scores = tl.reshape(scores, [N_GROUP * GROUP_SIZE])
    flat_expert = tl.reshape(expert, [N_GROUP * GROUP_SIZE])
    pos = tl.arange(0, N_GROUP * GROUP_SIZE)
    kk = tl.arange(0, BLOCK_K)
    ids = tl.zeros([BLOCK_K], tl.int32)
    weights = tl.zeros([BLOCK_K], tl.float32)
    for i in tl.static_range(TOP_K):
        pick = tl.argmax(flat_choice, axis=0)
        ids = tl.where(kk == i, tl.sum(tl.where(pos == pick, flat_expert, 0), axis=0), ids)
        weights = tl.where(kk == i, tl.sum(tl.where(pos == pick, flat_scores, 0.0), axis=0), weights)
        flat_choice = tl.where(pos == pick, float("-inf"), flat_choice)
    if NORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    k_mask = kk < TOP_K
    tl.store(w_out_ptr + tok * TOP_K + kk, weights * scaling, mask=k_mask)
    tl.store(id_out_ptr + tok * TOP_K + kk, ids, mask=k_mask)


@register("moe_route", "triton")
def moe_route(router_logits: torch.Tensor, e_score_correction_bias: Optional[torch.Tensor], *,
              top_k: int, scoring_func: str, topk_method: str, n_group: Optional[int],
              topk_group: Optional[int], norm_topk_prob: bool,
              routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int32)."""
    check_route_methods(scoring_func, topk_method)
    if topk_method == "noaux_tc" and e_score_correction_bias is None:
        raise ValueError("topk_method 'noaux_tc' needs e_score_correction_bias, got None")
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    groups = n_group or 1
    limit = topk_method != "greedy" and groups > 1
    if limit and num_experts % groups:
        raise ValueError(f"n_group {groups} does not divide the {num_experts} routed experts")
    if not limit:
        groups = 1
    if groups & (groups - 1):
        raise ValueError(f"the Triton moe_route needs a power-of-two n_group, got {groups}")
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    logits = unit_last(router_logits)
    use_bias = topk_method == "noaux_tc"
    _moe_route_kernel[(num_tokens,)](
        logits, e_score_correction_bias if use_bias else logits, weights, ids, logits.stride(0),
        num_experts, float(routed_scaling_factor),
        TOP_K=top_k, N_GROUP=groups, TOPK_GROUP=(topk_group or groups) if limit else 1,
        GROUP_SIZE=next_pow2(num_experts // groups), SIGMOID=scoring_func == "sigmoid", HAS_BIAS=use_bias,
        GROUP_TOP2=topk_method == "noaux_tc", LIMIT_GROUPS=limit, NORMALIZE=bool(norm_topk_prob),
        BLOCK_K=next_pow2(top_k), num_warps=4, **pdl_launch(router_logits.device))
    return weights, ids
