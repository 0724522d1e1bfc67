"""The host work of the Triton wrappers an eager MLA layer calls in a mixed step (the six calls
of benchmarks/host_wrappers.py, which times them), counted with their launches skipped:

- launch settings come from the tables once a shape: a second round of calls looks nothing up
  and launches with the same settings; settings tried (`launch_config.trying`) still reach the
  launches, and the cached ones come back after;
- no call reads TRITON_INTERPRET from the environment (triton.jit chose at import);
- a linear of several rows (cuBLAS's too) reads the GEMM table once a shape, the decode over
  an e4m3 latent pool its table once a step;
- a CUDA device's table key is built once per device properties, DEEPSERVE_PDL still read at
  every launch (tests/engine/test_pdl.py sets it between two engines of one process);
- rotary_embedding of q alone makes no view for the missing keys, nor the prompt rows' attention
  one of k_pe for every head (no aten op in either: the strides a view would have are passed)."""
from __future__ import annotations

import collections
import os
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import KernelInterface

from deepserve.ops.triton import _common, launch_config as lc
from tests.bench.conftest import benchmark_module

host_wrappers = benchmark_module("host_wrappers")
H100 = SimpleNamespace(major=9, minor=0, multi_processor_count=132, total_memory=79 * 2**30)


@pytest.fixture
def launches(monkeypatch) -> list:
    """Every Triton launch skipped; (kernel, grid, launch keywords, arguments) of each in the list."""
    made = []

    def getitem(kernel, grid):
        return lambda *args, **kwargs: made.append((kernel.fn.__name__, grid, kwargs, args))
    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return made


@pytest.fixture
def fresh_tables():
    """Nothing read from the launch tables before the test (nor kept after it)."""
    lc.tables_changed()
    yield
    lc.tables_changed()


@pytest.fixture
def calls(fresh_tables):
    return host_wrappers.calls(heads=16, decodes=8, prompt_len=5)


