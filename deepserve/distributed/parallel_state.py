"""The explicit parallel context every parallel-aware layer is built with.

Layers never read globals for their rank: they are given a `ParallelContext`. With one
process (`single_process()`) every collective is the identity, so the same model code
runs TP=1 on a CPU and TP=8 x EP on GPUs (DESIGN invariant 5).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


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

    def __post_init__(self):
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside [0, {self.tp_size})")
        if not 0 <= self.ep_rank < self.ep_size:
            raise ValueError(f"ep_rank {self.ep_rank} outside [0, {self.ep_size})")

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
