"""Kernel tables from torch.profiler: which kernels a step launches, how long each takes, grouped
into Triton (deepserve's own kernels, found by name), cuBLAS GEMV/GEMM, torch elementwise /
reduce / other, memcpy and memset (the capture and grouping are deepserve/ops/profile.py's,
what --ops-profile runs), and the GPU's busy / idle timeline. Used by benchmarks/profile_decode.py
and benchmarks/ops_share.py."""
from __future__ import annotations

import re

from deepserve.ops.profile import (aggregate, jit_function_names, kernel_group, profile_records,  # noqa: F401
                                   short_name, triton_kernel_names)


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


def print_kernels(title: str, agg: dict) -> None:
    say(f"\n  {title}: {agg['launches_per_step']:.0f} launches/step, kernel time {agg['kernel_us_per_step']:.1f} "
        f"µs/step, {agg['distinct']} distinct")
    say("  by group: " + ", ".join(f"{g} {t:.1f} µs" for g, t in agg["groups_us_per_step"].items()))
    say(f"  {'kernel':<70} {'group':<17} {'n/step':>7} {'µs/step':>9} {'%':>6}")
    for r in agg["top"]:
        say(f"  {r['name'][:70]:<70} {r['group']:<17} {r['count_per_step']:>7.1f} {r['us_per_step']:>9.1f} {r['pct']:>6.1f}")


def gpu_timeline(fn, steps: int, top: int = 8) -> dict:
    """GPU busy vs idle over `steps` calls of fn (e.g. engine.step): the union of device
    intervals (kernels, memcpy, memset; graph replays show their kernels) over the window from
    the first device record to the last, and the largest idle gaps with the records around
    them, which show what the GPU waited for."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        sync(True)
    ivs = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if str(e.device_type).endswith("CUDA") and not re.match(r"cuda[A-Z]", e.name))
    if not ivs:
        return {"records": 0}
    busy, gaps = 0.0, []
    cur_start, cur_end, cur_name = ivs[0]
    for start, end, name in ivs[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gaps.append((start - cur_end, short_name(cur_name), short_name(name)))
            cur_start, cur_end = start, end
        elif end > cur_end:
            cur_end = end
        cur_name = name if end >= cur_end else cur_name
    busy += cur_end - cur_start
    window = ivs[-1][1] - ivs[0][0]
    gaps.sort(reverse=True)
    return {"records": len(ivs), "window_us_per_step": window / steps, "busy_us_per_step": busy / steps,
            "idle_us_per_step": (window - busy) / steps,
            "gaps_over_5us_per_step": sum(g > 5 for g, _, _ in gaps) / steps,
            "largest_gaps": [{"us": g, "after": a, "before": b} for g, a, b in gaps[:top]]}


def print_timeline(tl: dict) -> None:
    if not tl.get("records"):
        say("  (the profiler saw no device records)")
        return
    say(f"  per step: window {tl['window_us_per_step']:.1f} µs, GPU busy {tl['busy_us_per_step']:.1f} µs, "
        f"idle {tl['idle_us_per_step']:.1f} µs ({tl['gaps_over_5us_per_step']:.1f} gaps > 5 µs)")
    for g in tl["largest_gaps"]:
        say(f"    idle {g['us']:8.1f} µs after {g['after'][:50]:<50} before {g['before'][:50]}")
