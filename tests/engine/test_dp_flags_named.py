"""The multi-node data-parallel checks name the flags a user typed (and the fields, for the
Python API): `-dp 2 --data-parallel-size-local 3` said only `data_parallel_size_local`."""
from __future__ import annotations

import pytest

from deepserve.config import EngineArgs


@pytest.mark.parametrize("kwargs, want", [
    (dict(data_parallel_size=2, data_parallel_size_local=3),
     r"--data-parallel-size-local \(data_parallel_size_local\) must be in \[1, --data-parallel-size 2\], got 3"),
    (dict(data_parallel_size=2, data_parallel_size_local=1, data_parallel_start_rank=2, headless=True,
          data_parallel_address="127.0.0.1"),
     r"--data-parallel-start-rank 2 \+ --data-parallel-size-local 1 exceeds --data-parallel-size 2"),
])
def test_dp_layout_errors_name_the_flags(kwargs, want):
    with pytest.raises(ValueError, match=want):
        EngineArgs(**kwargs)
