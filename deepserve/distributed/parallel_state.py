"""The explicit parallel context every parallel-aware layer is built with.

Layers never read globals for their rank: they are given a `ParallelContext`. With one
process (`single_process()`) every collective is the identity, so the same model code
runs TP=1 on a CPU and TP=8 x EP on GPUs (DESIGN invariant 5).

Data parallel (DP) attention, as vLLM's for MLA models: each DP rank (a TP group of its
own) serves its own requests with its own KV pool; attention and dense MLPs run on its own
tokens. With expert parallel the experts are sharded over all TP x DP ranks (ep_size =
tp * dp, ep_rank = dp_rank * tp + tp_rank) and MoE layers exchange tokens over the DP group
(layers/moe.py). Without expert parallel a DP rank is a full replica: plain DP.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


logger = logging.getLogger(__name__)

# torch >= 2.12 names these *_single (the *_tensor names are deprecated there); the GPU
# image's torch 2.11 has only the old names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Optional[dist.ProcessGroup] = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Optional[dist.ProcessGroup] = None
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: Optional[dist.ProcessGroup] = None   # the ranks with this tp_rank in every DP rank
    all2all_backend: str = "allgather_reducescatter"  # MoE token exchange between DP ranks

    def __post_init__(self):
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} outside [0, {self.ep_size})")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} outside [0, {self.dp_size})")

    @property
    def moe_dp_exchange(self) -> bool:
        """MoE layers gather the tokens of every DP rank (experts sharded over TP x DP)."""
        return self.dp_size > 1 and self.ep_size > self.tp_size

    # ---- collectives over the tensor-parallel group
    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        dist.all_reduce(x, group=self.tp_group)
        return x

    def tp_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate each rank's `x` along `dim` (rank order)."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=dim)

    def dp_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Stack every DP rank's equally shaped `x`: [dp_size, *x.shape] (DP rank order)."""
        if self.dp_size == 1:
            return x[None]
        out = torch.empty((self.dp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous(), group=self.dp_group)
        return out.view(self.dp_size, *x.shape)

    def dp_token_counts(self, num_tokens: int, device: torch.device) -> list[int]:
        """Every DP rank's token count this step (for callers that were not given them)."""
        count = torch.tensor([num_tokens], dtype=torch.int64, device=device)
        return self.dp_all_gather(count).flatten().tolist()

    def dp_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` [dp_size * W, ...] over the DP group and keep this DP rank's W rows."""
        if self.dp_size == 1:
            return x
        out = torch.empty((x.shape[0] // self.dp_size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, x.contiguous(), group=self.dp_group)
        return out

    def dp_all_to_all(self, x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Rows x[sum(send_counts[:r]) : ...+send_counts[r]] go to DP rank r; returns the rows
        received, in DP rank order."""
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.dp_group)
        return out

    def ep_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.ep_size == 1:
            return x
        dist.all_reduce(x, group=self.ep_group)
        return x


def single_process() -> ParallelContext:
    return ParallelContext()


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what} = {n} is not divisible by the parallel size {d}")
    return n // d


def rank_layout(rank: int, tp_size: int, pp_size: int) -> tuple[int, int, int]:
    """(dp_rank, pp_rank, tp_rank) of a global rank: rank = dp_rank*(tp*pp) + pp_rank*tp + tp_rank,
    so a DP rank's TP x PP ranks are contiguous (and on one node when tp*pp <= GPUs per node)."""
    dp_rank, rest = divmod(rank, tp_size * pp_size)
    pp_rank, tp_rank = divmod(rest, tp_size)
    return dp_rank, pp_rank, tp_rank


def init_distributed(rank: int, world_size: int, tp_size: int, pp_size: int, backend: str,
                     init_method: str, timeout_s: float, expert_parallel: bool = False,
                     local_rank: int = 0, dp_size: int = 1,
                     all2all_backend: str = "allgather_reducescatter") -> ParallelContext:
    """Join the process group and build this rank's context.

    Rank layout: see `rank_layout`. Every rank creates every group (in the same order, as
    torch.distributed requires). `timeout_s` bounds every collective, so a dead or stuck
    peer turns into an error instead of a silent hang. Expert parallel spans the TP group,
    or with dp_size > 1 all TP x DP ranks of the pipeline stage."""
    import datetime

    if world_size != tp_size * pp_size * dp_size:
        raise ValueError(f"world size {world_size} != tensor_parallel_size {tp_size} x "
                         f"pipeline_parallel_size {pp_size} x data_parallel_size {dp_size}")
    if backend == "nccl":
        # NCCL binds communicators to the current device: one GPU per local rank
        import torch
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistNetworkError as exc:   # the store's host never answered: a one-line error
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"rank {rank} could not join the process group at {init_method} within "
                         f"{timeout_s:.0f} s (DEEPSERVE_DIST_TIMEOUT): {reason}") from None
    dp_rank, pp_rank, tp_rank = rank_layout(rank, tp_size, pp_size)
    span = tp_size * pp_size
    tp_group = None
    for d in range(dp_size):
        for stage in range(pp_size):
            base = d * span + stage * tp_size
            group = dist.new_group(list(range(base, base + tp_size)))
            if (d, stage) == (dp_rank, pp_rank):
                tp_group = group
    control_group()  # created now, in the same order on every rank
    dp_group = ep_group = None
    if dp_size > 1:
        for stage in range(pp_size):
            for t in range(tp_size):
                group = dist.new_group([d * span + stage * tp_size + t for d in range(dp_size)])
                if (stage, t) == (pp_rank, tp_rank):
                    dp_group = group
        if expert_parallel:
            for stage in range(pp_size):
                group = dist.new_group([d * span + stage * tp_size + t
                                        for d in range(dp_size) for t in range(tp_size)])
                if stage == pp_rank:
                    ep_group = group
    if not expert_parallel:
        ep = {}
    elif dp_size > 1:
        ep = dict(ep_rank=dp_rank * tp_size + tp_rank, ep_size=dp_size * tp_size, ep_group=ep_group)
    else:
        ep = dict(ep_rank=tp_rank, ep_size=tp_size, ep_group=tp_group)
    return ParallelContext(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group,
                           pp_rank=pp_rank, pp_size=pp_size, dp_rank=dp_rank, dp_size=dp_size,
                           dp_group=dp_group, all2all_backend=all2all_backend, **ep)


_control = {"group": None}


def control_group():
    """A gloo group over all ranks for host-side messages (step inputs, agreements)."""
    if _control["group"] is None and dist.is_initialized():
        _control["group"] = (dist.group.WORLD if dist.get_backend() == "gloo"
                             else dist.new_group(backend="gloo"))
    return _control["group"]


def destroy_distributed(timeout_s: float = 20.0) -> bool:
    """Tear the process groups down; True when done. NCCL's teardown can block for good when a
    peer is gone or still busy, so on GPU it runs in a daemon thread with a bound: past it the
    communicators are left to process exit (logged), and the caller goes on shutting down."""
    _control["group"] = None
    if not dist.is_initialized():
        return True
    if dist.get_backend() == "gloo":
        dist.destroy_process_group()
        return True
    worker = threading.Thread(target=dist.destroy_process_group, daemon=True, name="deepserve-dist-teardown")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        logger.warning("process-group teardown did not finish in %.0f s; leaving it to process exit", timeout_s)
        return False
    return True
