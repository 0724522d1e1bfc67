"""Device memory of the CUDA graphs, kept out of the KV pool.

Graphs are captured after the KV pool is allocated (they record its addresses), so the
profiling forward that sizes the pool cannot see them. What they hold lives in their private
memory pools, which eager steps cannot use: the activations of the largest size captured
into each pool (the sizes share one pool, captured largest first), the outputs every whole
decode graph keeps (logits and hidden states per row) and the static input buffers. Left out
of the budget, a pool sized at a high --gpu-memory-utilization leaves the eager steps less
than the profiled peak.

As vLLM does since its graph memory profiling (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, on
by default from 0.26), the engine reserves an estimate before it sizes the pool, and after
capture logs what the graphs took beside it. vLLM measures its estimate with a capture on a
small scratch cache; here it is arithmetic on the profiling forward: that forward's
activation bytes per token times the token count of the largest graph of each pool, plus
the outputs the decode graphs keep.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from deepserve.config import EngineConfig
from deepserve.engine.cuda_graphs import decode_graph_sizes
from deepserve.engine.piecewise_graphs import capture_sizes


@dataclasses.dataclass
class GraphPlan:
    """The graphs a rank will capture: sizes (rows) of the whole decode graphs, of the MTP
    module's graphs, and of the piecewise graphs; empty where none."""

    decode_sizes: list[int] = dataclasses.field(default_factory=list)
    mtp_sizes: list[int] = dataclasses.field(default_factory=list)
    piecewise_sizes: list[int] = dataclasses.field(default_factory=list)

    @property
    def num_sizes(self) -> int:
        return len(self.decode_sizes) + len(self.mtp_sizes) + len(self.piecewise_sizes)


def graph_plan(config: EngineConfig, device_type: str, ops_backend: str, pp_size: int,
               moe_dp_exchange: bool, splittable: bool) -> GraphPlan:
    """What ModelRunner.__init__ captures on this layout (engine/model_runner.py: whole decode
    graphs per stage with pipeline parallel, none with the alltoall MoE exchange, piecewise
    graphs on one stage without the DP exchange; cuda_graphs.py / piecewise_graphs.py: only
    with the Triton backend, the piecewise ones only for a model that splits at attention)."""
    plan = GraphPlan()
    if device_type != "cuda" or config.enforce_eager or ops_backend != "triton":
        return plan
    spec = config.speculative
    sizes = decode_graph_sizes(config, config.cuda_graph_sizes)
    whole = config.cudagraph_mode != "PIECEWISE"
    if pp_size > 1:
        if whole and not moe_dp_exchange:
            plan.decode_sizes = sizes
        return plan
    if moe_dp_exchange and config.parallel.all2all_backend == "alltoall":
        return plan
    if whole:
        plan.decode_sizes = sizes
        if spec is not None and spec.method == "mtp" and not moe_dp_exchange:
            plan.mtp_sizes = sizes
    if config.cudagraph_mode in ("PIECEWISE", "FULL_AND_PIECEWISE") and not moe_dp_exchange and splittable:
        plan.piecewise_sizes = capture_sizes(config.piecewise_max_tokens)
    return plan


def estimate_graph_bytes(plan: GraphPlan, activation_bytes: int, profiled_tokens: int,
                         kept_bytes_per_row: int) -> int:
    """Bytes the graphs of `plan` will hold: each pool the activations of its largest size,
    scaled from a profiling forward of `profiled_tokens` tokens whose activations took
    `activation_bytes` (decode and MTP graphs: one pool each, piecewise graphs: one), plus
    `kept_bytes_per_row` (logits and hidden states) for every row of every whole graph."""
    per_token = max(0, activation_bytes) / max(1, profiled_tokens)
    total = 0.0
    for sizes in (plan.decode_sizes, plan.mtp_sizes, plan.piecewise_sizes):
        if sizes:
            total += per_token * max(sizes)
    total += kept_bytes_per_row * (sum(plan.decode_sizes) + sum(plan.mtp_sizes))
    return int(total)


def kv_budget(total: int, utilization: float, peak: int, free: int, reserved: int, graphs: int) -> int:
    """Bytes the KV pool may take: the device's `total` x `utilization`, less the profiled
    `peak` allocation (weights and activations), what other processes and non-torch memory
    use (total - free - what this process's allocator holds) and the graphs' estimate."""
    used_by_others = max(0, total - free - reserved)
    return int(total * utilization - peak - used_by_others - graphs)


def graphs_line(plan: GraphPlan, seconds: float, taken: int, estimate: Optional[int]) -> str:
    """The start-up log line after capture: sizes, time, memory, and the estimate kept from the
    KV pool (None: the pool was sized by the user, no estimate was taken out)."""
    kinds = [f"{len(s)} {name}" for name, s in (("decode", plan.decode_sizes), ("mtp", plan.mtp_sizes),
                                                   ("piecewise", plan.piecewise_sizes)) if s]
    line = (f"CUDA graphs: {plan.num_sizes} sizes ({', '.join(kinds)}) captured in {seconds:.1f} s, "
            f"{taken / 2**30:.2f} GiB")
    if estimate is None:
        return line + " (KV pool sized by --num-gpu-blocks-override / --kv-cache-memory-bytes)"
    return line + f"; {estimate / 2**30:.2f} GiB was estimated and kept from the KV pool"
