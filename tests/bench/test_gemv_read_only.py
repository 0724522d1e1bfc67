"""benchmarks/gemv_read_only.py under the interpreter: every read order folds exactly the words
it must (the check the GPU run makes before timing a tile), and a fold that skips words fails it."""
from __future__ import annotations

import pytest
import torch

from conftest import benchmark_module

reads = benchmark_module("gemv_read_only")


@pytest.mark.parametrize("tile", reads.TILES, ids=lambda t: "x".join(map(str, t)))
def test_read_only_orders_fold_every_word(tile):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreted run is for CPU-only hosts")
    n, kw = 3 * tile[0] + tile[0] // 2, 40       # a last program with fewer rows; words past SUB_C
    words = torch.randint(-2 ** 31, 2 ** 31, (n, kw), generator=torch.Generator().manual_seed(n), dtype=torch.int64)
    words = words.to(torch.int32)
    row_folds = torch.zeros(n, dtype=torch.int64)
    for column in words.unbind(1):
        row_folds ^= column.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(n, dtype=torch.int32)
    reads.read_words(words, out, tile)
    expect = reads.expected_fold(row_folds, tile)
    assert len(expect) == (n if tile[4] != 2 else 4)
    assert torch.equal(out[:len(expect)].to(torch.int64) & 0xFFFFFFFF, expect)
    short = words.clone()
    short[-1, -1] ^= 1                            # one bit of the last word: the fold must see it
    reads.read_words(short, out, tile)
    assert not torch.equal(out[:len(expect)].to(torch.int64) & 0xFFFFFFFF, expect)


def test_tiled_gemv_cells_check_against_the_plain_gemv():
    """The tiled GEMV columns: each setting's tiled words give the plain GEMV's output (ok on a
    CPU host, where nothing is timed)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreted run is for CPU-only hosts")
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-2 ** 31, 2 ** 31, (12, 32), generator=gen, dtype=torch.int64).to(torch.int32)
    s = torch.full((12, 2), 0.01, dtype=torch.bfloat16)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    assert reads.tiled_cells(x, [(q, s)], q.numel() * 4, float("nan"), "cpu") == ["ok"] * 2 * len(reads.TILED_SETTINGS)


def test_half2_gemv_cells_check_against_the_table_setting():
    """The packed fp16 GEMV columns (DEQ 3, 4 words a thread) give the table's GEMV output within
    bf16 rounding (ok on a CPU host, where nothing is timed)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the interpreted run is for CPU-only hosts")
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-2 ** 31, 2 ** 31, (12, 32), generator=gen, dtype=torch.int64).to(torch.int32)
    s = torch.full((12, 2), 0.01, dtype=torch.bfloat16)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    assert reads.half2_cells(x, [(q, s)], q.numel() * 4, float("nan"), "cpu") == ["ok"] * len(reads.HALF2_SETTINGS)
