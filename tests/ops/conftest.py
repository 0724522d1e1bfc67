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
