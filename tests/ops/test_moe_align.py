"""align_by_expert (two Triton launches) against align_by_expert_reference (torch ops): the
same sorted ids (order within an expert included), block experts and padding, over expert
counts, block sizes, dropped ids (other expert-parallel ranks' experts) and slices split over
several programs and chunks."""
import pytest
import torch

from tests.ops.conftest import HAS_CUDA


def _ids(tokens: int, top_k: int, experts: int, seed: int, dropped: float = 0.0, dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]     # distinct experts per token
    if dropped:   # ids of experts this rank does not hold: below 0 or >= E
        drop = torch.rand(ids.shape, generator=gen) < dropped
        ids = torch.where(drop, torch.where(torch.rand(ids.shape, generator=gen) < 0.5, -1, experts + 3), ids)
    return ids.to(dtype)


def _check(moe_align, ids, experts, block_m):
    dev = "cuda" if HAS_CUDA else "cpu"
    got = moe_align.align_by_expert(ids.to(dev), experts, block_m)
    want = moe_align.align_by_expert_reference(ids.to(dev), experts, block_m)
    assert got.block_m == want.block_m
    assert torch.equal(got.block_expert, want.block_expert)
    assert torch.equal(got.sorted_ids, want.sorted_ids)
    return got


CASES = [  # tokens, top_k, experts, block_m, dropped share
    (0, 2, 4, 16, 0.0), (1, 2, 8, 16, 0.0), (7, 2, 8, 16, 0.0), (33, 6, 64, 16, 0.0), (50, 3, 8, 32, 0.3),
    (130, 8, 256, 64, 0.0), (200, 1, 1, 16, 0.0), (90, 4, 12, 16, 0.5),
]


@pytest.mark.parametrize("tokens,top_k,experts,block_m,dropped", CASES)
def test_align_equals_reference(triton_ops, tokens, top_k, experts, block_m, dropped):
    from deepserve.ops.triton import moe_align
    ids = _ids(tokens, top_k, experts, seed=tokens + experts, dropped=dropped, dtype=torch.int32)
    got = _check(moe_align, ids, experts, block_m)
    # the layout itself: every kept assignment once, in its expert's blocks, in index order
    flat = ids.reshape(-1).long()
    rows = got.sorted_ids.cpu().long()
    kept = rows < flat.numel()
    assert sorted(rows[kept].tolist()) == [i for i, e in enumerate(flat.tolist()) if 0 <= e < experts]
    blocks = got.block_expert.cpu().long().repeat_interleave(block_m)
    assert torch.equal(flat[rows[kept]], blocks[kept])


def test_several_programs_and_chunks(triton_ops, monkeypatch):
    """Small slices and chunks, so one call runs many programs and loops over chunks and blocks."""
    from deepserve.ops.triton import moe_align
    monkeypatch.setattr(moe_align, "MIN_SLICE", 40)
    monkeypatch.setattr(moe_align, "TILE", 256)
    for seed, (tokens, top_k, experts, block_m, dropped) in enumerate([(300, 2, 8, 16, 0.1), (97, 3, 16, 32, 0.0)]):
        _check(moe_align, _ids(tokens, top_k, experts, seed, dropped), experts, block_m)
    monkeypatch.setattr(moe_align, "MAX_PROGRAMS", 3)       # slices longer than a chunk
    _check(moe_align, _ids(300, 2, 8, 5), 8, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("tokens,top_k,experts", [(64, 6, 64), (1088, 6, 64), (16384, 8, 256)])
def test_align_equals_reference_gpu(triton_ops, tokens, top_k, experts):
    from deepserve.ops.triton import moe_align
    _check(moe_align, _ids(tokens, top_k, experts, seed=1), experts, 64)
