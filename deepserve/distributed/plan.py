"""Automatic parallel plan: which TP / PP / DP / EP layout to serve a model with.

For every layout of `gpus` GPUs (TP a power of two within one node, PP a divisor of the
rest, DP what is left, EP on or off for MoE models) it computes the weight bytes and KV
memory per GPU (arithmetic in plan_bytes.py) and the concurrent tokens the KV cache holds,
then picks one and says why each other layout lost. `serve` calls `choose_plan` when no
parallel sizes are given ("automated deployment optimization" in the R1 serving guides).

KV memory per GPU = gpu_memory x utilization - weights - an activation reserve: the
profiling peak at the largest batch, CUDA graphs and NCCL buffers, 4 GiB by default for
models of 20B parameters or more, else 2 GiB (flag). Concurrent tokens = KV memory / KV
bytes per token per GPU, the least over PP stages, times DP (each DP replica, and with
DP-attention each DP rank, keeps its own requests and cache).

Choice: among layouts that fit and hold at least one max-model-len sequence per replica,
the most concurrent tokens wins; ties go to fewer PP stages, then smaller TP. PP is only
used to fit or to put one stage per node: a PP larger than the smallest that fits, and
other than the node count, is rejected, since pipeline bubbles cost latency the token
count does not show (without this rule PP would win everywhere: it splits the KV cache
where TP replicates MLA's). With the MTP layer loaded no layout has PP > 1: the engine drafts
with it on one stage only (config.speculative_not_yet).
"""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Optional

from deepserve.config import FP8_KV_CACHE_DTYPES, SpeculativeConfig, canonical_dtype, resolve_max_model_len
from deepserve.distributed.plan_bytes import (DTYPE_BYTES, MLA_ARCHS, Ignored, Layout, architecture,
                                              kv_bytes_per_token_layer, param_count, stage_kv_layers,
                                              stage_layers, structural_problem, weight_breakdown,
                                              weight_bytes_per_gpu)

GiB = 1 << 30
QUANTIZATIONS = (None, "fp8", "w8a8-int8", "w4a16", "w4a8-int8", "awq", "gptq")


# --------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One layout with its per-GPU numbers and its verdict (`reason` None only when chosen)."""

    layout: Layout
    reason: Optional[str] = None          # why rejected; None for the chosen plan
    any_pp_dp: bool = False               # rejected for its TP alone: stands for every PP/DP
    weight_bytes: int = 0                 # heaviest stage, per GPU
    breakdown: dict = field(default_factory=dict)
    kv_bytes: int = 0                     # KV memory per GPU on the heaviest stage
    kv_bytes_per_token: int = 0           # per GPU, heaviest stage
    tokens_per_replica: int = 0
    fits: bool = False

    @property
    def tokens(self) -> int:
        return self.tokens_per_replica * self.layout.dp


@dataclass
class Plan:
    """A chosen layout (None when nothing fits), every candidate with its verdict, the inputs."""

    chosen: Optional[Candidate]
    candidates: list[Candidate]
    gpus: int
    nodes: int
    gpu_memory_bytes: int
    dtype: str
    quantization: Optional[str]
    max_model_len: int
    gpu_memory_utilization: float
    activation_reserve_bytes: int
    include_mtp: bool
    params: int
    mtp_params: int
    total_weight_bytes: int               # the whole model in this dtype / quantization
    suggestions: list[str] = field(default_factory=list)
    kv_cache_dtype: str = "auto"          # auto / bfloat16 / float16: the model dtype; fp8 / fp8_e4m3: one byte
    ignored: Ignored = field(default=None, repr=False, compare=False)   # modules the checkpoint leaves unquantized

    @property
    def kv_dtype_bytes(self) -> int:
        return 1 if self.kv_cache_dtype in FP8_KV_CACHE_DTYPES else DTYPE_BYTES[self.dtype]

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_bytes * self.gpu_memory_utilization) - self.activation_reserve_bytes

    def stage_layers(self, num_layers: int) -> list[range]:
        return stage_layers(num_layers, self.chosen.layout.pp) if self.chosen else []

    def parallel_args(self) -> dict:
        """ParallelConfig fields of the chosen layout."""
        if self.chosen is None:
            raise ValueError(self.no_fit_message())
        lay = self.chosen.layout
        return dict(tensor_parallel_size=lay.tp, pipeline_parallel_size=lay.pp,
                    data_parallel_size=lay.dp, enable_expert_parallel=lay.ep)

    def no_fit_message(self) -> str:
        q = self.quantization or self.dtype
        msg = (f"no layout of {self.gpus} x {self.gpu_memory_bytes / GiB:.0f} GiB GPUs fits this model "
               f"in {q} with max-model-len {self.max_model_len}: its weights alone are "
               f"{self.total_weight_bytes / GiB:.0f} GiB, the GPUs have {self.gpus} x "
               f"{self.usable_bytes / GiB:.1f} = {self.gpus * self.usable_bytes / GiB:.0f} GiB usable")
        return msg + ("; it would fit with " + "; or ".join(self.suggestions) if self.suggestions else "")


