"""Token exchange of MoE layers between data-parallel ranks (DP attention + expert parallel).

With DP attention every DP rank runs attention on its own tokens, while the experts are
sharded over all TP x DP ranks (ep_rank = dp_rank * tp + tp_rank, E_local experts each). A
MoE layer must bring each token to the ranks holding its experts and the outputs back. Both
backends split the work the same way: the TP ranks of one DP rank hold the same tokens, so
TP rank t dispatches only to the experts held by TP rank t of every DP rank (that is, over
its DP group), and the partial outputs of a DP rank's TP ranks are summed by a TP
all-reduce at the end.

- `allgather_reducescatter` (vLLM's name for it): every DP rank's tokens and routing,
  padded to the largest DP batch, are all-gathered; each rank runs its local experts over
  all of them; the partial outputs are reduce-scattered back, each rank keeping its own
  rows. Shapes depend only on the padded width, so it can be captured in a CUDA graph
  (decode pads every DP rank to the same graph size).
- `alltoall`: each token goes only to the DP ranks holding one of its experts (once per
  rank, whatever the number of its experts there), through `all_to_all_single`, and the
  outputs come back the same way (the DeepEP pattern, over torch.distributed). It moves
  about top_k / dp of the all-gather's bytes when experts are spread, but the split sizes
  change every step (one host sync), so it runs eagerly.

Rows that belong to no expert of a rank carry expert id -1 and weight 0 and add zero.
"""
from __future__ import annotations

from typing import Callable

import torch

from deepserve.distributed.parallel_state import ParallelContext

# (hidden [N, D], weights [N, k], global expert ids [N, k]) -> this rank's expert sum [N, D]
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _pack_route(weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Weights and expert ids in one fp32 tensor [N, 2k] (ids exact in fp32 below 2^24)."""
    return torch.cat((weights.float(), ids.float()), dim=1)


def _unpack_route(route: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return route[:, :top_k].to(dtype), route[:, top_k:].long()


def allgather_reducescatter(pctx: ParallelContext, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                            dp_num_tokens: list[int], experts: ExpertFn) -> torch.Tensor:
    """This DP rank's MoE output [T, D]: gather all DP ranks' tokens, compute, reduce-scatter."""
    num_tokens, top_k = ids.shape
    width = max(dp_num_tokens)
    pad = width - num_tokens
    route = _pack_route(weights, ids)
    if pad:
        route = torch.cat((route, route.new_tensor([[0.0] * top_k + [-1.0] * top_k]).expand(pad, -1)))
        x = torch.cat((x, x.new_zeros(pad, x.shape[1])))
    all_x = pctx.dp_all_gather(x).flatten(0, 1)                                      # [dp*W, D]
    all_w, all_ids = _unpack_route(pctx.dp_all_gather(route).flatten(0, 1), top_k, weights.dtype)
    out = pctx.dp_reduce_scatter(experts(all_x, all_w, all_ids))                     # [W, D]
    return pctx.tp_all_reduce(out)[:num_tokens]


def alltoall(pctx: ParallelContext, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             num_local_experts: int, experts: ExpertFn) -> torch.Tensor:
    """This DP rank's MoE output [T, D]: send each token to the DP ranks holding its experts
    (among those of this TP rank's slot), compute there, send the outputs back and sum."""
    num_tokens, top_k = ids.shape
    owner = ids // num_local_experts                                                 # EP rank
    dest = torch.where(owner % pctx.tp_size == pctx.tp_rank, owner // pctx.tp_size, -1)  # DP rank
    ranks = torch.arange(pctx.dp_size, device=ids.device)
    sends = (dest[:, :, None] == ranks).any(dim=1)                                   # [T, dp]
    dst, token = sends.t().nonzero(as_tuple=True)          # rows ordered by destination rank
    send_counts = sends.sum(dim=0)
    recv_counts = torch.empty_like(send_counts)
    torch.distributed.all_to_all_single(recv_counts, send_counts, group=pctx.dp_group)
    send_split, recv_split = send_counts.tolist(), recv_counts.tolist()              # one host sync
    # each copy carries only the experts of its destination; the others become (-1, 0)
    keep = dest[token] == dst[:, None]
    route = _pack_route(torch.where(keep, weights[token], 0), torch.where(keep, ids[token], -1))
    recv_x = pctx.dp_all_to_all(x[token], send_split, recv_split)
    recv_w, recv_ids = _unpack_route(pctx.dp_all_to_all(route, send_split, recv_split), top_k, weights.dtype)
    out = experts(recv_x, recv_w, recv_ids) if recv_x.shape[0] else recv_x
    back = pctx.dp_all_to_all(out, recv_split, send_split)                           # [rows sent, D]
    result = torch.zeros_like(x).index_add_(0, token, back)
    return pctx.tp_all_reduce(result)
