"""Operator registry: one name per op, implementations per backend, one backend chosen at start.

`deepserve.ops.<name>(...)` dispatches to the active backend's implementation, falling back
to the torch reference when a backend lacks the op. Calls are counted per backend so the
engine can report which share of op calls ran as Triton kernels.
"""
from __future__ import annotations

import collections
from typing import Callable

BACKENDS = ("torch", "triton", "flaggems")

_impls: dict[str, dict[str, Callable]] = collections.defaultdict(dict)
_active = {"backend": "torch"}
call_counts: collections.Counter = collections.Counter()  # (op, backend) -> calls


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown ops backend {backend!r}; known: {BACKENDS}")

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
    if name not in BACKENDS:
        raise ValueError(f"ops backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton":
        import deepserve.ops.triton  # noqa: F401  (registers the Triton kernels)
    if name == "flaggems":
        try:
            import flag_gems
        except ImportError:
            raise RuntimeError("--ops flaggems needs FlagGems: pip install 'deepserve[flaggems]'") from None
        flag_gems.enable()
    _active["backend"] = name


def get_backend() -> str:
    return _active["backend"]


def op_table() -> dict[str, list[str]]:
    return {op: sorted(impls) for op, impls in sorted(_impls.items())}


def triton_share() -> float:
    """Share of op calls since start that ran as Triton kernels."""
    total = sum(call_counts.values())
    return sum(n for (_, b), n in call_counts.items() if b == "triton") / total if total else 0.0