def default_activation_reserve(params: int) -> int:
    return 4 * GiB if params >= 20_000_000_000 else 2 * GiB


def resolve_dtype(cfg, dtype: str) -> str:
    dtype = canonical_dtype(dtype)
    if dtype == "auto":
        dtype = str(cfg.get("torch_dtype") or "bfloat16").replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} has no plan arithmetic; use one of {', '.join(DTYPE_BYTES)}")
    return dtype


def _powers_of_two(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if (1 << i) <= n and n % (1 << i) == 0]


def _evaluate(cfg, lay: Layout, plan: Plan) -> Candidate:
    cand = Candidate(lay)
    problem = structural_problem(cfg, lay, plan.quantization, plan.ignored)
    if plan.include_mtp and lay.pp > 1:
        # config.speculative_not_yet: the engine drafts with the MTP layer on one stage only
        problem = f"PP {lay.pp}: MTP drafting (speculative_config method mtp) runs without pipeline stages"
    if problem:
        cand.reason = problem
        return cand
    stages = weight_breakdown(cfg, lay, plan.dtype, plan.quantization, plan.include_mtp, plan.ignored)
    per_layer = kv_bytes_per_token_layer(cfg, lay.tp, plan.kv_dtype_bytes)
    tokens = []
    for s, groups in enumerate(stages):
        kv_mem = plan.usable_bytes - sum(groups.values())
        tokens.append(max(0, kv_mem) // (per_layer * max(1, stage_kv_layers(cfg, lay, s, plan.include_mtp))))
    heavy = max(range(lay.pp), key=lambda s: sum(stages[s].values()))
    cand.breakdown, cand.weight_bytes = stages[heavy], sum(stages[heavy].values())
    cand.kv_bytes = plan.usable_bytes - cand.weight_bytes
    cand.kv_bytes_per_token = per_layer * stage_kv_layers(cfg, lay, heavy, plan.include_mtp)
    cand.tokens_per_replica = min(tokens)
    if cand.kv_bytes <= 0:
        cand.reason = (f"doesn't fit: weights {cand.weight_bytes / GiB:.1f} GiB/GPU > "
                       f"{plan.usable_bytes / GiB:.1f} GiB usable")
    elif cand.tokens_per_replica < plan.max_model_len:
        cand.reason = (f"KV cache holds {cand.tokens_per_replica:,} tokens per replica, "
                       f"fewer than max-model-len {plan.max_model_len:,}")
    else:
        cand.fits = True
    return cand


def evaluate_plans(cfg, gpus: int, gpu_memory_bytes: int, nodes: int = 1, quantization: Optional[str] = None,
                   dtype: str = "auto", max_model_len: Optional[int] = None,
                   gpu_memory_utilization: float = 0.9, activation_reserve_bytes: Optional[int] = None,
                   include_mtp: bool = False, suggest: bool = True, kv_cache_dtype: str = "auto",
                   ignored: Ignored = None) -> Plan:
    """Every candidate layout with its verdict; `chosen` is None when none fits. `ignored`: the
    modules the checkpoint leaves unquantized (quant/ignore.py's checkpoint_ignore; None: none)."""
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    if gpus < 1 or gpus % nodes:
        raise ValueError(f"--gpus {gpus} must be a positive multiple of --nodes {nodes}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} has no plan arithmetic; use fp8, w8a8-int8, w4a16, "
                         f"w4a8-int8, awq, gptq or none")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu memory must be positive, got {gpu_memory_bytes} bytes")
    architecture(cfg)
    params = param_count(cfg)
    has_mtp = include_mtp and bool(cfg.get("num_nextn_predict_layers"))
    plan = Plan(None, [], gpus, nodes, gpu_memory_bytes, resolve_dtype(cfg, dtype), quantization,
                resolve_max_model_len(cfg, max_model_len), gpu_memory_utilization,
                default_activation_reserve(params) if activation_reserve_bytes is None else activation_reserve_bytes,
                has_mtp, params, param_count(cfg, True) - params, 0, kv_cache_dtype=kv_cache_dtype, ignored=ignored)
    plan.total_weight_bytes = weight_bytes_per_gpu(cfg, Layout(1, 1, 1), plan.dtype, quantization, has_mtp, ignored)
    per_node = gpus // nodes
    moe = architecture(cfg) in MLA_ARCHS and bool(cfg.get("n_routed_experts"))
    for tp in _powers_of_two(gpus):
        if tp > per_node:
            plan.candidates.append(Candidate(Layout(tp, 1, gpus // tp), f"TP {tp} crosses nodes "
                                             f"({per_node} GPUs per node)", any_pp_dp=True))
            continue
        if cfg.num_attention_heads % tp:
            plan.candidates.append(Candidate(Layout(tp, 1, gpus // tp), f"num_attention_heads "
                                             f"{cfg.num_attention_heads} not divisible by TP {tp}", any_pp_dp=True))
            continue
        for pp in (p for p in range(1, gpus // tp + 1) if (gpus // tp) % p == 0):
            dp = gpus // (tp * pp)
            for ep in ((False, True) if moe and tp * dp > 1 else (False,)):
                plan.candidates.append(_evaluate(cfg, Layout(tp, pp, dp, ep), plan))
    _choose(plan)
    if plan.chosen is None and suggest:
        plan.suggestions = _suggestions(cfg, plan)
    return plan


def loads_mtp(speculative_config, hf_config) -> bool:
    """Whether serve's speculative_config (JSON text, a dict or a SpeculativeConfig; None: off)
    loads the model's MTP layer: method mtp, or no method on a model that has one."""
    if not speculative_config:
        return False
    spec = speculative_config
    if not isinstance(spec, SpeculativeConfig):
        spec = SpeculativeConfig.from_json(spec)
    return spec.for_model(hf_config).method == "mtp"


def _choose(plan: Plan) -> None:
    fitting = [c for c in plan.candidates if c.fits]
    if not fitting:
        return
    min_pp = min(c.layout.pp for c in fitting)
    allowed = {min_pp, plan.nodes}
    for c in fitting:
        if c.layout.pp not in allowed:
            c.fits, c.reason = False, (f"PP {c.layout.pp} not needed: layouts with PP {min_pp} fit "
                                       f"(PP only to fit or one stage per node)")
    fitting = [c for c in fitting if c.fits]
    fitting.sort(key=lambda c: (-c.tokens, c.layout.pp, c.layout.tp, c.layout.ep))
    best = plan.chosen = fitting[0]
    for c in fitting[1:]:
        if c.tokens < best.tokens:
            c.reason = f"fewer KV tokens than the chosen ({c.tokens:,} < {best.tokens:,})"
        elif c.layout.pp > best.layout.pp:
            c.reason = "as many KV tokens; the chosen has fewer PP stages"
        elif c.layout.tp > best.layout.tp:
            c.reason = "as many KV tokens; the chosen has a smaller TP"
        else:
            c.reason = "as many KV tokens; the chosen keeps experts unsharded (EP off)"


def _suggestions(cfg, plan: Plan) -> list[str]:
    """What would fit: fp8 on the same GPUs, or 2x / 4x / 8x as many nodes of the same GPUs."""
    kw = dict(dtype=plan.dtype, max_model_len=plan.max_model_len,
              gpu_memory_utilization=plan.gpu_memory_utilization,
              activation_reserve_bytes=plan.activation_reserve_bytes, include_mtp=plan.include_mtp, suggest=False,
              kv_cache_dtype=plan.kv_cache_dtype, ignored=plan.ignored)
    out = []
    if plan.quantization is None:
        other = evaluate_plans(cfg, plan.gpus, plan.gpu_memory_bytes, plan.nodes, "fp8", **kw)
        if other.chosen:
            out.append(f"--quantization fp8 on the same {plan.gpus} GPUs ({other.chosen.layout}, "
                       f"{other.chosen.tokens:,} KV tokens)")
    per_node = plan.gpus // plan.nodes
    for mult in (2, 4, 8):
        other = evaluate_plans(cfg, plan.gpus * mult, plan.gpu_memory_bytes, plan.nodes * mult,
                               plan.quantization, **kw)
        if other.chosen:
            out.append(f"{plan.gpus * mult} x {plan.gpu_memory_bytes / GiB:.0f} GiB GPUs in "
                       f"{plan.nodes * mult} nodes of {per_node} in {plan.quantization or plan.dtype} "
                       f"({other.chosen.layout}, {other.chosen.tokens:,} KV tokens)")
            break
    return out


def choose_plan(hf_config, gpus: int, gpu_memory_bytes: int, nodes: int = 1, quantization: Optional[str] = None,
                **kwargs) -> Plan:
    """The plan `serve` uses when no parallel sizes are given; ValueError (naming what would
    fit) when no layout fits. kwargs: dtype, max_model_len, gpu_memory_utilization,
    activation_reserve_bytes, include_mtp, kv_cache_dtype, ignored (evaluate_plans)."""
    plan = evaluate_plans(hf_config, gpus, gpu_memory_bytes, nodes, quantization, **kwargs)
    if plan.chosen is None:
        raise ValueError(plan.no_fit_message())
    return plan


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12}


def parse_size(text: str, allow_zero: bool = False) -> int:
    """'80GiB', '141 GiB', '80GB' (10^9), '80G' (GiB), '1073741824' -> bytes; 0 only with allow_zero."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m[2].lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r} not understood; write e.g. 80GiB, 141GiB or 80GB")
    value = int(float(m[1]) * _UNITS[unit])
    if value < 0 or value == 0 and not allow_zero:
        raise ValueError(f"memory size {text!r} must be positive")
    return value
