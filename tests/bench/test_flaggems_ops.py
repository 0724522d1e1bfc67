"""benchmarks/flaggems_ops.py's attribution of kernels to aten ops, on profiler-like events."""
from __future__ import annotations

from types import SimpleNamespace

from tests.bench.conftest import benchmark_module

flaggems_ops = benchmark_module("flaggems_ops")


def cpu(name, parent=None, kernels=()):
    return SimpleNamespace(name=name, device_type="DeviceType.CPU", cpu_parent=parent,
                           kernels=[SimpleNamespace(name=k, duration=us) for k, us in kernels])


def gpu(name, us):
    return SimpleNamespace(name=name, device_type="DeviceType.CUDA", duration=us, cpu_parent=None, kernels=[])


def test_kernels_linked_to_no_cpu_event_count_outside_aten():
    """A kernel reached through an aten op counts for it; one the profiler links to no CPU event
    (a Triton launch from Python) still counts, under "(outside aten)", so the kinds' totals hold
    every kernel on the GPU."""
    mm = cpu("aten::mm")
    launch = cpu("cudaLaunchKernel", parent=mm, kernels=[("mm_kernel", 30.0)])
    events = [mm, launch, gpu("mm_kernel", 30.0), gpu("_rms_norm_kernel", 12.0), gpu("_rms_norm_kernel", 8.0)]
    ops = flaggems_ops.op_table(events, {"mm_kernel", "_rms_norm_kernel"})
    assert ops["mm"]["calls"] == 1 and ops["mm"]["us"]["triton"] == 30.0
    assert ops["(outside aten)"]["kernels"] == {"_rms_norm_kernel": 20.0}
    assert ops["(outside aten)"]["us"]["triton"] == 20.0
    assert sum(sum(v["us"].values()) for v in ops.values()) == 50.0      # nothing counted twice
