"""Sort MoE assignments by expert into BLOCK_M-padded segments, without a host sync.

The grouped GEMM runs one program per BLOCK_M rows of one expert, so each expert's
(token, slot) assignments are laid out contiguously and padded up to a multiple of
BLOCK_M with a sentinel (= T*k, "no row"), as in vLLM's/SGLang's `moe_align_block_size`.
Every size here is an upper bound known on the host (T*k + E*(BLOCK_M-1) rows), so the
launch grid never depends on device values: blocks past the last expert's segment carry
expert id E and their programs exit at once. Assignments whose expert id lies outside
[0, E) (experts of another expert-parallel rank) are left out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass
class AlignedAssignments:
    sorted_ids: torch.Tensor      # [max_rows] int32: flat assignment index t*k+j, or T*k for padding
    block_expert: torch.Tensor    # [max_blocks] int32: expert of each BLOCK_M row block, E when unused
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedAssignments:
    flat = topk_ids.reshape(-1).to(torch.int64)                                     # [A]
    n_assign = flat.shape[0]
    device = flat.device
    expert = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)     # E = dropped
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))
    counts = counts[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)                                                   # [E]
    padded_start = padded_end - padded
    raw_start = counts.cumsum(0) - counts
    order = torch.argsort(expert, stable=True)                                      # [A]
    sorted_expert = expert[order]
    kept = sorted_expert < num_experts
    e_idx = sorted_expert.clamp(max=num_experts - 1)
    rank = torch.arange(n_assign, device=device) - raw_start[e_idx]
    max_blocks = triton.cdiv(n_assign, block_m) + num_experts
    max_rows = max_blocks * block_m
    dest = torch.where(kept, padded_start[e_idx] + rank, max_rows)                  # dropped -> spill slot
    sorted_ids = torch.full((max_rows + 1,), n_assign, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return AlignedAssignments(sorted_ids[:max_rows], block_expert, block_m)
