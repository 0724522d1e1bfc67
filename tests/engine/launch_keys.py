"""Every interpreted Triton launch's specialization key, by Triton's own rules.

Under TRITON_INTERPRET=1 Triton compiles nothing, so nothing tells which launches a GPU would
compile anew. `record_launch_keys` computes for each launch what triton.runtime.jit's
JITFunction.run would: the binder Triton generates from the kernel's signature and its
do_not_specialize / do_not_specialize_on_alignment sets (create_function_from_signature,
native_specialize_impl: ints as 1 / multiple of 16 / other, pointers by 16-byte alignment,
constexprs by value) applied to the launch's arguments, and compute_cache_key over that
specialization and the launch options. Two launches with equal keys share one compiled kernel.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from typing import Optional

import torch

from triton.backends.compiler import BaseBackend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelParam, compute_cache_key, create_function_from_signature


def _binder(fn: InterpretedFunction):
    binder = getattr(fn, "_launch_key_binder", None)
    if binder is None:
        sig = inspect.signature(fn.fn)
        dns = set(fn.kwargs.get("do_not_specialize") or ())
        dna = set(fn.kwargs.get("do_not_specialize_on_alignment") or ())
        params = [KernelParam(i, p, i in dns or p.name in dns, i in dna or p.name in dna)
                  for i, p in enumerate(sig.parameters.values())]
        binder = fn._launch_key_binder = create_function_from_signature(sig, params, BaseBackend)
    return binder


def launch_key(fn: InterpretedFunction, args, kwargs) -> str:
    """The cache key Triton's JIT would compute for this launch (grid and warm-up aside)."""
    _, specialization, options = _binder(fn)(*args, **kwargs)
    return compute_cache_key({}, specialization, options)


class LaunchKeys(defaultdict):
    """{kernel name: set of launch keys}; `params`: {kernel name: its parameter names}."""

    def __init__(self, *args):
        super().__init__(*args)
        self.params: dict[str, list[str]] = {}


@contextlib.contextmanager
def record_launch_keys(execute=lambda name: True, stand_ins: Optional[dict] = None):
    """Yields {kernel name: set of launch keys}, filled by every interpreted launch inside.
    A kernel for which `execute(name)` is false is not run (its outputs keep what they held),
    or where `stand_ins` has its name, that function of its arguments runs instead; the float
    tensors of those that run are made finite first (garbage left by skipped ones)."""
    stand_ins = stand_ins or {}
    keys = LaunchKeys(set)
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        name = f"{self.fn.__module__}.{self.fn.__qualname__}"
        keys[name].add(launch_key(self, args, kwargs))
        keys.params[name] = self.arg_names
        if name in stand_ins:
            return stand_ins[name](*args)
        if execute(name):
            for a in args:
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    torch.nan_to_num_(a, posinf=1e4, neginf=-1e4)
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = recording
    try:
        yield keys
    finally:
        InterpretedFunction.run = run
