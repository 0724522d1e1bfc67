"""Where op time goes (`--ops-profile`): torch.profiler over representative engine
steps, each kernel's time attributed to one kind:

  triton  Triton kernels: deepserve's own (deepserve/ops/triton), FlagGems' and any other
          Triton JIT function alive in the process, recognised by name (CUPTI reports a Triton
          kernel by its function name), plus Inductor's `triton_*` kernels;
  blas    vendor libraries: cuBLAS / cuBLASLt GEMM and GEMV, CUTLASS, cuDNN on the GPU; the
          BLAS-backed aten matmuls (mm, addmm, bmm, ...) on the CPU;
  torch   every other aten kernel (elementwise, reductions, indexing, torch's own attention)
          and the collectives (NCCL kernels, gloo / c10d ops: group "comm");
  memcpy  copies and memsets.

On CUDA the profiler records device activity only: the kernels' own GPU time, CUDA-graph
replays included (CUPTI reports the kernels a replay runs). On the CPU there is no kernel
time; each aten op's self CPU time stands for it, and a Triton kernel (run by the Triton
interpreter, TRITON_INTERPRET=1) counts as the CPU time of its launch, the whole launch
including the aten ops the interpreter calls inside it: while profiling, every Triton launch
(`kernel[grid](...)`) runs inside a `triton::<kernel name>` record_function range.

`OpsProfiler` is what the engine holds with --ops-profile: a start-up capture (the engine runs
a short generation under it) and then a window of WINDOW_STEPS steps every EVERY_STEPS steps
from FIRST_WINDOW_STEP on; the kinds' time sums over every capture since start, which
/metrics reports as shares (deepserve:ops_time_share{kind=...}). It profiles the engine
process's rank only (rank 0 of a TP / PP group; each DP engine core its own).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import pkgutil
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

logger = logging.getLogger("deepserve")

KINDS = ("triton", "blas", "torch", "memcpy")
GROUP_KIND = {"triton": "triton", "cublas gemm": "blas", "cublas gemv": "blas", "cudnn": "blas",
              "cpu blas": "blas", "memcpy": "memcpy", "memset": "memcpy"}  # every other group: torch
TRITON_RANGE = "triton::"  # the CPU profile's range around one Triton launch
# aten ops whose CPU self time is a BLAS call (MKL / OpenBLAS / oneDNN)
CPU_BLAS_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm",
                          "aten::mv", "aten::addmv", "aten::dot", "aten::_scaled_mm", "aten::mkldnn_linear",
                          "aten::_mkl_linear", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu"})
WINDOW_STEPS = 8        # steps in one profiled window
EVERY_STEPS = 1024      # a window starts every this many steps ...
FIRST_WINDOW_STEP = 16  # ... at this step of each period (past the first steps' warm-up)


# ----------------------------------------------------------------------------- kernel names
def kernel_name(obj) -> Optional[str]:
    """The function name of a Triton kernel object (JITFunction, the interpreter's
    InterpretedFunction, or any KernelInterface wrapping one in .fn), None for anything else.
    CUPTI reports a compiled Triton kernel under this name."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return None
    if not issubclass(type(obj), KernelInterface):  # (type(): no proxy's __class__ is asked)
        return None
    for _ in range(8):  # Autotuner / Heuristics (FlagGems: LibEntry / LibTuner too) wrap the kernel in .fn
        inner = getattr(obj, "fn", None)
        if not issubclass(type(inner), KernelInterface):
            return getattr(inner, "__name__", None)
        obj = inner
    return None


def jit_function_names(mod) -> set[str]:
    """Names of the Triton kernels a module defines or imports."""
    return {n for n in map(kernel_name, list(vars(mod).values())) if n}


def triton_kernel_names() -> set[str]:
    """Names of deepserve's Triton kernels (importing every module of deepserve.ops.triton)."""
    names: set[str] = set()
    try:
        import deepserve.ops.triton as pkg
    except ImportError as exc:
        logger.debug("no Triton kernel names: %s", exc)
        return names
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one module failing to import must not stop the rest
            logger.debug("Triton kernel names: skipping %s (%s: %s)", info.name, type(exc).__name__, exc)
            continue
        names |= jit_function_names(mod)
    return names


