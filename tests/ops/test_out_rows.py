"""`out=` of paged_attention and mla_v_up (torch and Triton): the op writes its rows into the
given slice of a larger buffer (a mixed step's decode rows and prompt rows into one output,
with no join after) and returns it; values as without `out`; a slice that does not fit is an
error naming both shapes."""
from __future__ import annotations

import pytest
import torch

from deepserve.ops.registry import resolve
from tests.ops.paged_batch import make_paged_batch


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_ops")
        request.getfixturevalue("cpu_only")
    return request.param


def test_paged_attention_writes_into_out(backend):
    attention = resolve("paged_attention", backend)[1]
    # a decode-only and a prefill batch (the two kernels of the Triton op)
    for q_lens, seq_lens in (([1, 1], [9, 20]), ([5, 3], [5, 11])):
        batch = make_paged_batch(q_lens, seq_lens, num_heads=4, num_kv_heads=2, head_dim=32, block_size=4)
        want = attention(*batch.args(0.2))
        buf = torch.full((3 + want.shape[0], *want.shape[1:]), float("nan"))
        got = attention(*batch.args(0.2), out=buf[3:])
        assert got.data_ptr() == buf[3:].data_ptr()
        torch.testing.assert_close(buf[3:], want, rtol=0, atol=0)
        assert buf[:3].isnan().all()
        with pytest.raises(ValueError, match=r"out \(4, 4, 32\)"):
            attention(*batch.args(0.2), out=buf[:4])


def test_mla_v_up_writes_into_out(backend):
    v_up = resolve("mla_v_up", backend)[1]
    g = torch.Generator().manual_seed(0)
    lat, w_uv = torch.randn(5, 4, 32, generator=g), torch.randn(4, 16, 32, generator=g)
    want = v_up(lat, w_uv)
    buf = torch.full((7, 4, 16), float("nan"))
    assert v_up(lat, w_uv, out=buf[:5]).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[:5], want, rtol=0, atol=0)
    assert buf[5:].isnan().all()
    with pytest.raises(ValueError, match="does not fit"):
        v_up(lat, w_uv, out=buf[:5].transpose(1, 2))
