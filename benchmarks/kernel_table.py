"""Kernel tables from torch.profiler: which kernels a step launches, how long each takes, grouped
into Triton (deepserve's own kernels, found by name), cuBLAS GEMV/GEMM, torch elementwise /
reduce / other, memcpy and memset. Used by benchmarks/profile_decode.py."""
from __future__ import annotations

import importlib
import pkgutil
import re
from collections import defaultdict


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(cuda: bool) -> None:
    if cuda:
        import torch
        torch.cuda.synchronize()


def triton_kernel_names() -> set[str]:
    """Names of deepserve's Triton kernels (CUPTI reports a Triton kernel by its function name)."""
    names: set[str] = set()
    try:
        import deepserve.ops.triton as pkg
    except ImportError as exc:
        say(f"  (no Triton kernel names: {exc})")
        return names
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one module failing to import must not stop the rest
            say(f"  (skipping {info.name}: {type(exc).__name__}: {exc})")
            continue
        names |= jit_function_names(mod)
    return names


def jit_function_names(mod) -> set[str]:
    """Names of the Triton kernels a module defines or imports."""
    from triton.runtime.jit import JITFunction

    names = set()
    for obj in list(vars(mod).values()):
        for _ in range(4):  # Autotuner / Heuristics wrap the JITFunction in .fn
            if isinstance(obj, JITFunction):
                names.add(obj.__name__)
                break
            obj = getattr(obj, "fn", None)
    return names


def kernel_group(name: str, triton_names: set[str]) -> str:
    low = name.lower()
    if "memcpy" in low:
        return "memcpy"
    if "memset" in low:
        return "memset"
    if name in triton_names or name.startswith("triton_"):
        return "triton"
    if "gemv" in low:
        return "cublas gemv"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "cublas gemm"
    if "flash" in low:
        return "flash attn"
    if "at::native" in name or name.startswith("aten::"):
        if "reduce" in low:
            return "torch reduce"
        if "elementwise" in low:
            return "torch elementwise"
        return "torch other"
    return "other"


def short_name(name: str) -> str:
    if "at::native" in name:
        parts = re.findall(r"at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
        if parts:
            return "/".join(dict.fromkeys(parts[:3]))
    return name if len(name) <= 90 else name[:87] + "..."


def aggregate(records: list[tuple[str, float]], steps: int, triton_names: set[str], top: int) -> dict:
    """records: (name, µs) of every kernel (or CPU op) over `steps` steps."""
    by: dict[str, list] = {}
    groups: dict[str, float] = defaultdict(float)
    for name, us in records:
        e = by.setdefault(name, [0, 0.0])
        e[0] += 1
        e[1] += us
        groups[kernel_group(name, triton_names)] += us
    total = sum(us for _, us in records)
    rows = [{"name": short_name(n), "full_name": n, "group": kernel_group(n, triton_names),
             "count_per_step": c / steps, "us_per_step": t / steps, "pct": 100 * t / total if total else 0.0}
            for n, (c, t) in sorted(by.items(), key=lambda kv: -kv[1][1])]
    launches = sum(1 for n, _ in records if kernel_group(n, triton_names) not in ("memcpy", "memset"))
    return {"steps": steps, "launches_per_step": launches / steps, "kernel_us_per_step": total / steps,
            "distinct": len(rows), "groups_us_per_step": {g: t / steps for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": rows[:top]}


def profile_records(fn, steps: int, cuda: bool) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(cuda)
    if cuda:  # device-side records only: kernels, memcpy, memset (not cudaLaunchKernel & co.)
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if str(e.device_type).endswith("CUDA") and not re.match(r"cuda[A-Z]", e.name)]
    # CPU: self time of each op (no double counting of nested ops)
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.self_cpu_time_total > 0 and not e.name.startswith("ProfilerStep")]


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