class Environ(dict):
    """os.environ's contents, reads counted by name."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads = collections.Counter()

    def get(self, key, default=None):
        self.reads[key] += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads[key] += 1
        return super().__getitem__(key)


def test_settings_are_looked_up_once_a_shape_and_no_call_reads_the_environment(calls, launches, monkeypatch):
    lookups, lookup = collections.Counter(), lc.lookup

    def counted(op, device, **shape):
        lookups[op] += 1
        return lookup(op, device, **shape)
    monkeypatch.setattr(lc, "lookup", counted)
    env = Environ(os.environ)
    monkeypatch.setattr(os, "environ", env)
    rounds = []
    for _ in range(2):
        lookups.clear()
        launches.clear()
        for call in calls.values():
            call()
        rounds.append((dict(lookups), list(launches)))
    (first, launched), (second, relaunched) = rounds
    assert first == {"mla_prep": 3, "attention_decode": 1, "attention_prefill": 1}
    assert second == {}
    assert [launch[0] for launch in launched] == ["_kv_write_kernel", "_q_absorb_kernel", "_decode_split_kernel",
                                                 "_decode_reduce_kernel", "_v_up_kernel", "_rotary_kernel",
                                                 "_prefill_kernel"]
    assert [launch[:3] for launch in relaunched] == [launch[:3] for launch in launched]
    assert env.reads["TRITON_INTERPRET"] == 0


def test_a_linear_of_several_rows_reads_the_gemm_table_once_a_shape(fresh_tables, monkeypatch):
    """(the kv_b_proj expansion of each layer's prompt rows: cuBLAS where the table says so)"""
    from deepserve.ops.triton.gemv import linear
    lookups, lookup = collections.Counter(), lc.lookup

    def counted(op, device, **shape):
        lookups[op, shape["m"]] += 1
        return lookup(op, device, **shape)
    monkeypatch.setattr(lc, "lookup", counted)
    w = torch.randn(24, 16)
    outs = [linear(torch.randn(m, 16), w) for m in (5, 5, 7, 5)]
    assert [o.shape for o in outs] == [(5, 24), (5, 24), (7, 24), (5, 24)]
    assert lookups == {("gemm", 5): 1, ("gemm", 7): 1}


def test_the_fp8_latent_decode_reads_its_table_once_a_shape(fresh_tables, launches, monkeypatch):
    """(an e4m3 MLA pool: its decode rows' settings depend on the step's batch and context, the
    same for every layer of the step)"""
    from deepserve.ops.triton.attention import paged_attention
    lookups, lookup = collections.Counter(), lc.lookup

    def counted(op, device, **shape):
        lookups[op, shape.get("ctx")] += 1
        return lookup(op, device, **shape)
    monkeypatch.setattr(lc, "lookup", counted)
    pool = torch.zeros(8, 64, 1, 576).to(torch.float8_e4m3fn)
    q = torch.randn(3, 16, 576, dtype=torch.bfloat16)
    starts, tables = torch.arange(4, dtype=torch.int32), torch.arange(6, dtype=torch.int32).view(3, 2)
    for ctx in (100, 100, 100, 101, 101):          # two steps' layers
        paged_attention(q, pool, pool[..., :512], starts, torch.full((3,), ctx, dtype=torch.int32), tables, 0.1, 1,
                        ctx)
    assert [launch[0] for launch in launches].count("_mla_decode_fp8_kernel") == 5
    assert lookups == {("mla_decode_fp8", 100): 1, ("mla_decode_fp8", 101): 1}


def test_settings_tried_reach_the_launch_and_the_table_comes_back(calls, launches):
    def v_up_launch():
        calls["mla_v_up"]()
        _, grid, kwargs, _ = launches[-1]
        return grid, kwargs["BLOCK_V"], kwargs["num_warps"]

    def decode_warps():
        calls["paged_attention (decode rows)"]()
        return launches[-2][2]["num_warps"]           # the split kernel's (the reduce's is last)

    table = (v_up_launch(), decode_warps())
    assert table == (((1, 16, 4), 32, 4), 4)        # 8 rows, 16 heads, 128 values in 32-wide blocks
    with lc.trying("mla_prep", [{"if": {"kernel": "v_up"}, "set": {"BLOCK_V": 64, "num_warps": 2}}]), \
            lc.trying("attention_decode", [{"set": {"num_warps": 8}}]):
        assert (v_up_launch(), decode_warps()) == (((1, 16, 2), 64, 2), 8)
    assert (v_up_launch(), decode_warps()) == table


def test_a_devices_table_key_is_built_once(monkeypatch):
    built = collections.Counter()
    key_of = lc.properties_key

    def counted(props, hip=None):
        built[id(props)] += 1
        return key_of(props, hip)
    monkeypatch.setattr(lc, "properties_key", counted)
    monkeypatch.setattr(lc, "interpreting", lambda: False)
    h200 = SimpleNamespace(major=9, minor=0, multi_processor_count=132, total_memory=140 * 2**30)
    for props, key in ((H100, "sm90-132sm-80g"), (h200, "sm90-132sm-144g")):
        monkeypatch.setattr(lc, "device_properties", lambda device, _p=props: _p)
        assert [lc.device_key(torch.device("cuda", 0)) for _ in range(3)] == [key] * 3
        assert built[id(props)] == 1


def test_pdl_follows_the_environment_at_every_launch(monkeypatch):
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    monkeypatch.setattr(_common, "_cuda_properties", lambda device: H100)
    _common._pdl_on.cache_clear()
    try:
        cuda = torch.device("cuda", 0)
        seen = []
        for value in ("1", "0", "1"):
            monkeypatch.setenv("DEEPSERVE_PDL", value)
            seen.append(_common.pdl_launch(cuda)["USE_PDL"])
        assert seen == [True, False, True]
    finally:
        _common._pdl_on.cache_clear()


class AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def test_rotary_of_q_alone_and_the_prompt_attention_make_no_view(calls, launches):
    for name in ("rotary_embedding (prompt q_pe)", "paged_attention (prompt rows)"):
        with AtenOps() as aten:
            calls[name]()
        assert aten.ops == [], name
    (_, rotary_grid, rotary_kw, _), (_, _, _, prefill_args) = launches
    assert rotary_grid == (5,) and rotary_kw["BLOCK_HK"] == 1
    # the prefill kernel's k_pe: the tensor given, with the strides of its expand over the 16 heads
    q, k_nope, k_pe = prefill_args[0], prefill_args[1], prefill_args[2]
    strides = prefill_args[8 + q.dim() + k_nope.dim():][:4]
    assert k_pe.shape[2] == 1 and strides == k_pe.expand(*k_nope.shape[:3], k_pe.shape[-1]).stride()
