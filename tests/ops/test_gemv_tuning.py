"""Single-row projections: the torch.mv path equals F.linear, and the start-up tuner picks a
variant per weight shape on a GPU (layers/gemv_tuning.py)."""
import pytest
import torch
import torch.nn.functional as F

from deepserve.layers.gemv_tuning import tune_single_row_linears
from deepserve.layers.linear import ColumnParallelLinear


@pytest.mark.parametrize("bias", [False, True])
def test_mv_path_matches_linear(bias):
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, [48, 16], bias=bias)
    layer.weight.data.normal_()
    if bias:
        layer.bias.data.normal_()
    x = torch.randn(1, 64)
    want = F.linear(x, layer.weight, layer.bias if bias else None)
    layer.single_row_mv = True
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # more than one row never takes the mv path
    x3 = torch.randn(3, 64)
    torch.testing.assert_close(layer(x3), F.linear(x3, layer.weight, layer.bias if bias else None))


def test_tuner_leaves_cpu_layers_alone():
    layer = ColumnParallelLinear(32, 32)
    assert tune_single_row_linears(layer) == {}
    assert not getattr(layer, "single_row_mv", False)


@pytest.mark.gpu
def test_tuner_on_gpu_picks_a_variant_and_keeps_the_numbers():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with torch.device("cuda"):
        layer = ColumnParallelLinear(4096, 4096, params_dtype=torch.bfloat16)
    layer.weight.data.normal_(0, 0.02)
    timings = tune_single_row_linears(layer)
    assert list(timings) == [((4096, 4096), torch.bfloat16)] and all(t > 0 for t in timings[list(timings)[0]])
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight).float(), rtol=2e-2, atol=2e-2)
