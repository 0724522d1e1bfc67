"""The operator library: one function per hot op, backends torch | triton | flaggems.

A model runs its ops through the `OpTable` its runner resolves once from `--ops` (DESIGN
invariant 6): layers call `self.ops.rms_norm(x, w, eps)`, where `bind(model, table)` set
`ops` on every module. A layer used outside a model runner (tests, conversions) runs
`REFERENCE_OPS`, the torch implementations: the oracle every other backend is tested against.
"""
from deepserve.ops import (activation, attention, dense, int4, int8_static, mla, moe, moe_int4, moe_int8,  # noqa: F401
                           norm, quant, rotary, sampling)  # (torch impls)
from deepserve.ops.registry import TRITON_ALL, OpTable, bind, op_backends, resolve

REFERENCE_OPS = OpTable("torch", count=False)

__all__ = ["OpTable", "REFERENCE_OPS", "TRITON_ALL", "bind", "op_backends", "resolve"]
