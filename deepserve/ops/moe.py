"""Mixture-of-experts routing and expert compute, torch reference.

`moe_route` turns router logits into each token's top-k experts and weights, covering the
DeepSeek family (DeepSeek-V2, arXiv 2405.04434; DeepSeek-V3, arXiv 2412.19437):

- scoring_func "softmax" (V2) or "sigmoid" (V3/R1);
- topk_method "greedy" (plain top-k), "group_limited_greedy" (V2: keep the `topk_group`
  groups with the best single expert score), "noaux_tc" (V3: choose with scores plus the
  load-balancing `e_score_correction_bias`, groups ranked by the sum of their two best biased
  scores; the weights are the unbiased scores);
- norm_topk_prob (renormalise the k weights) and routed_scaling_factor (multiply them).

This follows `transformers`' DeepseekV2/V3 routers: normalise first when asked, then always
scale. (DeepSeek's original V2 code scaled only when not normalising; every released V2
config has norm_topk_prob false, so both agree on real models.)

`fused_moe` runs the SwiGLU experts over the tokens sorted by expert: one GEMM pair per
expert that received tokens (a loop over experts, never over tokens), weighted and summed
back per token. Expert ids outside [0, E) contribute zero: that is how expert parallelism
drops the tokens routed to another rank's experts (the layer shifts ids by its first local
expert). With `w13_scale`/`w2_scale` the weights are e4m3 with one fp32 scale_inv per
128x128 block, dequantized here per expert, and run W8A8 as the Triton kernels do (the
sorted grouped GEMMs and the small path's tensor-core kernels; DeepSeek-V3's recipe): the
token rows and the SwiGLU output are quantised to e4m3 per token per 128-group
(ops/quant.py's quant_fp8_per_token_group) and each product summed in fp32, so this op is
their oracle. (The small path's CUDA-core kernels run W8A16: their oracle is this op over the
dequantised weights.) A checkpoint with static activation scales (compressed-tensors FP8 with
dynamic=false on the experts, AutoFP8's activation_scheme static) gives `a13_scale` /
`a2_scale`, one value each (vLLM's a1 / a2 scales: the largest of the layer's experts'), and
the two GEMMs' inputs are quantised with them: e4m3(clamp(x / s, -448, 448)), the format's rule.
`per_channel_weights`: one scale a weight row instead of a 128x128 block (compressed-tensors
FP8 'channel' experts, RedHatAI's *-FP8-dynamic MoE releases), the activations quantised per
token group as above. `weight_only` (a compressed-tensors FP8 scheme without
input_activations): W8A16, each expert's weight dequantised to the activations' dtype and the
activations left as they are, as fp8_weight_only_linear runs the dense layers of such a
checkpoint.

`shared_w13` [2*Is, D] / `shared_w2` [D, Is] add DeepSeek's shared experts: one more SwiGLU
expert every token uses with weight 1.0, computed here exactly as the dense `LlamaMLP` does
(F.linear gate_up, silu(gate) * up in the activation dtype, F.linear down) and added to the
routed sum rounded to the activation dtype, so the result is bit for bit the routed output
plus the shared MLP's, the two-call contract the Triton kernels fuse (they round once). Beside
fp8 routed experts the shared weights are e4m3 too, with `shared_w13_scale` /
`shared_w2_scale` in Fp8BlockLinear's layout (scale_inv per row and 128-column block, rows of a
128-row block alike), run through fp8_block_linear as the dense fp8 MLP runs them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from deepserve.ops.quant import fp8_block_linear, quant_fp8_per_token_group, quant_fp8_static
from deepserve.ops.registry import register

_SCORING = ("softmax", "sigmoid")
_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn


def check_route_methods(scoring_func: str, topk_method: str) -> None:
    """Both backends of moe_route accept the same scoring functions and top-k methods."""
    if scoring_func not in _SCORING:
        raise ValueError(f"scoring_func must be one of {_SCORING}, got {scoring_func!r}")
    if topk_method not in _TOPK_METHODS:
        raise ValueError(f"topk_method must be one of {_TOPK_METHODS}, got {topk_method!r}")


@register("moe_route", "torch")
def moe_route(router_logits: torch.Tensor, e_score_correction_bias: Optional[torch.Tensor], *,
              top_k: int, scoring_func: str, topk_method: str, n_group: Optional[int],
              topk_group: Optional[int], norm_topk_prob: bool,
              routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int32)."""
    check_route_methods(scoring_func, topk_method)
    logits = router_logits.float()
    scores = logits.sigmoid() if scoring_func == "sigmoid" else logits.softmax(dim=-1)
    num_tokens, num_experts = scores.shape

    choice = scores
    if topk_method == "noaux_tc":
        if e_score_correction_bias is None:
            raise ValueError("topk_method 'noaux_tc' needs e_score_correction_bias, got None")
        choice = scores + e_score_correction_bias.float()
    groups = n_group or 1
    if topk_method != "greedy" and groups > 1:
        if num_experts % groups:
            raise ValueError(f"n_group {groups} does not divide the {num_experts} routed experts")
        grouped = choice.view(num_tokens, groups, num_experts // groups)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)   # [T, G]
        else:
            group_scores = grouped.max(dim=-1).values                    # [T, G]
        best_groups = group_scores.topk(topk_group, dim=-1).indices      # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~keep, float("-inf"))
    topk_ids = choice.topk(top_k, dim=-1).indices                      # [T, k]
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
    topk_weights = topk_weights * routed_scaling_factor
    return topk_weights, topk_ids.to(torch.int32)


def expert_batches(topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int):
    """For each expert in [0, E) some (token, slot) assignment picks, in expert order:
    (expert, the assignments' token rows [n], their routing weights [n] in fp32)."""
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1).long()
    for expert in torch.unique(flat_ids[(flat_ids >= 0) & (flat_ids < num_experts)]).tolist():
        slots = (flat_ids == expert).nonzero().flatten()
        yield expert, slots // top_k, topk_weights.reshape(-1)[slots].float()


