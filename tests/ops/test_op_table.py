"""The op table a model runner resolves once from --ops: each op's function under the backend
(the torch reference where the backend has none), no counting on production calls, counting
inside `counting()` or everywhere with DEEPSERVE_OPS_COUNT=1, and --ops triton-all forcing the
per-shape ops onto their Triton kernels."""
from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch

from deepserve.ops import registry
from deepserve.ops.registry import OpTable, bind, resolve


def test_a_table_holds_the_registered_functions_themselves():
    table = OpTable("torch", count=False)
    for op in registry.op_backends():
        assert getattr(table, op) is resolve(op, "torch")[1] and table.runs[op] == "torch"
    x, w = torch.randn(2, 8), torch.ones(8)
    table.rms_norm(x, w, 1e-6)
    assert not table.counts                                        # production calls count nothing


def test_counting_counts_inside_the_block_only():
    table = OpTable("torch", count=False)
    x, w = torch.randn(2, 8), torch.ones(8)
    with table.counting() as counts:
        for _ in range(3):
            out = table.rms_norm(x, w, 1e-6)
        table.silu_and_mul(torch.randn(2, 8))
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert counts == {("rms_norm", "torch"): 3, ("silu_and_mul", "torch"): 1} and counts is table.counts
    table.rms_norm(x, w, 1e-6)
    assert table.counts[("rms_norm", "torch")] == 3 and table.rms_norm is resolve("rms_norm", "torch")[1]
    assert table.call_totals() == {"op_calls": 4, "triton_op_calls": 0} and table.triton_share() == 0.0


def test_debug_env_counts_every_call(monkeypatch):
    monkeypatch.setenv("DEEPSERVE_OPS_COUNT", "1")
    table = OpTable("torch")
    table.silu_and_mul(torch.randn(2, 8))
    with table.counting():
        table.silu_and_mul(torch.randn(2, 8))
    table.silu_and_mul(torch.randn(2, 8))
    assert table.counts == {("silu_and_mul", "torch"): 3}
    monkeypatch.setenv("DEEPSERVE_OPS_COUNT", "0")
    assert not OpTable("torch").always_counting


def test_an_op_cannot_shadow_the_table():
    for name in ("counts", "counting", "_fns"):
        with pytest.raises(ValueError, match=f"op name '{name}' is taken by the op table itself"):
            registry.register(name, "torch")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"ops backend must be one of \('torch', 'triton', 'flaggems'.*got 'cuda'"):
        OpTable("cuda")


def test_triton_tables(triton_ops):
    plain, forced = OpTable("triton", count=False), OpTable("triton-all", count=False)
    assert (plain.backend, plain.force_triton, forced.backend, forced.force_triton) == ("triton", False, "triton", True)
    assert plain.linear is resolve("linear", "triton")[1]
    assert forced.linear.func is plain.linear and forced.linear.keywords == {"force_triton": True}
    assert forced.linear_pair.keywords == {"force_triton": True}
    assert forced.rms_norm is plain.rms_norm                        # one kernel at every shape: nothing to force
    with forced.counting():
        forced.rms_norm(torch.randn(2, 32), torch.ones(32), 1e-6)
    assert forced.call_totals() == {"op_calls": 1, "triton_op_calls": 1} and forced.triton_share() == 1.0


def test_a_platform_backend_takes_its_own_kernels_and_the_reference_elsewhere(monkeypatch):
    monkeypatch.setattr(registry, "_impls", collections.defaultdict(dict, {k: dict(v) for k, v in registry._impls.items()}))
    monkeypatch.setattr(registry, "_plugin_backends", set(registry._plugin_backends))
    registry.add_backend("fakechip")
    doubled = registry.register("silu_and_mul", "fakechip")(lambda x: 2 * resolve("silu_and_mul", "torch")[1](x))
    table = OpTable("fakechip", count=False)
    assert table.silu_and_mul is doubled and table.runs["silu_and_mul"] == "fakechip"
    assert table.rms_norm is resolve("rms_norm", "torch")[1] and table.runs["rms_norm"] == "torch"


