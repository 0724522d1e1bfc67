"""Sort MoE assignments by expert into BLOCK_M-padded segments, without a host sync.

The grouped GEMM runs one program per BLOCK_M rows of one expert, so each expert's
(token, slot) assignments are laid out contiguously and padded up to a multiple of
BLOCK_M with a sentinel (= T*k, "no row"), as in vLLM's/SGLang's `moe_align_block_size`.
Every size here is an upper bound known on the host (T*k + E*(BLOCK_M-1) rows), so the
launch grid never depends on device values: blocks past the last expert's segment carry
expert id E and their programs exit at once. Assignments whose expert id lies outside
[0, E) (experts of another expert-parallel rank) are left out. Within an expert the
assignments keep their order (t*k+j ascending).

`align_by_expert` runs as two launches over P programs, each owning a contiguous slice of
the assignments: the first counts its slice's assignments per expert; the second sums those
counts (all slices: each expert's size and padded offset; the slices before its own: where
its assignments start within each expert), scatters its slice (a per-expert running rank,
one chunk of assignments at a time) and writes its share of the blocks' experts and the
padding rows. `align_by_expert_reference` is the same in torch ops (about twenty small
launches, the host's cost per MoE layer before), the oracle of tests/ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deepserve.ops.triton._common import cdiv, next_pow2

MAX_PROGRAMS = 128      # slices of the assignments (the second launch reads P x E counts in each program)
MIN_SLICE = 256         # fewest assignments a slice takes: small batches run one or two programs
TILE = 8192             # elements of a [chunk, experts] one-hot tile


@dataclass
class AlignedAssignments:
    sorted_ids: torch.Tensor      # [max_rows] int32: flat assignment index t*k+j, or T*k for padding
    block_expert: torch.Tensor    # [max_blocks] int32: expert of each BLOCK_M row block, E when unused
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def align_by_expert_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedAssignments:
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
    max_blocks = cdiv(n_assign, block_m) + num_experts
    max_rows = max_blocks * block_m
    dest = torch.where(kept, padded_start[e_idx] + rank, max_rows)                  # dropped -> spill slot
    sorted_ids = torch.full((max_rows + 1,), n_assign, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(max_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_starts, right=True).to(torch.int32)
    return AlignedAssignments(sorted_ids[:max_rows], block_expert, block_m)


# the batch-dependent ints are not specialized (Triton's 1 / multiple-of-16 classes): each
# combination of their classes would compile anew inside a request (engine/warm_up.py)
@triton.jit(do_not_specialize=["n_assign", "slice_len"])
def _count_kernel(ids_ptr, cnt_ptr, n_assign, n_experts, slice_len,
                  E_BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """cnt[p, e] = assignments to expert e in slice p (ids outside [0, E) match no column)."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_BLOCK)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([E_BLOCK], dtype=tl.int32)
    for off in range(0, slice_len, CHUNK):
        idx = pid * slice_len + off + lanes
        e = tl.load(ids_ptr + idx, mask=(idx < n_assign) & (off + lanes < slice_len), other=-1)
        counts += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(cnt_ptr + pid * n_experts + experts, counts, mask=experts < n_experts)


@triton.jit(do_not_specialize=["n_assign", "slice_len", "n_programs", "max_blocks", "blocks_per_program"])
def _scatter_kernel(ids_ptr, cnt_ptr, sorted_ptr, block_expert_ptr, n_assign, n_experts, slice_len,
                    n_programs, max_blocks, blocks_per_program,
                    E_BLOCK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, B_CHUNK: tl.constexpr):
    """Slice p's assignments to their rows of sorted_ids, and blocks p*blocks_per_program.. :
    their expert (E past the last segment) and the sentinel n_assign in their padding rows."""
    pid = tl.program_id(0)
    experts = tl.arange(0, E_BLOCK)
    e_ok = experts < n_experts
    total = tl.zeros([E_BLOCK], dtype=tl.int32)
    before = tl.zeros([E_BLOCK], dtype=tl.int32)          # this expert's assignments in earlier slices
    for p in range(0, n_programs):
        c = tl.load(cnt_ptr + p * n_experts + experts, mask=e_ok, other=0)
        total += c
        before += tl.where(p < pid, c, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    # the slice, one chunk at a time: an assignment's row is its expert's next free one
    next_row = padded_start + before
    lanes = tl.arange(0, CHUNK)
    for off in range(0, slice_len, CHUNK):
        idx = pid * slice_len + off + lanes
        e = tl.load(ids_ptr + idx, mask=(idx < n_assign) & (off + lanes < slice_len), other=-1)
        hot = ((e[:, None] == experts[None, :]) & e_ok[None, :]).to(tl.int32)     # [CHUNK, E]
        rank = tl.cumsum(hot, axis=0) - hot                  # same-expert assignments before, in the chunk
        row = tl.sum(hot * (next_row[None, :] + rank), axis=1)
        tl.store(sorted_ptr + row, idx.to(tl.int32), mask=tl.sum(hot, axis=1) > 0)
        next_row += tl.sum(hot, axis=0)
    # the blocks: expert = segments ending at or before the block's first row; rows past the
    # expert's assignments are padding
    filled_end = padded_start + total
    b_lanes = tl.arange(0, B_CHUNK)
    cols = tl.arange(0, BLOCK_M)
    for bb in range(0, blocks_per_program, B_CHUNK):
        b = pid * blocks_per_program + bb + b_lanes
        b_ok = (b < max_blocks) & (bb + b_lanes < blocks_per_program)
        first_row = b * BLOCK_M
        expert = tl.sum(((padded_end[None, :] <= first_row[:, None]) & e_ok[None, :]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, expert, mask=b_ok)
        end = tl.sum(tl.where(experts[None, :] == expert[:, None], filled_end[None, :], 0), axis=1)
        rows = first_row[:, None] + cols[None, :]
        pad = b_ok[:, None] & (rows >= end[:, None])
        tl.store(sorted_ptr + rows, tl.full([B_CHUNK, BLOCK_M], 0, tl.int32) + n_assign, mask=pad)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedAssignments:
    """`align_by_expert_reference`'s output in two launches (the module docstring)."""
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    n_assign = ids.shape[0]
    max_blocks = cdiv(n_assign, block_m) + num_experts
    programs = max(1, min(MAX_PROGRAMS, cdiv(n_assign, MIN_SLICE)))
    slice_len = max(cdiv(n_assign, programs), 1)
    e_block = next_pow2(num_experts)
    chunk = max(16, min(256, TILE // e_block))
    dev = ids.device
    counts = torch.empty(programs, num_experts, dtype=torch.int32, device=dev)
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    _count_kernel[(programs,)](ids, counts, n_assign, num_experts, slice_len, E_BLOCK=e_block, CHUNK=chunk)
    _scatter_kernel[(programs,)](ids, counts, sorted_ids, block_expert, n_assign, num_experts, slice_len,
                                 programs, max_blocks, cdiv(max_blocks, programs), E_BLOCK=e_block,
                                 CHUNK=chunk, BLOCK_M=block_m, B_CHUNK=max(1, min(64, 2048 // block_m)))
    return AlignedAssignments(sorted_ids, block_expert, block_m)
