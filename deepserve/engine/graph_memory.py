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
the outputs the decode graphs keep (logits and hidden states on the last pipeline stage, the
(hidden, residual) pair it sends on elsewhere).

What the estimate kept and the graphs did not take goes back to the pool when it is worth a
second capture (`unused_estimate`): the runner reallocates the pool bigger and captures the
whole decode graphs again over it (they hold its addresses; piecewise graphs leave attention
eager and keep theirs). A planned capture that failed gives all of it back, with nothing to
capture again. Graphs that took much more than the estimate get a warning (`overrun_warning`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from deepserve.config import EngineConfig
from deepserve.engine.cuda_graphs import decode_graph_sizes
from deepserve.engine.piecewise_graphs import capture_sizes
from deepserve.ops.registry import replays_graphs


@dataclasses.dataclass
class GraphPlan:
    """The graphs a rank will capture: sizes (rows) of the whole decode graphs, of the MTP
    module's graphs, and of the piecewise graphs, empty where none; `last_stage`: whether the
    rank is on the last (or only) pipeline stage, whose decode graphs end in logits."""

    decode_sizes: list[int] = dataclasses.field(default_factory=list)
    mtp_sizes: list[int] = dataclasses.field(default_factory=list)
    piecewise_sizes: list[int] = dataclasses.field(default_factory=list)
    last_stage: bool = True

    @property
    def num_sizes(self) -> int:
        return len(self.decode_sizes) + len(self.mtp_sizes) + len(self.piecewise_sizes)


def graph_plan(config: EngineConfig, device_type: str, ops_backend: str, pp_size: int,
               moe_dp_exchange: bool, splittable: bool, pp_rank: int = 0) -> GraphPlan:
    """What ModelRunner.__init__ captures on this layout (engine/model_runner.py: whole decode
    graphs per stage with pipeline parallel, none with the alltoall MoE exchange, piecewise
    graphs on one stage without the DP exchange; cuda_graphs.py / piecewise_graphs.py: only
    with the Triton backend, the piecewise ones only for a model that splits at attention),
    on pipeline stage `pp_rank` of `pp_size`."""
    plan = GraphPlan(last_stage=pp_rank == pp_size - 1)
    if device_type != "cuda" or config.enforce_eager or not replays_graphs(ops_backend):
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


def kept_row_bytes(plan: GraphPlan, vocab_size: int, hidden_size: int, elem: int) -> int:
    """Bytes a whole decode graph of `plan` keeps per row: on the last (or only) pipeline
    stage its hidden states and logits, elsewhere the (hidden, residual) pair [2, D] the stage
    sends on (engine/pipeline_graphs.py), in the model dtype (`elem` bytes)."""
    return (vocab_size + hidden_size) * elem if plan.last_stage else 2 * hidden_size * elem


# Below these the unused part of the estimate stays unused: a second capture of the decode
# graphs costs start-up seconds, worth it only for a sizable share of the pool.
GIVE_BACK_MIN_BYTES = 256 * 2**20
GIVE_BACK_MIN_SHARE = 0.25


def unused_estimate(estimate: int, taken: int) -> int:
    """The part of the graphs' `estimate` they did not take (`taken`: measured over capture;
    0 where capture failed) when it is over GIVE_BACK_MIN_SHARE of the estimate and over
    GIVE_BACK_MIN_BYTES; else 0."""
    unused = estimate - max(0, taken)
    if unused <= GIVE_BACK_MIN_BYTES or unused <= GIVE_BACK_MIN_SHARE * estimate:
        return 0
    return unused


def overrun_warning(estimate: int, taken: int) -> Optional[str]:
    """A warning where the graphs took more than the estimate kept for them by the same margins
    (the eager steps then have less than the profiled peak left), else None."""
    over = taken - estimate
    if over <= GIVE_BACK_MIN_BYTES or over <= GIVE_BACK_MIN_SHARE * estimate:
        return None
    return (f"the CUDA graphs took {taken / 2**30:.2f} GiB, {over / 2**30:.2f} GiB more than the "
            f"{estimate / 2**30:.2f} GiB estimate kept from the KV pool: eager steps may run out of device "
            f"memory; lower --gpu-memory-utilization or --max-num-batched-tokens")


def grown_blocks(num_blocks: int, unused: int, bytes_per_block: int, max_blocks: int) -> int:
    """The pool's block count with `unused` bytes added, never above `max_blocks` (what
    max_num_seqs full-length sequences can use) nor below `num_blocks`."""
    return max(num_blocks, min(num_blocks + unused // bytes_per_block, max_blocks))


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


def grown_line(old_blocks: int, new_blocks: int, estimate: int, taken: int, recapture_s: Optional[float]) -> str:
    """The start-up log line after the pool grew by the unused part of the estimate
    (`recapture_s`: how long the decode graphs took to capture again; None: none to capture)."""
    line = (f"KV pool grown from {old_blocks} to {new_blocks} blocks: the CUDA graphs took "
            f"{max(0, taken) / 2**30:.2f} GiB of the {estimate / 2**30:.2f} GiB estimate kept from it")
    if recapture_s is None:
        return line
    return line + f"; decode graphs captured again over the bigger pool in {recapture_s:.1f} s"
