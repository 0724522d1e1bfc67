"""Run the Triton kernels under the CPU interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels (it picks the
interpreter at decoration time), so it is set here, before any test module of this folder
imports `deepserve.ops.triton`. It stays set for the rest of the session on CPU-only hosts:
there no Triton kernel could run compiled anyway, so nothing else changes behaviour. With a
GPU the variable is left alone and the `gpu`-marked tests run the compiled kernels.
"""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def triton_ops():
    """The Triton implementations, as interpreted kernels on CPU-only hosts."""
    pytest.importorskip("triton")
    pkg = importlib.import_module("deepserve.ops.triton")
    if not HAS_CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        from deepserve.ops.triton import norm
        if not isinstance(norm._rms_norm_kernel, InterpretedFunction):
            # imported earlier in this session without the interpreter: decorate again
            for name in [m for m in sys.modules if m.startswith("deepserve.ops.triton.")]:
                importlib.reload(sys.modules[name])
            pkg = importlib.reload(pkg)
    return pkg


@pytest.fixture
def cpu_only():
    if HAS_CUDA:
        pytest.skip("interpreter tests run on CPU-only hosts; the gpu tests cover this host")


@pytest.fixture(autouse=True)
def bool_masks(monkeypatch):
    """Interpreted loads and stores take bool masks only, as Triton 3.9's interpreter does. 3.6's
    also reads an int32 mask, which is what `block & scalar` gives there (the scalar condition
    is widened when broadcast), so a kernel that passes here runs interpreted on both."""
    if HAS_CUDA:
        return
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:
        return
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def check(mask):
        # a TensorHandle, or the bare array a block pointer's bounds give
        data = mask if isinstance(mask, np.ndarray) else mask.data
        if data.dtype != np.bool_:
            raise ValueError(f"mask has unsupported dtype {data.dtype} (Triton 3.9's interpreter takes bool)")

    def checked_load(self, ptrs, mask, *rest, **kw):
        check(mask)
        return load(self, ptrs, mask, *rest, **kw)

    def checked_store(self, ptrs, value, mask, *rest, **kw):
        check(mask)
        return store(self, ptrs, value, mask, *rest, **kw)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(InterpreterBuilder, "create_masked_store", checked_store)
