"""Shared start of the launch-setting sweeps (sweep_gemv.py, sweep_moe_small.py): the device
check and the timer plus the bandwidth it is set against.

On a GPU: CUDA-graph replay timing (bench_ops.graph_time_ms) and a 2 GiB device-to-device
copy (bench_engine.copy_bandwidth). With `--device cpu` the kernels run interpreted to check
a script's logic: wall-clock timing and a nominal 1 GB/s, not a measurement.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def prepare(device: str) -> None:
    """Call before importing any kernel module: TRITON_INTERPRET is read at decoration time."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to check the script's logic")


def wall_time_ms(fn: Callable[[], object], reps: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e3 / reps


def bandwidth_and_timer(device: str) -> tuple[float, Callable]:
    """(copy bytes per second, timer(fn, reps) -> ms per call) for `device`."""
    if device != "cuda":
        return 1e9, wall_time_ms
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engine import copy_bandwidth
    from bench_ops import graph_time_ms
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e9:.0f} GB/s (2 GiB, read + written)")
    return bw, graph_time_ms


def try_setting(op: str, rules: list[dict], fn: Callable[[], torch.Tensor], want: torch.Tensor,
                timer: Callable, tol: float = 1e-2) -> tuple[Optional[float], float, str]:
    """Run `fn` with `rules` appended to `op`'s launch table: (ms per call, max abs error, "")
    when its output matches `want` within `tol`, else (None, error, why): "WRONG" or the build
    or launch failure (out of resources, compiler errors)."""
    from deepserve.ops.triton import launch_config
    with launch_config.trying(op, rules):
        try:
            got = fn()
        except Exception as exc:  # noqa: BLE001  (report, let the sweep go on)
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            return None, float("nan"), f"failed to build or launch: {type(exc).__name__}: {first}"
        err = (got.float() - want).abs().max().item()
        if not torch.allclose(got.float(), want, atol=tol, rtol=tol):
            return None, err, f"WRONG: max abs error {err:.3g}"
        return timer(fn), err, ""
