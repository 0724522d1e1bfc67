"""MoE building blocks: the fp32 router gate and the stacked routed experts.

`MoEGate` holds `gate.weight` [E, D] (and `e_score_correction_bias` [E] for noaux_tc) in fp32,
because routing picks among near-equal scores and bf16 logits would change the choice.

`FusedMoE` keeps every expert's weights stacked in one parameter each, w13 [E, 2I, D] (gate
rows then up rows) and w2 [E, D, I], filled from the per-expert checkpoint tensors
(`experts.{e}.gate_proj/up_proj/down_proj.weight`) through `weight_loader(param, t, (e, w))`.
The compute is `ops.fused_moe` over tokens sorted by expert (DESIGN invariant 4).

Parallelism (DESIGN invariant 5): with expert parallelism (ep_size > 1) a rank holds the
E/ep_size experts `[ep_rank * E_local, ...)` whole, tokens routed elsewhere contribute zero
here, and the partial sums are all-reduced over the EP group. Without EP, every rank holds
all experts with the intermediate dim sliced by tp_rank and the sums are all-reduced over TP.

Data-parallel attention with EP (pctx.moe_dp_exchange): each DP rank brings its own tokens,
routed by its own gate, and the layer exchanges them with the ranks holding their experts
(`--all2all-backend`: all-gather + reduce-scatter, or all-to-all; layers/moe_exchange.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from deepserve import ops
from deepserve.distributed.parallel_state import ParallelContext, divide, single_process
from deepserve.layers import moe_exchange

# checkpoint projection name -> (stacked parameter, which part of it)
EXPERT_SHARDS = {"gate_proj": ("w13_weight", "w1"), "up_proj": ("w13_weight", "w3"),
                 "down_proj": ("w2_weight", "w2")}


class MoEGate(nn.Module):
    """Router logits in fp32: x [T, D] -> [T, E]."""

    def __init__(self, hidden_size: int, num_experts: int, with_correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        if with_correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)      # fp32 weight: fp32 logits


class FusedMoE(nn.Module):
    """Routed SwiGLU experts with stacked weights: (x [T, D], weights [T, k], ids [T, k]) -> [T, D]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 params_dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None,
                 reduce_results: bool = True):
        super().__init__()
        self.pctx = pctx or single_process()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size
        self.reduce_results = reduce_results
        self.use_ep = self.pctx.ep_size > 1
        if self.use_ep:
            self.num_local_experts = divide(num_experts, self.pctx.ep_size, "n_routed_experts")
            self.first_expert = self.pctx.ep_rank * self.num_local_experts
            self.local_intermediate = intermediate_size
            self.inter_start = 0
        else:
            self.num_local_experts, self.first_expert = num_experts, 0
            self.local_intermediate = divide(intermediate_size, self.pctx.tp_size, "moe_intermediate_size")
            self.inter_start = self.pctx.tp_rank * self.local_intermediate
        e, i = self.num_local_experts, self.local_intermediate
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=params_dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=params_dtype),
                                      requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader

    def dummy_shards(self):
        """Per-expert checkpoint tensors, for this rank's experts only (others would be skipped)."""
        full_i, d = self.intermediate_size, self.hidden_size
        for expert in range(self.first_expert, self.first_expert + self.num_local_experts):
            yield self.w13_weight, (expert, "w1"), (full_i, d)
            yield self.w13_weight, (expert, "w3"), (full_i, d)
            yield self.w2_weight, (expert, "w2"), (d, full_i)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """Copy one checkpoint expert tensor into the stack. shard_id = (global expert, "w1"|"w3"|"w2");
        experts another EP rank holds are skipped on purpose."""
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')}: expert {expert} outside "
                             f"[0, {self.num_experts}) (n_routed_experts)")
        local = expert - self.first_expert
        if not 0 <= local < self.num_local_experts:
            return
        full_i, d = self.intermediate_size, self.hidden_size
        expected = (d, full_i) if part == "w2" else (full_i, d)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"tensor {getattr(param, 'param_name', '?')} expert {expert} {part}: checkpoint "
                             f"shape {tuple(loaded.shape)} does not match the model's {expected}")
        i, start = self.local_intermediate, self.inter_start
        if part == "w2":
            param.data[local].copy_(loaded.narrow(1, start, i))
        else:
            offset = 0 if part == "w1" else i
            param.data[local].narrow(0, offset, i).copy_(loaded.narrow(0, start, i))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                dp_num_tokens: Optional[list[int]] = None, *, shared_w13: Optional[torch.Tensor] = None,
                shared_w2: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`dp_num_tokens`: tokens of each DP rank this step (needed with DP attention + EP).
        `shared_w13` [2*Is, D] / `shared_w2` [D, Is]: shared experts computed in the same op and
        added to every token (one process only: a reduced sum would count them once per rank)."""
        if shared_w13 is not None or shared_w2 is not None:
            if self.pctx.tp_size != 1 or self.pctx.ep_size != 1:
                raise ValueError(f"shared experts fold into the routed experts only with tp_size 1 and "
                                 f"ep_size 1, got tp_size {self.pctx.tp_size}, ep_size {self.pctx.ep_size}")
            return ops.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids,
                                 shared_w13=shared_w13, shared_w2=shared_w2)
        if self.use_ep and self.pctx.moe_dp_exchange:
            return self._dp_exchange(x, topk_weights, topk_ids, dp_num_tokens)
        if self.use_ep:
            # global ids -> this rank's local ids; others fall outside [0, E_local) and add zero
            topk_ids = topk_ids - self.first_expert
        out = ops.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        if not self.reduce_results:
            return out
        return self.pctx.ep_all_reduce(out) if self.use_ep else self.pctx.tp_all_reduce(out)

    def _dp_exchange(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     dp_num_tokens: Optional[list[int]]) -> torch.Tensor:
        """Experts over the tokens of every DP rank (layers/moe_exchange.py); returns this
        rank's rows [T, D], reduced."""
        p = self.pctx

        def local_experts(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return ops.fused_moe(h, self.w13_weight, self.w2_weight, w, ids - self.first_expert)

        if p.all2all_backend == "alltoall":
            return moe_exchange.alltoall(p, x, topk_weights, topk_ids, self.num_local_experts, local_experts)
        if dp_num_tokens is None:
            raise ValueError("data-parallel attention with expert parallel needs dp_num_tokens "
                             "(the token count of every DP rank this step)")
        if len(dp_num_tokens) != p.dp_size or dp_num_tokens[p.dp_rank] != x.shape[0]:
            raise ValueError(f"dp_num_tokens {dp_num_tokens} does not match DP rank {p.dp_rank} "
                             f"of {p.dp_size} with {x.shape[0]} tokens")
        return moe_exchange.allgather_reducescatter(p, x, topk_weights, topk_ids, dp_num_tokens, local_experts)