def test_bind_gives_every_module_the_table():
    from deepserve.layers.norm import RMSNorm
    from deepserve.ops import REFERENCE_OPS
    model = torch.nn.Sequential(RMSNorm(8), torch.nn.Sequential(RMSNorm(8)))
    assert model[0].ops is REFERENCE_OPS                            # outside a model runner: the reference
    table = OpTable("torch", count=True)
    bind(model, table)
    assert all(m.ops is table for m in model.modules())
    model[1][0](torch.randn(2, 8))
    assert table.counts == {("rms_norm", "torch"): 1} and not REFERENCE_OPS.counts


def test_resolve_imports_the_kernels_it_is_asked_for():
    """resolve(op, "triton") in a process that imported no Triton module gives the kernel, not
    the torch reference: a GPU test run alone (`pytest -m gpu -k ...` deselects the tests whose
    fixture imports the kernels) otherwise compared the torch op with itself. Without Triton
    (its import refused here) the torch reference, as before. In a process of its own: this one
    imported the kernels long ago."""
    script = """
import sys
from deepserve.ops.registry import resolve
ASKED = [("paged_attention", "triton"), ("rms_norm", "flaggems"), ("rms_norm", "torch")]
sys.modules["triton"] = None
print([resolve(op, b)[0] for op, b in ASKED])
del sys.modules["triton"]
print([resolve(op, b)[0] for op, b in ASKED])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=str(registry.__file__).rsplit("/deepserve/", 1)[0])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-3:] == ["['torch', 'torch', 'torch']", "['triton', 'triton', 'torch']", ""], \
        out.stdout


@pytest.mark.gpu
def test_flaggems_leaves_seeded_draws_to_torch():
    """Under --ops flaggems a seeded draw gives torch's values (dummy weights and per-request
    seeds follow their generators as on every other backend); FlagGems' own random ops ignore the
    generator passed in, so enabling them changed every dummy weight. In a process of its own:
    FlagGems patches aten for the whole process."""
    pytest.importorskip("flag_gems")
    script = """
import torch
from deepserve.ops import registry

def draw():
    gen = torch.Generator(device="cuda").manual_seed(123)
    return (torch.randn(4096, generator=gen, device="cuda"),
            torch.empty(4096, device="cuda").uniform_(generator=gen),
            torch.empty(4096, device="cuda").exponential_(generator=gen))

before = draw()
registry._load_backend("flaggems")
print([torch.equal(a, b) for a, b in zip(before, draw())])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[True, True, True]", out.stdout


def test_flaggems_runs_the_triton_kernels_and_replays_graphs(triton_ops):
    """--ops flaggems is deepserve's Triton kernels with FlagGems beneath them (as vLLM with
    FlagGems): every op resolves as under triton, and its models are captured as CUDA graphs."""
    for op in registry.op_backends():
        assert resolve(op, "flaggems") == resolve(op, "triton"), op
    assert registry.replays_graphs("flaggems") and registry.replays_graphs("triton")
    assert not registry.replays_graphs("torch")


@pytest.mark.gpu
def test_flaggems_decodes_with_graphs_as_triton_does():
    """On the GPU with flag_gems installed: the demo model's greedy text under --ops flaggems, its
    decode replaying CUDA graphs, equals --ops triton's. In a process of its own (FlagGems patches
    aten for the whole process). On a cold machine about 3 minutes (FlagGems compiles its kernels)."""
    pytest.importorskip("flag_gems")
    script = """
from deepserve import LLM, SamplingParams
DEMO_MODEL = "deepserve/assets/stories260k"
greedy = SamplingParams(temperature=0, max_tokens=48)
texts = {}
for ops in ("triton", "flaggems"):
    # few step sizes: FlagGems autotunes its kernels cold for each one (minutes on a fresh machine)
    llm = LLM(str(DEMO_MODEL), ops=ops, cuda_graph_sizes=[1, 2], max_num_seqs=2, max_model_len=128,
              max_num_batched_tokens=64)
    assert llm.engine.runner.graphs.enabled, ops
    texts[ops] = [o.outputs[0].text for o in llm.generate(["Once upon a time", "The little dog"], greedy)]
    llm.shutdown()
print(texts["triton"] == texts["flaggems"], texts["flaggems"][0][:40])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=str(registry.__file__).rsplit("/deepserve/", 1)[0])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("True"), out.stdout
