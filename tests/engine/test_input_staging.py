"""InputStaging (engine/input_staging.py): packed transfers whose views hold the arrays given,
each starting 16-byte aligned whatever the lengths before it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepserve.engine.input_staging import ALIGN_BYTES, InputStaging, aligned_offsets


@pytest.mark.parametrize("sizes", [(1, 3, 5, 7), (2, 6, 10, 18), (17, 17, 0, 2), (16, 32, 1, 1), (0, 1, 0, 3)])
def test_every_view_is_aligned_and_holds_its_array(sizes):
    rng = np.random.default_rng(sum(sizes))
    staging = InputStaging(torch.device("cpu"))
    for _ in range(3):     # both alternating buffers, and a reuse of the first
        i64 = [rng.integers(-2**40, 2**40, n) for n in sizes]
        i32 = [rng.integers(-2**31, 2**31 - 1, n + k) for k, n in enumerate(sizes[:3])]
        v64, v32 = staging.copy(i64, i32)
        for arrays, views, dtype in ((i64, v64, torch.int64), (i32, v32, torch.int32)):
            assert len(views) == len(arrays)
            for a, v in zip(arrays, views):
                assert v.dtype == dtype and v.shape == (len(a),) and v.is_contiguous()
                assert v.data_ptr() % ALIGN_BYTES == 0, (sizes, len(a))
                assert v.tolist() == a.tolist()


def test_aligned_offsets_pad_each_segment_to_16_bytes():
    assert aligned_offsets([3, 1, 4], 8) == ([0, 4, 6], 10)
    assert aligned_offsets([3, 1, 4], 4) == ([0, 4, 8], 12)
    assert aligned_offsets([0, 5], 4) == ([0, 0], 8)
    assert aligned_offsets([], 8) == ([], 0)
