"""The operator library: one function per hot op, backends torch | triton | flaggems.

Call ops as `ops.rms_norm(x, w, eps)`; the backend is chosen once at start with
`ops.set_backend(...)` (DESIGN invariant 6). The torch implementations are the oracle
every other backend is tested against.
"""
from deepserve.ops import (activation, attention, dense, int4, int8_static, mla, moe, moe_int4, moe_int8,  # noqa: F401
                           norm, quant, rotary, sampling)  # (torch impls)
from deepserve.ops.registry import (call_counts, dispatcher, get_backend, op_table, resolve,
                                    set_backend, triton_share)

rms_norm = dispatcher("rms_norm")
fused_add_rms_norm = dispatcher("fused_add_rms_norm")
silu_and_mul = dispatcher("silu_and_mul")
rotary_embedding = dispatcher("rotary_embedding")
write_kv_cache = dispatcher("write_kv_cache")
paged_attention = dispatcher("paged_attention")
sample = dispatcher("sample")
moe_route = dispatcher("moe_route")
fused_moe = dispatcher("fused_moe")
fp8_block_linear = dispatcher("fp8_block_linear")
int8_linear = dispatcher("int8_linear")
int4_linear = dispatcher("int4_linear")
w4a8_linear = dispatcher("w4a8_linear")
int8_static_linear = dispatcher("int8_static_linear")
fused_moe_int4 = dispatcher("fused_moe_int4")
fused_moe_int8 = dispatcher("fused_moe_int8")
linear = dispatcher("linear")
linear_pair = dispatcher("linear_pair")
mla_kv_write = dispatcher("mla_kv_write")
mla_q_absorb = dispatcher("mla_q_absorb")
mla_v_up = dispatcher("mla_v_up")
mla_decode_prep = dispatcher("mla_decode_prep")

__all__ = ["set_backend", "get_backend", "op_table", "resolve", "call_counts", "triton_share",
           "rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "write_kv_cache",
           "paged_attention", "sample", "moe_route", "fused_moe", "fp8_block_linear",
           "int8_linear", "int4_linear", "w4a8_linear", "int8_static_linear", "fused_moe_int4", "fused_moe_int8", "linear", "linear_pair", "mla_kv_write", "mla_q_absorb", "mla_v_up",
           "mla_decode_prep"]