def live_triton_kernel_names() -> set[str]:
    """Names of every Triton kernel object alive in the process: FlagGems' (including the
    pointwise kernels it generates into modules of its code cache at first use) and any other
    library's beside deepserve's."""
    if "triton" not in sys.modules:
        return set()
    return {n for n in map(kernel_name, gc.get_objects()) if n}


# ----------------------------------------------------------------------------- classification
def kernel_group(name: str, triton_names: set[str]) -> str:
    """A kernel's (or, on the CPU, an op's) fine group; GROUP_KIND maps it to its kind."""
    low = name.lower()
    if "memcpy" in low:
        return "memcpy"
    if "memset" in low:
        return "memset"
    if name in triton_names or name.startswith(("triton_", TRITON_RANGE)):
        return "triton"
    if name in CPU_BLAS_OPS:
        return "cpu blas"
    if "cudnn" in low:
        return "cudnn"
    if "gemv" in low:
        return "cublas gemv"
    if any(s in low for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "cublas gemm"
    if "flash" in low:
        return "flash attn"
    if low.startswith(("nccl", "gloo:", "c10d::")):
        return "comm"             # collectives (kind torch); never a Triton kernel to look up
    if "at::native" in name or name.startswith("aten::"):
        if "reduce" in low:
            return "torch reduce"
        if "elementwise" in low:
            return "torch elementwise"
        return "torch other"
    return "other"


def kernel_kind(name: str, triton_names: set[str]) -> str:
    return GROUP_KIND.get(kernel_group(name, triton_names), "torch")


def short_name(name: str) -> str:
    if "at::native" in name:
        parts = re.findall(r"at::native::(?:\(anonymous namespace\)::)?(\w+)", name)
        if parts:
            return "/".join(dict.fromkeys(parts[:3]))
    return name if len(name) <= 90 else name[:87] + "..."


# ----------------------------------------------------------------------------- capture
@contextlib.contextmanager
def triton_launch_ranges() -> Iterator[None]:
    """While inside, every Triton launch `kernel[grid](...)` runs in a record_function range
    named TRITON_RANGE + the kernel's name (the CPU profile's view of a Triton kernel)."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        yield
        return
    original = KernelInterface.__getitem__

    def ranged_getitem(self, grid):
        launch = original(self, grid)
        label = TRITON_RANGE + (kernel_name(self) or type(self).__name__)

        def run(*args, **kwargs):
            with torch.profiler.record_function(label):
                return launch(*args, **kwargs)
        return run

    KernelInterface.__getitem__ = ranged_getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


def device_records(events) -> list[tuple[str, float]]:
    """(kernel name, µs) of every device record (kernels, memcpy, memset; not the runtime's
    cudaLaunchKernel & co.) of a CUDA profile."""
    return [(e.name, e.time_range.elapsed_us()) for e in events
            if str(e.device_type).endswith("CUDA") and not re.match(r"cuda[A-Z]", e.name)]


def cpu_records(events) -> list[tuple[str, float]]:
    """(op name, µs) of a CPU profile: each op's self time, and for each Triton launch range
    its whole time (the interpreter's Python and every op it ran inside the launch), whose
    ops are then not counted again. Other user ranges' self time is not op time."""
    out = []
    for e in events:
        if str(e.device_type).endswith("CUDA"):
            continue
        if e.name.startswith(TRITON_RANGE):
            out.append((e.name, e.cpu_time_total))
            continue
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith(TRITON_RANGE):
            parent = parent.cpu_parent
        if (parent is None and e.self_cpu_time_total > 0 and not getattr(e, "is_user_annotation", False)
                and not e.name.startswith("ProfilerStep")):
            out.append((e.name, e.self_cpu_time_total))
    return out


@contextlib.contextmanager
def capture(cuda: bool) -> Iterator[torch.profiler.profile]:
    """Profile the body: CUDA activity on a GPU (synchronised before the profiler stops), CPU
    activity with Triton launch ranges otherwise."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        with contextlib.nullcontext() if cuda else triton_launch_ranges():
            yield prof
        if cuda:
            torch.cuda.synchronize()


def profile_records(fn: Callable[[], object], steps: int, cuda: bool) -> list[tuple[str, float]]:
    """(name, µs) of every kernel (CUDA) or op (CPU) over `steps` calls of fn."""
    with capture(cuda) as prof:
        for _ in range(steps):
            fn()
    return device_records(prof.events()) if cuda else cpu_records(prof.events())


# ----------------------------------------------------------------------------- reports
@dataclass
class OpsTimeReport:
    """Kernel time by kernel name over some profiled steps: `kernels` name -> [launches, µs]."""

    steps: int = 0
    kernels: dict[str, list] = field(default_factory=dict)
    triton_names: set[str] = field(default_factory=set)
    cpu: bool = False  # op CPU time standing for kernel time

    def add(self, records: list[tuple[str, float]], steps: int) -> None:
        self.steps += steps
        for name, us in records:
            entry = self.kernels.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += us

    def kind_of(self, name: str) -> str:
        return kernel_kind(name, self.triton_names)

    def kinds_us(self) -> dict[str, float]:
        out = dict.fromkeys(KINDS, 0.0)
        for name, (_, us) in self.kernels.items():
            out[self.kind_of(name)] += us
        return out

    @property
    def total_us(self) -> float:
        return sum(us for _, us in self.kernels.values())

    def shares(self) -> dict[str, float]:
        """Share of kernel time per kind (sums to 1; all 0 before anything was profiled)."""
        total = self.total_us
        return {k: (us / total if total else 0.0) for k, us in self.kinds_us().items()}

    def top(self, n: int) -> list[dict]:
        """The n kernels with the most time: name, kind, launches and µs per step, share."""
        total, steps = self.total_us, max(self.steps, 1)
        rows = sorted(self.kernels.items(), key=lambda kv: -kv[1][1])[:n]
        return [{"name": short_name(name), "kind": self.kind_of(name), "launches_per_step": c / steps,
                 "us_per_step": us / steps, "share": us / total if total else 0.0} for name, (c, us) in rows]

    def summary(self, what: str, top: int = 5) -> str:
        shares = self.shares()
        unit = "op CPU time" if self.cpu else "kernel time"
        head = (f"ops profile ({what}, {self.steps} steps, {self.total_us / max(self.steps, 1):.0f} µs/step of "
                f"{unit}): " + ", ".join(f"{k} {100 * shares[k]:.1f}%" for k in KINDS))
        return head + "; top: " + ", ".join(f"{r['name'][:48]} ({r['kind']}) {100 * r['share']:.1f}%"
                                            for r in self.top(top))

    def table(self, top: int) -> str:
        """The kinds' shares and the top kernels, one per line."""
        shares, kinds_us, steps = self.shares(), self.kinds_us(), max(self.steps, 1)
        lines = [f"{self.steps} steps profiled, {self.total_us / steps:.1f} µs/step",
                 f"{'kind':<8} {'µs/step':>10} {'share':>7}"]
        lines += [f"{k:<8} {kinds_us[k] / steps:>10.1f} {100 * shares[k]:>6.1f}%" for k in KINDS]
        lines.append(f"{'kernel':<60} {'kind':<7} {'n/step':>7} {'µs/step':>10} {'share':>7}")
        lines += [f"{r['name'][:60]:<60} {r['kind']:<7} {r['launches_per_step']:>7.1f} {r['us_per_step']:>10.1f} "
                  f"{100 * r['share']:>6.1f}%" for r in self.top(top)]
        return "\n".join(lines)


def aggregate(records: list[tuple[str, float]], steps: int, triton_names: set[str], top: int) -> dict:
    """Per-step tables of records (name, µs) over `steps` steps: by kernel, by fine group and
    by kind (what benchmarks/kernel_table.py prints and benchmarks/ops_share.py saves)."""
    report = OpsTimeReport(triton_names=triton_names)
    report.add(records, steps)
    groups: dict[str, float] = defaultdict(float)
    for name, (_, us) in report.kernels.items():
        groups[kernel_group(name, triton_names)] += us
    total = report.total_us
    rows = [{"name": short_name(n), "full_name": n, "group": kernel_group(n, triton_names), "kind": report.kind_of(n),
             "count_per_step": c / steps, "us_per_step": t / steps, "pct": 100 * t / total if total else 0.0}
            for n, (c, t) in sorted(report.kernels.items(), key=lambda kv: -kv[1][1])]
    launches = sum(c for n, (c, _) in report.kernels.items() if report.kind_of(n) != "memcpy")
    return {"steps": steps, "launches_per_step": launches / steps, "kernel_us_per_step": total / steps,
            "distinct": len(rows),
            "groups_us_per_step": {g: t / steps for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
            "kinds_us_per_step": {k: t / steps for k, t in report.kinds_us().items()},
            "kind_shares": report.shares(), "top": rows[:top]}


class OpsProfiler:
    """The engine's --ops-profile: captures (the start-up one, then step windows) summed into
    `report`; `last_profile` keeps the latest capture's torch profiler (its events are what
    the latest capture's records came from)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.report = OpsTimeReport(triton_names=triton_kernel_names(), cpu=not cuda)
        self.last_profile: Optional[torch.profiler.profile] = None
        self.last_records: list[tuple[str, float]] = []
        self._checked: set[str] = set()  # unknown kernel names already looked up among live Triton kernels
        self._window: Optional[contextlib.ExitStack] = None
        self._window_start = self._window_steps = self._last_tick = 0
        self._failed = False  # a window could not start: no more windows

    @contextlib.contextmanager
    def profiling(self, steps: Callable[[], int]) -> Iterator[None]:
        """Profile the body; `steps()` says how many engine steps it ran (read at the end)."""
        with capture(self.cuda) as prof:
            yield
        self._record(prof, steps())

    def _record(self, prof, steps: int) -> None:
        self.last_profile = prof
        self.last_records = device_records(prof.events()) if self.cuda else cpu_records(prof.events())
        unknown = {name for name, _ in self.last_records if kernel_group(name, self.report.triton_names) == "other"}
        if unknown - self._checked:  # e.g. FlagGems' generated kernels, made at their first use
            self.report.triton_names |= live_triton_kernel_names()
            self._checked |= unknown
        self.report.add(self.last_records, steps)

    def tick(self, step: int) -> None:
        """Called before each engine step with the number of steps run so far: starts a window
        at FIRST_WINDOW_STEP of each EVERY_STEPS period and ends it WINDOW_STEPS steps later."""
        self._last_tick = step
        if self._window is not None:
            if step - self._window_start >= WINDOW_STEPS:
                self.close(step - self._window_start)
                logger.info("%s", self.report.summary(f"every capture since start, the latest ending at step {step}"))
            return
        if not self._failed and FIRST_WINDOW_STEP <= step % EVERY_STEPS < FIRST_WINDOW_STEP + WINDOW_STEPS:
            self._window_start = step
            self._window = contextlib.ExitStack()
            try:
                self._window.enter_context(self.profiling(lambda: self._window_steps))
            except RuntimeError as exc:  # e.g. another profiler is running: serving goes on unprofiled
                self._window, self._failed = None, True
                logger.warning("--ops-profile: no more step windows profiled: %s", exc)

    def close(self, steps: Optional[int] = None) -> None:
        """End an open window; `steps`: how many it ran (default: up to the last tick's step)."""
        if self._window is not None:
            self._window_steps = self._last_tick + 1 - self._window_start if steps is None else steps
            window, self._window = self._window, None
            window.close()

    def gauges(self) -> dict[str, float]:
        """Kernel µs per kind over every capture since start (summed over DP ranks, the shares
        stay shares) and the steps profiled."""
        return {**{f"ops_time_us_{k}": us for k, us in self.report.kinds_us().items()},
                "ops_profiled_steps": self.report.steps}
