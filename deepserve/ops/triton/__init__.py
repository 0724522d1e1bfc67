"""Triton implementations of the hot ops; importing this package registers them.

An `OpTable("triton")` (`--ops triton`) imports it. Each module registers its kernels under the same op
names and signatures as the torch references in `deepserve.ops`, which they are tested
against (tests/ops). Under TRITON_INTERPRET=1 the same kernels run on the CPU via numpy.
"""
from deepserve.ops.triton import (activation, attention, fused_moe, gemm, gemv, int4_gemm, kv_cache,  # noqa: F401
                                  mla_prep, moe_int4, moe_int8, moe_route, norm, quant_gemm, rotary, sampling, w4a8_gemm)

__all__ = ["activation", "attention", "fused_moe", "gemm", "gemv", "int4_gemm", "kv_cache", "mla_prep", "moe_int4",
           "moe_int8", "moe_route", "norm", "quant_gemm", "rotary", "sampling", "w4a8_gemm"]
