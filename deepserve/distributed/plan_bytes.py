"""Per-GPU weight bytes and KV-cache bytes of a model under a parallel layout, from config.json.

The arithmetic behind `deepserve plan` (distributed/plan.py): no weights are read and
nothing is allocated. Tensors are counted one by one, split as deepserve's parallel layers
split them (layers/linear.py, embedding.py, mla.py, moe.py), so the sums equal the
parameter bytes of our models built with the same ParallelContext (tests check this on
the `meta` device):

- TP splits attention heads (q/k/v/o; MLA's q_b / kv_b / o), MLP intermediate dims, and
  the vocab (embedding and lm_head rows: V padded to a multiple of 64, then equal slices of
  ceil(V / TP)). GQA KV
  heads are replicated when TP > kv heads. MLA's q_a / kv_a down-projections, norms, the
  MoE router and row-parallel biases are whole on every rank.
- EP (vLLM's --enable-expert-parallel): each of the TP x DP ranks of a stage holds
  E / (TP x DP) routed experts whole; without EP every rank holds every expert with its
  intermediate dim split by TP. Shared experts and dense MLPs are TP-split either way.
- PP gives each stage a contiguous run of layers, the embedding on the first stage and the
  final norm + lm_head (+ the MTP module when asked for) on the last.
- fp8 (DeepSeek's block format, quant/fp8.py), as the engine allocates it: a quantized
  Linear weight takes 1 byte per value plus one fp32 scale per row per 128 columns of the
  rank's slice (Fp8BlockLinearMethod keeps the block scales row-expanded); routed experts
  take 1 byte per value plus one fp32 scale per 128 x 128 block, their intermediate dim padded
  up to a whole block when a rank holds whole experts (FusedMoE.use_fp8); embeddings, lm_head,
  norms, biases, MLA's kv_b_proj and MTP's eh_proj keep the model dtype
  (layers/quantization.py), and the router is fp32 as MoEGate holds it. A checkpoint with
  static activation scales adds one fp32 input_scale per fp8 Linear (`static_fp8_input`).
- 4-bit (w4a16, awq, gptq; INT4_PLAN): a quantized Linear weight or routed expert matrix takes
  half a byte per value plus a scale (and for awq / gptq a uint8 zero point) per row per 128
  columns (layers/quantization_int4.py, moe_int4.py), or per the group size (and zero points)
  of a model folder's quantization_config in that format (`int4_layout`); the layers fp8 keeps in the model dtype
  stay in the model dtype. With activation reordering (`act_order`: GPTQ desc_act,
  compressed-tensors actorder "group") each 4-bit Linear also holds an int32 g_idx over its
  rank's input features (one for a fused q/k/v or gate/up), each routed expert one over D for
  gate and up and one over its I slice for down, and a row-parallel slice (o_proj, down_proj,
  the experts' down under TP) keeps the scales of every group of the whole row.
- int8 (w8a8-int8: compressed-tensors W8A8 int8, msModelSlim W8A8_DYNAMIC): the layers fp8
  quantizes and every routed expert matrix take 1 byte per value plus one fp32 scale per output
  row (layers/quantization.py's Int8W8A8LinearMethod, layers/moe_int8.py); the rest as fp8.
- Modules a checkpoint's quantization_config leaves unquantized keep the model dtype under any
  quantization and hold no g_idx, as the engine builds them; routed experts so left are not
  padded to the fp8 block grid. Which modules those are is the caller's `ignored` predicate
  (quant/ignore.py's `checkpoint_ignore`: fp8 `ignored_layers`, compressed-tensors `ignore` and
  `targets`, AWQ / GPTQ `modules_to_not_convert`, ...): this layer reads no quantization code.
- KV per token per GPU: MLA caches kv_lora_rank + qk_rope_head_dim values per layer (576
  for R1), the same on every TP rank of a DP group; GQA caches K and V for
  max(1, kv_heads / TP) heads per layer.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from deepserve.config import pp_layer_range, pp_partition_env

# checkpoint module name -> whether the checkpoint leaves it unquantized (None: none is)
Ignored = Optional[Callable[[str], bool]]

FP8_BLOCK = 128
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# 4-bit Linear weights as layers/quantization_int4.py allocates them: the packed int32 weight
# [N, K/8] (half a byte per value), one scale per output row per group (in the checkpoint's
# torch_dtype: int4_scale_bytes) and, for formats storing zero points, one uint8 per scale.
# plan name -> (group size, zero points): compressed-tensors W4A16 (llm-compressor's default
# recipe, symmetric), AutoAWQ (asymmetric), GPTQ (its qzeros are always stored)
INT4_PLAN = {"w4a16": (128, False), "awq": (128, True), "gptq": (128, True), "w4a8-int8": (128, False)}
# the quant_method of the checkpoints each 4-bit plan name counts (w4a8-int8: the engine's name
# for compressed-tensors W4A8, whose weights take the bytes of W4A16)
_INT4_METHOD = {"w4a16": "compressed-tensors", "w4a8-int8": "compressed-tensors", "awq": "awq", "gptq": "gptq"}
INT8_PLAN = "w8a8-int8"
MLA_ARCHS = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
GQA_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM")
# groups of the weight breakdown, in the order they are printed
GROUPS = ("attention", "mlp", "experts", "shared_experts", "router", "embedding", "lm_head", "norms", "mtp")


@dataclass(frozen=True)
class Tensor:
    """One parameter as a rank holds it: `count` copies of a [rows, cols] matrix.
    kind: "linear" (quantized under fp8), "expert" (a routed expert's matrix: quantized with
    block scales under fp8), "high" (model dtype always), "fp32", "int32" (a 4-bit layer's
    g_idx). 4-bit scales cover `group_cols` input features when set (a row-parallel slice
    under act order keeps every group of the whole row), else `cols`. `module`: the checkpoint
    module a quantized kind belongs to (expert 0's for routed experts), which the checkpoint
    may leave unquantized (`Ignored`)."""

    group: str
    rows: int
    cols: int = 1
    kind: str = "linear"
    count: int = 1
    group_cols: int = 0
    module: str = ""

    def nbytes(self, dtype_bytes: int, quantization: Optional[str],
               int4: Optional[tuple[int, bool]] = None, scale_bytes: int = 0) -> int:
        """Bytes of the tensor; `int4`: a 4-bit plan's (group size, zero points), INT4_PLAN's
        by default; `scale_bytes`: of one 4-bit scale (default: the model dtype's)."""
        n = self.rows * self.cols
        if self.kind in ("fp32", "int32"):
            return 4 * n * self.count
        if self.kind == "linear" and quantization == "fp8":
            return (n + 4 * self.rows * math.ceil(self.cols / FP8_BLOCK)) * self.count
        if self.kind == "expert" and quantization == "fp8":
            scales = math.ceil(self.rows / FP8_BLOCK) * math.ceil(self.cols / FP8_BLOCK)
            return (n + 4 * scales) * self.count
        if self.kind in ("linear", "expert") and quantization == INT8_PLAN:
            return (n + 4 * self.rows) * self.count
        if self.kind in ("linear", "expert") and quantization in INT4_PLAN:
            group, zeros = int4 or INT4_PLAN[quantization]
            cols = self.group_cols or self.cols
            scales = self.rows * math.ceil(cols / (cols if group == -1 else group))
            return (n // 2 + scales * ((scale_bytes or dtype_bytes) + zeros)) * self.count
        return dtype_bytes * n * self.count


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: bool = False

    @property
    def ep_size(self) -> int:
        return self.tp * self.dp if self.ep else 1

    def __str__(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp} EP={self.ep_size if self.ep else 'off'}"


def int4_layout(cfg, quantization: Optional[str]) -> Optional[tuple[int, bool]]:
    """(group size, zero points) of a 4-bit plan: a model folder's own, read from its
    quantization_config as quant/int4.py reads it (-1: one scale per row), when the folder is
    of the plan's format; else INT4_PLAN's defaults. None for other plans."""
    if quantization not in INT4_PLAN:
        return None
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method != _INT4_METHOD[quantization]:
        return INT4_PLAN[quantization]
    if method in ("awq", "gptq"):
        group = qc.get("group_size", qc.get("q_group_size"))
        return (-1 if group in (None, -1) else int(group)), True
    weights = [(g.get("weights") or {}) for g in (qc.get("config_groups") or {}).values()]
    weights = [w for w in weights if w.get("num_bits") == 4]
    if not weights:
        return INT4_PLAN[quantization]
    w = weights[0]
    group = w.get("group_size") if w.get("strategy") == "group" else -1
    return (-1 if group in (None, -1) else int(group)), not w.get("symmetric", True)


def int4_scale_bytes(cfg) -> int:
    """Bytes of one 4-bit scale: the layers hold scales in the checkpoint's torch_dtype, whatever
    the model dtype (quant/int4.py `scale_dtype_of`): 4 for a float32 checkpoint, else 2."""
    return 4 if str(cfg.get("torch_dtype") or "").replace("torch.", "") == "float32" else 2


def act_order(cfg, quantization: Optional[str]) -> bool:
    """Whether a 4-bit plan's checkpoint (its config.json) reorders activations, as
    quant/int4.py reads it: GPTQ `desc_act`, compressed-tensors weights `actorder` "group" /
    "dynamic"."""
    if quantization not in INT4_PLAN:
        return False
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "gptq":
        return bool(qc.get("desc_act", False))
    if qc.get("quant_method") == "compressed-tensors":
        groups = (qc.get("config_groups") or {}).values()
        return any((g.get("weights") or {}).get("actorder") in ("group", "dynamic") for g in groups)
    return False


def static_fp8_input(cfg, quantization: Optional[str]) -> bool:
    """Whether an fp8 plan's checkpoint quantizes activations with static scales: each fp8
    Linear (one for a fused q/k/v or gate/up) then holds one fp32 `input_scale`
    (layers/quantization.py), as quant/ct_fp8.py reads the config: fp8 `activation_scheme`
    "static", compressed-tensors FP8 `input_activations` with `dynamic` false."""
    if quantization != "fp8":
        return False
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        return qc.get("activation_scheme") == "static"
    groups = (qc.get("config_groups") or {}).values() if qc.get("quant_method") == "compressed-tensors" else ()
    return any((g.get("weights") or {}).get("type") == "float" and (g.get("input_activations") or {}).get("dynamic")
               is False for g in groups)


_FUSED_PART = re.compile(r"\.(k_proj|v_proj|up_proj)$")      # q/k/v and gate/up are one Linear


def _input_scales(tensors: list[Tensor]) -> list[Tensor]:
    """One fp32 input_scale for each fp8 Linear among `tensors` (fused parts counted once)."""
    return [Tensor(t.group, 1, kind="fp32", module=t.module) for t in tensors
            if t.kind == "linear" and not _FUSED_PART.search(t.module)]


def _g_idx(group: str, *inputs: tuple[str, int], act: bool, count: int = 1) -> list[Tensor]:
    """The int32 g_idx of 4-bit layers (or experts), (checkpoint module, input features) each,
    under act order."""
    return [Tensor(group, k, kind="int32", count=count, module=m) for m, k in inputs] if act else []


# --------------------------------------------------------------------------- model tensors
def architecture(cfg) -> str:
    arch = cfg.architecture
    if arch not in MLA_ARCHS + GQA_ARCHS:
        raise ValueError(f"architecture {arch!r} has no plan arithmetic; supported: "
                         f"{', '.join(MLA_ARCHS + GQA_ARCHS)}")
    return arch


def is_moe_layer(cfg, layer: int) -> bool:
    """As models/deepseek_v3.py: dense first `first_k_dense_replace` layers and off `moe_layer_freq`."""
    return (bool(cfg.get("n_routed_experts")) and layer >= (cfg.get("first_k_dense_replace") or 0)
            and layer % (cfg.get("moe_layer_freq") or 1) == 0)


def _mlp(group: str, d: int, inter: int, tp: int, bias: bool, prefix: str, act: bool = False) -> list[Tensor]:
    local = inter // tp
    gate, up, down = (f"{prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    out = [Tensor(group, local, d, module=gate), Tensor(group, local, d, module=up),
           Tensor(group, d, local, group_cols=inter if act else 0, module=down)]
    out += _g_idx(group, (gate, d), (down, local), act=act)
    return out + ([Tensor(group, 2 * local, kind="high"), Tensor(group, d, kind="high")] if bias else [])


def _gqa_attention(cfg, tp: int, prefix: str, act: bool = False) -> list[Tensor]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    kv = cfg.get("num_key_value_heads") or h
    hd = cfg.get("head_dim") or d // h
    q, kv_local = h * hd // tp, max(kv, tp) * hd // tp   # KV heads replicated when TP > kv heads
    bias = bool(cfg.get("attention_bias", False))
    qkv_bias = bias or cfg.architecture == "Qwen2ForCausalLM"
    name = {p: f"{prefix}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    out = [Tensor("attention", q, d, module=name["q_proj"]), Tensor("attention", kv_local, d, module=name["k_proj"]),
           Tensor("attention", kv_local, d, module=name["v_proj"]),
           Tensor("attention", d, h * hd // tp, group_cols=h * hd if act else 0, module=name["o_proj"])]
    out += _g_idx("attention", (name["q_proj"], d), (name["o_proj"], h * hd // tp), act=act)   # fused q/k/v, o
    if qkv_bias:
        out.append(Tensor("attention", q + 2 * kv_local, kind="high"))
    if bias and cfg.architecture != "Qwen2ForCausalLM":
        out.append(Tensor("attention", d, kind="high"))   # o_proj bias, replicated
    return out


def _mla_attention(cfg, tp: int, prefix: str, act: bool = False) -> list[Tensor]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q_lora, kv_lora = cfg.get("q_lora_rank"), cfg.kv_lora_rank
    bias = bool(cfg.get("attention_bias", False))
    name = {p: f"{prefix}.self_attn.{p}" for p in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")}
    out = []
    if q_lora is None:
        out.append(Tensor("attention", h * qk // tp, d, module=name["q_proj"]))
        q_inputs = [(name["q_proj"], d)]
    else:  # q_a (replicated) -> q_a_layernorm -> q_b (column-parallel over heads)
        out += [Tensor("attention", q_lora, d, module=name["q_a_proj"]), Tensor("norms", q_lora, kind="high"),
                Tensor("attention", h * qk // tp, q_lora, module=name["q_b_proj"])]
        out += [Tensor("attention", q_lora, kind="high")] if bias else []
        q_inputs = [(name["q_a_proj"], d), (name["q_b_proj"], q_lora)]
    out += [Tensor("attention", kv_lora + cfg.qk_rope_head_dim, d, module=name["kv_a_proj_with_mqa"]),
            Tensor("norms", kv_lora, kind="high"),
            Tensor("attention", h * (cfg.qk_nope_head_dim + cfg.v_head_dim) // tp, kv_lora, kind="high"),
            Tensor("attention", d, h * cfg.v_head_dim // tp, group_cols=h * cfg.v_head_dim if act else 0,
                   module=name["o_proj"])]
    # q_proj or q_a + q_b, kv_a, o_proj (kv_b_proj stays in the model dtype)
    out += _g_idx("attention", *q_inputs, (name["kv_a_proj_with_mqa"], d),
                  (name["o_proj"], h * cfg.v_head_dim // tp), act=act)
    if bias:
        out += [Tensor("attention", kv_lora + cfg.qk_rope_head_dim, kind="high"), Tensor("attention", d, kind="high")]
    return out


def _moe(cfg, layout: Layout, quantization: Optional[str], prefix: str, act: bool = False) -> list[Tensor]:
    d, e, inter = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    v3 = cfg.get("model_type") == "deepseek_v3"
    out = [Tensor("router", e, d, kind="fp32")]
    if (cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")) == "noaux_tc":
        out.append(Tensor("router", e, kind="fp32"))   # e_score_correction_bias
    if layout.ep:
        n, local = e // layout.ep_size, inter
    else:
        n, local = e, inter // layout.tp
    if quantization == "fp8" and local == inter:
        local = math.ceil(inter / FP8_BLOCK) * FP8_BLOCK   # whole experts: padded to the block grid
    gate, up, down = (f"{prefix}.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    out += [Tensor("experts", local, d, "expert", n, module=gate), Tensor("experts", local, d, "expert", n, module=up),
            Tensor("experts", d, local, "expert", n, group_cols=inter if act else 0, module=down)]
    out += _g_idx("experts", (gate, d), (down, local), act=act, count=n)       # gate and up share one; down
    shared = cfg.get("n_shared_experts") or 0
    if shared:
        out += _mlp("shared_experts", d, inter * shared, layout.tp, bool(cfg.get("mlp_bias", False)),
                    f"{prefix}.mlp.shared_experts", act)
    return out


def layer_tensors(cfg, layer: int, layout: Layout, quantization: Optional[str] = None,
                  ignored: Ignored = None) -> list[Tensor]:
    """What one rank of `layout` holds of decoder layer `layer`, the modules `ignored` names
    unquantized."""
    d, prefix = cfg.hidden_size, f"model.layers.{layer}"
    mla = architecture(cfg) in MLA_ARCHS
    act = act_order(cfg, quantization)
    ignore = ignored if quantization else None
    out = _mla_attention(cfg, layout.tp, prefix, act) if mla else _gqa_attention(cfg, layout.tp, prefix, act)
    out += [Tensor("norms", d, kind="high"), Tensor("norms", d, kind="high")]
    if mla and is_moe_layer(cfg, layer):
        # experts the checkpoint leaves unquantized are not padded to the fp8 block grid either
        experts_kept = ignore and ignore(f"{prefix}.mlp.experts.0.gate_proj")
        out += _moe(cfg, layout, None if experts_kept else quantization, prefix, act)
    else:
        out += _mlp("mlp", d, cfg.intermediate_size, layout.tp, bool(cfg.get("mlp_bias", False)), f"{prefix}.mlp",
                    act)
    out = _keep_ignored(out, ignore)
    return out + (_input_scales(out) if static_fp8_input(cfg, quantization) else [])


def _keep_ignored(tensors: list[Tensor], ignore: Ignored) -> list[Tensor]:
    """`tensors` with the quantized kinds of the modules the checkpoint leaves unquantized in the
    model dtype, and without their 4-bit g_idx."""
    if not ignore:
        return tensors
    out = []
    for t in tensors:
        if t.module and ignore(t.module) and t.kind != "high":
            if t.kind == "int32":
                continue
            t = dataclasses.replace(t, kind="high", group_cols=0)
        out.append(t)
    return out


VOCAB_ROWS_MULTIPLE = 64
"""The vocabulary's rows are padded to a multiple of this before the TP split (vLLM's padding):
an LM head GEMM whose output width is odd (a vocabulary of 128,815) gets a cuBLAS kernel
without Hopper's tensor-core path."""


def vocab_slice_rows(vocab_size: int, tp: int) -> int:
    """Rows of each TP rank's vocabulary slice: the vocabulary padded to VOCAB_ROWS_MULTIPLE,
    split in equal slices (the last rank's padded further where TP does not divide it)."""
    padded = -(-vocab_size // VOCAB_ROWS_MULTIPLE) * VOCAB_ROWS_MULTIPLE
    return -(-padded // tp)


def vocab_rows(cfg, tp: int) -> int:
    return vocab_slice_rows(cfg.vocab_size, tp)


def mtp_tensors(cfg, layout: Layout, quantization: Optional[str] = None, ignored: Ignored = None) -> list[Tensor]:
    """DeepSeek MTP modules (models/deepseek_mtp.py): own embedding, enorm/hnorm, eh_proj
    [D, 2D], one MoE decoder layer, shared_head norm + head."""
    d, rows = cfg.hidden_size, vocab_rows(cfg, layout.tp)
    out = []
    for i in range(int(cfg.get("num_nextn_predict_layers") or 0)):
        block = layer_tensors(cfg, cfg.num_hidden_layers + i, layout, quantization, ignored)
        out += [dataclasses.replace(t, group="mtp") for t in block]
        out += [Tensor("mtp", rows, d, kind="high"), Tensor("mtp", d, kind="high"), Tensor("mtp", d, kind="high"),
                Tensor("mtp", d, 2 * d, kind="high"), Tensor("mtp", d, kind="high"),
                Tensor("mtp", rows, d, kind="high")]
    return out


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges per PP stage, as the engine splits them (pp_layer_range:
    the remainder on the first stages, or VLLM_PP_LAYER_PARTITION). One stage holds every layer:
    the plan counts the whole model that way whatever the variable gives (structural_problem
    refuses a layout of another stage count)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pipeline-parallel size {pp} must be in [1, num_hidden_layers={num_layers}]")
    if pp == 1:
        return [range(num_layers)]
    return [pp_layer_range(num_layers, pp, rank) for rank in range(pp)]


def stage_tensors(cfg, layout: Layout, stage: int, include_mtp: bool = False,
                  quantization: Optional[str] = None, ignored: Ignored = None) -> list[Tensor]:
    """Every tensor one rank of PP stage `stage` holds."""
    d, rows = cfg.hidden_size, vocab_rows(cfg, layout.tp)
    out = []
    if stage == 0:
        out.append(Tensor("embedding", rows, d, kind="high"))
    for layer in stage_layers(cfg.num_hidden_layers, layout.pp)[stage]:
        out += layer_tensors(cfg, layer, layout, quantization, ignored)
    if stage == layout.pp - 1:
        out.append(Tensor("norms", d, kind="high"))
        # a tied head shares the embedding's storage only when both sit on the same stage
        if not cfg.get("tie_word_embeddings", False) or layout.pp > 1:
            out.append(Tensor("lm_head", rows, d, kind="high"))
        if include_mtp:
            out += mtp_tensors(cfg, layout, quantization, ignored)
    return out


def weight_breakdown(cfg, layout: Layout, dtype: str = "bfloat16", quantization: Optional[str] = None,
                     include_mtp: bool = False, ignored: Ignored = None) -> list[dict[str, int]]:
    """Bytes per GPU by group (GROUPS), one dict per PP stage; the modules `ignored` names (the
    checkpoint leaves them unquantized) in the model dtype."""
    if quantization not in (None, "fp8", INT8_PLAN, *INT4_PLAN):
        # counting its weights in the model dtype would be a wrong figure, not an estimate
        raise ValueError(f"quantization {quantization!r} has no plan arithmetic")
    dtype_bytes = DTYPE_BYTES[dtype]
    int4 = int4_layout(cfg, quantization)
    scale_bytes = int4_scale_bytes(cfg)
    stages = []
    for stage in range(layout.pp):
        groups = dict.fromkeys(GROUPS, 0)
        for t in stage_tensors(cfg, layout, stage, include_mtp, quantization, ignored):
            groups[t.group] += t.nbytes(dtype_bytes, quantization, int4, scale_bytes)
        stages.append(groups)
    return stages


def weight_bytes_per_gpu(cfg, layout: Layout, dtype: str = "bfloat16", quantization: Optional[str] = None,
                         include_mtp: bool = False, ignored: Ignored = None) -> int:
    """Weight bytes on the most loaded GPU (the heaviest PP stage)."""
    return max(sum(s.values()) for s in weight_breakdown(cfg, layout, dtype, quantization, include_mtp, ignored))


def param_count(cfg, include_mtp: bool = False) -> int:
    """Parameters of the unsharded model (tied head counted once)."""
    one = Layout(1, 1, 1)
    return sum(t.rows * t.cols * t.count for t in stage_tensors(cfg, one, 0, include_mtp))


def kv_bytes_per_token_layer(cfg, tp: int, kv_dtype_bytes: int) -> int:
    """KV cache bytes one GPU stores per token for one layer."""
    if architecture(cfg) in MLA_ARCHS:
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * kv_dtype_bytes   # latent, on every TP rank
    h = cfg.num_attention_heads
    kv = cfg.get("num_key_value_heads") or h
    hd = cfg.get("head_dim") or cfg.hidden_size // h
    return 2 * max(1, kv // tp) * hd * kv_dtype_bytes


def stage_kv_layers(cfg, layout: Layout, stage: int, include_mtp: bool) -> int:
    n = len(stage_layers(cfg.num_hidden_layers, layout.pp)[stage])
    if include_mtp and stage == layout.pp - 1:
        n += int(cfg.get("num_nextn_predict_layers") or 0)
    return n


INT4_PACK = 8   # 4-bit values per int32 (ops/int4.py PACK)


def fp8_scales_uniform_in_k(cfg) -> bool:
    """Whether a folder's fp8 Linear scales are one value a row or tensor (compressed-tensors
    "tensor" / "channel", fp8 without weight_block_size), which layers/quantization.py splits
    anywhere, as quant/ct_fp8.py reads the config."""
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") == "fp8":
        return not qc.get("weight_block_size")
    groups = (qc.get("config_groups") or {}).values() if qc.get("quant_method") == "compressed-tensors" else ()
    weights = [g.get("weights") or {} for g in groups]
    return bool(weights) and all(w.get("type") == "float" and w.get("strategy") in ("tensor", "channel")
                                 for w in weights)


def split_problem(cfg, layout: Layout, quantization: Optional[str], ignored: Ignored = None) -> Optional[str]:
    """Why a quantized plan's layers cannot be split as `layout` splits them, as the engine's
    quantized layers refuse them: fp8 row-parallel slices that are not whole 128-wide blocks
    (layers/quantization.py; per-tensor / per-channel scales split anywhere); a 4-bit group
    size that does not divide a layer's input features,
    or slices that are not whole int32 words or, without act order, not whole groups
    (layers/quantization_int4.py, moe_int4.py). None when they can."""
    if quantization not in INT4_PLAN and quantization != "fp8":
        return None
    group, _ = int4_layout(cfg, quantization) or (0, False)
    act = act_order(cfg, quantization)
    uniform = quantization == "fp8" and fp8_scales_uniform_in_k(cfg)
    one = Layout(1, 1, 1)
    for layer in range(cfg.num_hidden_layers):
        whole = layer_tensors(cfg, layer, one, quantization, ignored)
        local = layer_tensors(cfg, layer, layout, quantization, ignored)
        for full, t in zip(whole, local):
            if t.kind not in ("linear", "expert"):
                continue
            name = t.module.replace(".experts.0.", ".experts.*.") if t.kind == "expert" else t.module
            if quantization == "fp8":
                if t.kind == "linear" and t.cols != full.cols and t.cols % FP8_BLOCK and not uniform:
                    return f"{name}: {t.cols} input features per GPU are not whole fp8 blocks of {FP8_BLOCK}"
                continue
            g = full.cols if group == -1 else group
            if full.cols % g:
                return f"4-bit group size {g} does not divide the {full.cols} input features of {name}"
            if t.cols % INT4_PACK:
                return f"{name}: {t.cols} input features per GPU are not whole int32s of {INT4_PACK} 4-bit values"
            if not act and g != full.cols and t.cols % g:
                return f"{name}: {t.cols} input features per GPU are not whole {g}-wide 4-bit groups"
    return None


def structural_problem(cfg, layout: Layout, quantization: Optional[str], ignored: Ignored = None) -> Optional[str]:
    """Why the layout cannot be built at all (divisibility), or None."""
    tp, h = layout.tp, cfg.num_attention_heads
    if h % tp:
        return f"num_attention_heads {h} not divisible by TP {tp}"
    mla = architecture(cfg) in MLA_ARCHS
    if not mla:
        kv = cfg.get("num_key_value_heads") or h
        if kv % tp and tp % kv:
            return f"num_key_value_heads {kv} and TP {tp}: neither divides the other"
    if layout.pp > cfg.num_hidden_layers:
        return f"PP {layout.pp} > num_hidden_layers {cfg.num_hidden_layers}"
    partition = pp_partition_env()   # serve refuses a layout whose stages it does not count (as vLLM)
    if partition is not None and len(partition) != layout.pp:
        return (f"VLLM_PP_LAYER_PARTITION={','.join(map(str, partition))} gives {len(partition)} "
                f"stage{'s' if len(partition) > 1 else ''}, not PP {layout.pp}")
    splits = {"intermediate_size": cfg.intermediate_size}
    if mla and cfg.get("n_routed_experts"):
        e = cfg.n_routed_experts
        if layout.ep and e % layout.ep_size:
            return f"n_routed_experts {e} not divisible by EP size {layout.ep_size}"
        splits["moe_intermediate_size x n_shared_experts"] = cfg.moe_intermediate_size * (cfg.get("n_shared_experts") or 0)
        if not layout.ep:
            splits["moe_intermediate_size"] = cfg.moe_intermediate_size
    # per-tensor / per-channel fp8 Linears split anywhere; routed experts keep 128x128 blocks
    uniform = quantization == "fp8" and fp8_scales_uniform_in_k(cfg)
    for name, size in splits.items():
        if size % tp:
            return f"{name} {size} not divisible by TP {tp}"
        if quantization == "fp8" and size and tp > 1 and (size // tp) % FP8_BLOCK \
                and not (uniform and name != "moe_intermediate_size"):
            return f"{name} / TP = {size // tp} is not a multiple of the fp8 block {FP8_BLOCK}"
    return split_problem(cfg, layout, quantization, ignored)
