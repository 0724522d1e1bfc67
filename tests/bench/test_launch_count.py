"""benchmarks/launch_count.py: what it counts as a launch (aten ops but views / metadata /
allocations, one per Triton launch, none for the ops the interpreter runs inside a launch) and
to which layer and module of a model it charges each."""
from __future__ import annotations

from collections import Counter

import torch

from deepserve.ops import OpTable
from tests.bench.conftest import benchmark_module

lc = benchmark_module("launch_count")


def test_counts_kernels_not_views_or_allocations():
    counter = lc.LaunchCounter()
    x = torch.randn(8, 16)
    w = torch.ones(16)
    triton_ops = OpTable("triton")
    with counter.active():
        y = x.view(4, 32).reshape(8, 16).t().contiguous()   # views, then one copy (clone)
        torch.empty_like(y)
        torch.mm(x, y)
        with counter.scope(3, "norm"):
            triton_ops.rms_norm(x, w, 1e-6)                 # one interpreted launch
    assert counter.counts == Counter({(None, "other", "aten.clone"): 1, (None, "other", "aten.mm"): 1,
                                      (3, "norm", "triton._rms_norm_kernel"): 1})
    # the launch ran: the interpreter's own aten ops were there to skip
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(triton_ops.rms_norm(x, w, 1e-6), ref)


def test_step_counts_by_layer_and_module():
    block = 4
    model = lc.build_model(2, "torch", torch.float32, torch.float32, num_blocks=12, block_size=block)
    counter = lc.LaunchCounter()
    lc.label_model(model, counter)
    counts, syncs = lc.count_step(model, counter, [1, 1, 6], [5, 3, 9], block, blocks_per_seq=4)
    layers = lc.per_layer(counts)
    assert set(layers) == {None, 0, 1}
    assert set(layers[0]) == {"norm", "attn.project", "attn.attend", "attn.o_proj", "mlp"}   # the dense layer
    assert {"moe.router", "moe.experts", "moe.sum", "attn.attend"} <= set(layers[1])
    # q_proj and kv_a_proj_with_mqa (the torch linear_pair: two GEMMs), o_proj one GEMM; the
    # dense MLP's launches are its GEMMs and SiLU-and-mul
    assert layers[1]["attn.project"] == 2 and layers[1]["attn.o_proj"] == 1
    assert layers[0]["mlp"] == sum(n for (lay, lab, name), n in counts.items()
                                   if lay == 0 and lab == "mlp" and name in ("aten.mm", "aten.silu", "aten.mul"))
    assert sum(sum(v.values()) for v in layers.values()) == sum(counts.values())
    assert syncs == 0