def _dequant(weight: torch.Tensor, scale_inv: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """One expert's e4m3 weight [N, K] with its per-128x128 scale_inv (per_channel: [N, 1], one
    a row), in fp32."""
    if per_channel:
        return weight.float() * scale_inv.float()
    n, k = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]
    return weight.float() * scale


def _fake_quant(x: torch.Tensor, static_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of x [M, K] quantised to e4m3 and back, in fp32: the activations the fp8 kernels
    multiply (W8A8), per token per 128-group, or with a checkpoint's one static scale."""
    if static_scale is not None:
        return quant_fp8_static(x, static_scale).float() * static_scale.float().reshape(1, 1)
    q, s = quant_fp8_per_token_group(x)
    return q.float() * s.repeat_interleave(FP8_BLOCK, 1)[:, :x.shape[1]]


def _expert_linear(a: torch.Tensor, weight: torch.Tensor, scale_inv: Optional[torch.Tensor],
                   a_scale: Optional[torch.Tensor] = None, per_channel: bool = False,
                   weight_only: bool = False) -> torch.Tensor:
    """a [n, K] times one expert's weight [N, K]^T -> [n, N] in a's dtype: 16-bit weights as
    F.linear; e4m3 ones as the fp8 kernels compute, the activations quantised (per token per
    128-group, or with the static `a_scale`) and the product of the dequantised operands
    summed in fp32; `weight_only`: the dequantised weight in a's dtype, F.linear (W8A16)."""
    if scale_inv is None:
        return F.linear(a, weight)
    if weight_only:
        return F.linear(a, _dequant(weight, scale_inv, per_channel).to(a.dtype))
    return (_fake_quant(a, a_scale) @ _dequant(weight, scale_inv, per_channel).t()).to(a.dtype)


@register("fused_moe", "torch")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: Optional[torch.Tensor] = None,
              w2_scale: Optional[torch.Tensor] = None, shared_w13: Optional[torch.Tensor] = None,
              shared_w2: Optional[torch.Tensor] = None, shared_w13_scale: Optional[torch.Tensor] = None,
              shared_w2_scale: Optional[torch.Tensor] = None, a13_scale: Optional[torch.Tensor] = None,
              a2_scale: Optional[torch.Tensor] = None, per_channel_weights: bool = False,
              weight_only: bool = False) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] (rows: gate then up), w2 [E, D, I] -> [T, D].

    out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(gate_e x_t) * (up_e x_t)), e = topk_ids[t, j],
    plus the shared MLP of `shared_w13` [2*Is, D] / `shared_w2` [D, Is] when given.
    `a13_scale` / `a2_scale` (fp8 experts, one fp32 value each): static activation scales of the
    gate/up and down GEMMs' inputs, used instead of per-token-group ones. `per_channel_weights`:
    w13_scale [E, 2I, 1] / w2_scale [E, D, 1] hold one scale a row (compressed-tensors 'channel').
    `weight_only` (fp8 experts): the activations stay unquantised (W8A16)."""
    check_shared_experts(x, w13_scale is not None, shared_w13, shared_w2, shared_w13_scale, shared_w2_scale)
    check_static_scales(w13_scale is not None, a13_scale, a2_scale, shared_w13)
    check_weight_only(w13_scale is not None, weight_only, a13_scale, shared_w13)
    check_row_scales(x, w13, w2, w13_scale, w2_scale, per_channel_weights, shared_w13)
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1).long()                        # [T*k]
    local = (flat_ids >= 0) & (flat_ids < num_experts)
    # sort the (token, slot) assignments by expert so each expert sees a contiguous run
    order = torch.argsort(torch.where(local, flat_ids, num_experts), stable=True)
    counts = torch.bincount(flat_ids[local], minlength=num_experts).tolist()
    token_of = order // top_k                                     # token row of each sorted assignment
    weight_of = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = token_of[start:start + count]
        s13 = None if w13_scale is None else w13_scale[expert]
        s2 = None if w2_scale is None else w2_scale[expert]
        gate, up = _expert_linear(x[rows], w13[expert], s13, a13_scale, per_channel_weights,
                                  weight_only).chunk(2, dim=-1)
        y = _expert_linear(F.silu(gate) * up, w2[expert], s2, a2_scale, per_channel_weights, weight_only)  # [n, D]
        out.index_add_(0, rows, y.float() * weight_of[start:start + count, None])
        start += count
    if shared_w13 is None:
        return out.to(x.dtype)
    return out.to(x.dtype) + shared_mlp(x, shared_w13, shared_w2, shared_w13_scale, shared_w2_scale)


def check_weight_only(fp8_experts: bool, weight_only: bool, a13_scale: Optional[torch.Tensor],
                      shared_w13: Optional[torch.Tensor]) -> None:
    """Weight-only (W8A16) runs fp8 experts, without static activation scales, and no shared
    experts folded in (the fused shared MLP quantises its activations)."""
    if not weight_only:
        return
    if not fp8_experts:
        raise ValueError("fused_moe weight_only is for fp8 experts (w13_scale / w2_scale) only")
    if a13_scale is not None:
        raise ValueError("fused_moe weight_only experts leave the activations unquantised: no a13_scale / a2_scale")
    if shared_w13 is not None:
        raise ValueError("fused_moe shared experts do not fold into weight-only fp8 experts")


def check_row_scales(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: Optional[torch.Tensor],
                     w2_scale: Optional[torch.Tensor], per_channel: bool, shared_w13: Optional[torch.Tensor]) -> None:
    """Per-row weight scales: fp8 experts only, [E, N, 1] for each weight [E, N, K], no shared
    experts folded in."""
    if not per_channel:
        return
    if w13_scale is None:
        raise ValueError("fused_moe per_channel_weights is for fp8 experts (w13_scale / w2_scale) only")
    for name, w, s in (("w13_scale", w13, w13_scale), ("w2_scale", w2, w2_scale)):
        if tuple(s.shape) != (*w.shape[:2], 1):
            raise ValueError(f"fused_moe {name} {tuple(s.shape)} does not hold one scale a row of "
                             f"{tuple(w.shape)} (want {(*w.shape[:2], 1)})")
    if shared_w13 is not None:
        raise ValueError("fused_moe shared experts do not fold into experts with per-row scales")


def check_static_scales(fp8_experts: bool, a13_scale: Optional[torch.Tensor], a2_scale: Optional[torch.Tensor],
                        shared_w13: Optional[torch.Tensor]) -> None:
    """Static activation scales: both or neither, one value each, for fp8 experts only, and no
    shared experts folded in (they run as the dense layer, with their own scales)."""
    if a13_scale is None and a2_scale is None:
        return
    if a13_scale is None or a2_scale is None:
        raise ValueError("fused_moe static activation scales need both a13_scale and a2_scale")
    if not fp8_experts:
        raise ValueError("fused_moe static activation scales (a13_scale / a2_scale) are for fp8 experts only")
    for name, s in (("a13_scale", a13_scale), ("a2_scale", a2_scale)):
        if s.numel() != 1:
            raise ValueError(f"fused_moe {name} holds one value, got shape {tuple(s.shape)}")
    if shared_w13 is not None:
        raise ValueError("fused_moe shared experts do not fold into experts with static activation scales")


def check_shared_experts(x: torch.Tensor, fp8_experts: bool, shared_w13: Optional[torch.Tensor],
                         shared_w2: Optional[torch.Tensor], shared_w13_scale: Optional[torch.Tensor] = None,
                         shared_w2_scale: Optional[torch.Tensor] = None) -> None:
    """Both shared-expert weights or neither, [2*Is, D] and [D, Is] for x [T, D]: in x's dtype
    beside 16-bit routed experts, e4m3 with both scales ([N, ceil(K/128)]) beside fp8."""
    if shared_w13 is None and shared_w2 is None:
        if shared_w13_scale is not None or shared_w2_scale is not None:
            raise ValueError("fused_moe shared expert scales given without shared_w13 / shared_w2")
        return
    if shared_w13 is None or shared_w2 is None:
        given = "shared_w13" if shared_w2 is None else "shared_w2"
        raise ValueError(f"fused_moe shared experts need both shared_w13 and shared_w2, got only {given}")
    fp8_shared = shared_w13_scale is not None
    if fp8_shared != (shared_w2_scale is not None):
        raise ValueError("fp8 shared experts need both shared_w13_scale and shared_w2_scale")
    if fp8_shared != fp8_experts:
        raise ValueError(f"fused_moe shared experts must be stored like the routed ones: "
                         f"{'fp8' if fp8_experts else '16-bit'} routed experts, "
                         f"{'fp8' if fp8_shared else '16-bit'} shared weights")
    # unquantized like the dense MLP they replace, or e4m3 like the routed experts
    want = FP8_DTYPE if fp8_shared else x.dtype
    for name, w in (("shared_w13", shared_w13), ("shared_w2", shared_w2)):
        if w.dtype != want:
            what = want if fp8_shared else f"the activations' dtype {want}"
            raise ValueError(f"fused_moe {name} must have {what}, got {w.dtype}")
    hidden = x.shape[-1]
    two_inter = shared_w13.shape[0]
    if shared_w13.dim() != 2 or shared_w13.shape[1] != hidden or two_inter % 2 or not two_inter \
            or tuple(shared_w2.shape) != (hidden, two_inter // 2):
        raise ValueError(f"shared expert weights shared_w13 {tuple(shared_w13.shape)} / shared_w2 "
                         f"{tuple(shared_w2.shape)} do not fit x {tuple(x.shape)} (want [2*Is, {hidden}] "
                         f"and [{hidden}, Is])")
    if fp8_shared:
        for name, w, s in (("shared_w13_scale", shared_w13, shared_w13_scale),
                           ("shared_w2_scale", shared_w2, shared_w2_scale)):
            want_s = (w.shape[0], -(-w.shape[1] // FP8_BLOCK))
            if tuple(s.shape) != want_s:
                raise ValueError(f"fused_moe {name} {tuple(s.shape)} does not fit {tuple(w.shape)} "
                                 f"(want {want_s}, one scale per row and {FP8_BLOCK}-column block)")


def shared_mlp(x: torch.Tensor, shared_w13: torch.Tensor, shared_w2: torch.Tensor,
               shared_w13_scale: Optional[torch.Tensor] = None,
               shared_w2_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The shared experts as LlamaMLP computes them: x [T, D] -> [T, D] in x's dtype; e4m3
    weights (with their row-expanded scales) through fp8_block_linear, as the dense fp8 MLP."""
    if shared_w13_scale is None:
        gate, up = F.linear(x, shared_w13).chunk(2, dim=-1)    # [T, Is] each
        return F.linear(F.silu(gate) * up, shared_w2)
    gate, up = fp8_block_linear(x, shared_w13, shared_w13_scale).chunk(2, dim=-1)
    return fp8_block_linear(F.silu(gate) * up, shared_w2, shared_w2_scale)
