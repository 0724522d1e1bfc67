"""Operator registry: one name per op, implementations per backend, one backend chosen at start.

`deepserve.ops.<name>(...)` dispatches to the active backend's implementation, falling back
to the torch reference when a backend lacks the op. Calls are counted per backend so the
engine can report which share of op calls ran as Triton kernels.
"""
from __future__ import annotations

import collections
from typing import Callable

BACKENDS = ("torch", "triton", "flaggems")
TRITON_ALL = "triton-all"  # the triton backend with every shape on the Triton kernels (no cuBLAS)

_impls: dict[str, dict[str, Callable]] = collections.defaultdict(dict)
_plugin_backends: set[str] = set()  # out-of-tree platforms' own backends (add_backend)
_active = {"backend": "torch", "force_triton": False}
call_counts: collections.Counter = collections.Counter()  # (op, backend) -> calls


def known_backends() -> tuple[str, ...]:
    return BACKENDS + tuple(sorted(_plugin_backends))


def add_backend(name: str) -> None:
    """An out-of-tree platform's ops backend: its kernels register under `name`; ops it lacks
    run the torch reference."""
    if name in BACKENDS or name == TRITON_ALL:
        raise ValueError(f"ops backend {name!r} is built in")
    _plugin_backends.add(name)


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if backend not in known_backends():
        raise ValueError(f"unknown ops backend {backend!r}; known: {known_backends()}")

    def wrap(fn: Callable) -> Callable:
        _impls[op][backend] = fn
        return fn

    return wrap


def resolve(op: str, backend: str | None = None) -> tuple[str, Callable]:
    """The (backend, function) that runs `op` under `backend` (default: the active one)."""
    backend = backend or _active["backend"]
    impls = _impls[op]
    if backend in impls:
        return backend, impls[backend]
    # flaggems runs the torch path (flag_gems patches aten underneath)
    return "torch", impls["torch"]


def dispatcher(op: str) -> Callable:
    def call(*args, **kwargs):
        backend, fn = resolve(op)
        call_counts[(op, backend)] += 1
        return fn(*args, **kwargs)

    call.__name__ = op
    call.__qualname__ = op
    return call


def set_backend(name: str) -> None:
    """`triton-all` is the triton backend with `forcing_triton()` true."""
    force = name == TRITON_ALL
    name = "triton" if force else name
    if name not in known_backends():
        raise ValueError(f"ops backend must be one of {known_backends() + (TRITON_ALL,)}, got {name!r}")
    if name == "triton":
        import deepserve.ops.triton  # noqa: F401  (registers the Triton kernels)
    if name == "flaggems":
        try:
            import flag_gems
        except ImportError:
            raise RuntimeError("--ops flaggems needs FlagGems: pip install 'deepserve[flaggems]'") from None
        flag_gems.enable()
    _active["backend"] = name
    _active["force_triton"] = force


def get_backend() -> str:
    return _active["backend"]


def forcing_triton() -> bool:
    """Whether ops that choose between a Triton kernel and cuBLAS/torch per shape (the dense
    GEMM) take the Triton kernel for every shape (`--ops triton-all`)."""
    return _active["force_triton"]


def op_table() -> dict[str, list[str]]:
    """The backends of each op: the built-in ones first, then out-of-tree platforms' own."""
    order = {b: i for i, b in enumerate(known_backends())}
    return {op: sorted(impls, key=order.__getitem__) for op, impls in sorted(_impls.items())}


def call_totals() -> dict[str, int]:
    """Op calls since start in this process, all and those that ran as Triton kernels (what
    /metrics reports; summed over DP ranks the share stays a share)."""
    return {"op_calls": sum(call_counts.values()),
            "triton_op_calls": sum(n for (_, b), n in call_counts.items() if b == "triton")}


def triton_share() -> float:
    """Share of op calls since start that ran as Triton kernels."""
    totals = call_totals()
    return totals["triton_op_calls"] / totals["op_calls"] if totals["op_calls"] else 0.0
