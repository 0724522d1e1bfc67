"""DeepSeek-V2 / V2-Lite / V3 / R1 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`).

One implementation for the family (DeepSeek-V2 arXiv 2405.04434, DeepSeek-V3 arXiv 2412.19437),
matching `transformers`' modeling_deepseek_v2.py / modeling_deepseek_v3.py. It branches on
config fields only:

- attention: MLA (layers/mla.py), with `q_lora_rank` null (V2-Lite: one q_proj) or a q
  low-rank pair; decoupled RoPE on qk_rope_head_dim, interleaved pairs unless
  `rope_interleave` is false; YaRN `rope_scaling` with its softmax-scale correction;
- MLP: dense for the first `first_k_dense_replace` layers (and off `moe_layer_freq`), else
  routed experts (layers/moe.py) + `n_shared_experts` shared experts as one dense MLP (in one
  process with 16-bit weights, passed into the routed experts' op as one more expert);
  routing by `scoring_func`, `topk_method`, `n_group`, `topk_group`, `norm_topk_prob`,
  `routed_scaling_factor` (ops/moe.py). Configs written by `transformers` may omit
  scoring_func/topk_method: the defaults are those of its classes (V3 sigmoid + noaux_tc,
  V2 softmax + greedy), chosen by `model_type`.
- MTP: R1 checkpoints carry `model.layers.{num_hidden_layers}.*`, a multi-token-prediction
  module. With `load_mtp=True` it loads into `self.mtp` (models/deepseek_mtp.py); otherwise
  those tensors are skipped on purpose (see `_rename`).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.config import HFConfig
from deepserve.distributed.parallel_state import ParallelContext, single_process
from deepserve.layers.attention import AttentionMetadata
from deepserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from deepserve.layers.mla import MLAAttention
from deepserve.layers.moe import EXPERT_SHARDS, FP8_BLOCK, Fp8Experts, FusedMoE, MoEGate, UnquantizedExperts
from deepserve.layers.norm import RMSNorm
from deepserve.layers.quantization import Fp8BlockLinearMethod
from deepserve.layers.rotary import RotaryEmbedding, yarn_softmax_scale
from deepserve.models.llama import LlamaMLP
from deepserve.models.weights import load_params, named_as_checkpoint

# an expert tensor: its weight, fp8 scale_inv, or 4-bit parts (AWQ / GPTQ, compressed-tensors)
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\."
                        r"(weight|weight_scale_inv|input_scale|qweight|qzeros|scales|weight_packed|weight_scale|weight_zero_point|g_idx|"
                        r"weight_g_idx)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# a module of MTP layer i, as the model names it
_MTP_MODULE_RE = re.compile(r"^mtp\.(\d+)\.(?:mtp_block\.)?(.+)$")
_MTP_NAME_RE = re.compile(r"\bmtp\.(\d+)\.(?:mtp_block\.)?")
# top-level parts of an MTP layer that are not its transformer block
MTP_OWN_PARTS = ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head")


def routing_settings(cfg: HFConfig) -> dict:
    """Keyword arguments of `ops.moe_route` from the config."""
    v3 = cfg.get("model_type") == "deepseek_v3"
    return dict(top_k=cfg.num_experts_per_tok,
                scoring_func=cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax"),
                topk_method=cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy"),
                n_group=cfg.get("n_group"), topk_group=cfg.get("topk_group"),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0))


def build_rotary(cfg: HFConfig) -> RotaryEmbedding:
    """One cos/sin cache shared by every layer (R1: 163840 positions x 64 dims)."""
    return RotaryEmbedding(cfg.qk_rope_head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                           cfg.rope_scaling, is_neox_style=not cfg.get("rope_interleave", True))


def is_moe_layer(cfg: HFConfig, layer_idx: int) -> bool:
    return (bool(cfg.get("n_routed_experts")) and layer_idx >= (cfg.get("first_k_dense_replace") or 0)
            and layer_idx % (cfg.get("moe_layer_freq") or 1) == 0)


def _fp8_block_128(linear) -> bool:
    """An e4m3 linear with DeepSeek's 128x128 block scales (row-expanded) and no bias, its
    activations quantised per token group (not weight only, nor with static scales)."""
    method = linear.quant_method
    return (isinstance(method, Fp8BlockLinearMethod) and method.block == (FP8_BLOCK, FP8_BLOCK)
            and not method.weight_only and not method.static_input
            and linear.bias is None and linear.weight.dtype == torch.float8_e4m3fn)


class DeepseekMoE(nn.Module):
    """Routed experts plus the shared experts beside them: x [T, D] -> [T, D]."""

    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, cfg: HFConfig, dtype: torch.dtype, pctx: ParallelContext):
        super().__init__()
        self.route = routing_settings(cfg)
        if self.route["topk_method"] != "greedy" and (self.route["n_group"] or 1) > 1 \
                and not self.route["topk_group"]:
            raise ValueError(f"topk_method {self.route['topk_method']!r} with n_group "
                             f"{self.route['n_group']} needs topk_group, got {self.route['topk_group']!r}")
        num_experts = cfg.n_routed_experts
        self.gate = MoEGate(cfg.hidden_size, num_experts, self.route["topk_method"] == "noaux_tc")
        self.experts = FusedMoE(num_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype, pctx)
        n_shared = cfg.get("n_shared_experts") or 0
        self.shared_experts = (LlamaMLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared, dtype, pctx,
                                        bool(cfg.get("mlp_bias", False))) if n_shared else None)
        # whether the shared experts run inside the routed experts' op, decided after loading,
        # and the weights (with fp8 experts their scales) the op then takes
        self.shared_in_experts = False
        self.shared_kwargs: dict = {}

    def process_weights_after_loading(self) -> None:
        """The shared experts run inside the routed experts' op (one more expert of weight 1.0:
        at decode it saves three launches a layer) when that sums the same thing: one process
        (tp 1, ep 1, so no reduction between the routed and shared sums), and either 16-bit
        routed experts with unquantized 16-bit shared weights without bias, or fp8 routed
        experts (activations quantised per token group) with block-fp8 shared weights (128x128
        blocks, no bias, dynamic activations)."""
        p, mlp = self.experts.pctx, self.shared_experts
        one_process = p.tp_size == 1 and p.ep_size == 1 and mlp is not None
        fp8 = isinstance(self.experts.quant, Fp8Experts)
        if fp8 and self.experts.quant.static_input:
            one_process = False     # the shared MLP keeps its own static scales beside the experts
        if fp8:
            self.shared_in_experts = one_process and all(_fp8_block_128(lin) for lin in (mlp.gate_up_proj,
                                                                                         mlp.down_proj))
        else:
            weights = (None,) if mlp is None else (mlp.gate_up_proj.plain_weight(), mlp.down_proj.plain_weight())
            self.shared_in_experts = (one_process and isinstance(self.experts.quant, UnquantizedExperts)
                                      and all(w is not None and w.dtype in (torch.bfloat16, torch.float16)
                                              for w in weights))
        self.shared_kwargs = {}
        if self.shared_in_experts:
            up, down = mlp.gate_up_proj, mlp.down_proj
            self.shared_kwargs = dict(shared_w13=up.weight, shared_w2=down.weight)
            if fp8:
                self.shared_kwargs.update(shared_w13_scale=up.weight_scale_inv, shared_w2_scale=down.weight_scale_inv)

    def forward(self, x: torch.Tensor, dp_num_tokens: Optional[list[int]] = None) -> torch.Tensor:
        # the gate and the shared experts see this DP rank's tokens only; with DP attention +
        # EP the routed experts exchange tokens across the DP group (layers/moe.py)
        weights, ids = self.ops.moe_route(self.gate(x), self.gate.e_score_correction_bias, **self.route)
        if self.shared_in_experts:
            return self.experts(x, weights, ids, dp_num_tokens, **self.shared_kwargs)
        out = self.experts(x, weights, ids, dp_num_tokens)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, cfg: HFConfig, layer_idx: int, rotary: RotaryEmbedding, dtype: torch.dtype,
                 pctx: ParallelContext):
        super().__init__()
        qk_head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.self_attn = MLAAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.get("q_lora_rank"), cfg.kv_lora_rank,
            cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, rotary,
            yarn_softmax_scale(qk_head_dim, cfg.rope_scaling), bool(cfg.get("attention_bias", False)),
            dtype, pctx)
        self.is_moe = is_moe_layer(cfg, layer_idx)
        if self.is_moe:
            self.mlp = DeepseekMoE(cfg, dtype, pctx)
        else:
            self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, dtype, pctx,
                                bool(cfg.get("mlp_bias", False)))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def before_attention(self, positions, x, residual: Optional[torch.Tensor]):
        """The input norm (adding the residual) and MLA's inputs -> (parts, residual)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(x), residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor,
                        dp_num_tokens: Optional[list[int]] = None):
        """o_proj, the post-attention norm and the MLP or MoE -> (x, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return (self.mlp(x, dp_num_tokens) if self.is_moe else self.mlp(x)), residual

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata,
                dp_num_tokens: Optional[list[int]] = None):
        parts, residual = self.before_attention(positions, x, residual)
        return self.after_attention(self.self_attn.attend(positions, parts, meta), residual, dp_num_tokens)


class DeepseekV3ForCausalLM(nn.Module):
    # checkpoint name part -> (fused parameter name part, shard id); dense and shared MLPs
    stacked_params = [("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1)]

    def __init__(self, cfg: HFConfig, dtype: torch.dtype = torch.float32,
                 pctx: Optional[ParallelContext] = None, load_mtp: bool = False):
        super().__init__()
        pctx = pctx or single_process()
        self.pctx = pctx
        self.config = cfg
        rotary = build_rotary(cfg)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pctx)
        self.model.layers = nn.ModuleList(DeepseekDecoderLayer(cfg, i, rotary, dtype, pctx)
                                          for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, pctx)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.num_mtp_layers = int(cfg.get("num_nextn_predict_layers") or 0)
        self.mtp: Optional[nn.ModuleList] = None
        if load_mtp:
            if not self.num_mtp_layers:
                raise ValueError("load_mtp needs num_nextn_predict_layers >= 1 in config.json, got "
                                 f"{cfg.get('num_nextn_predict_layers')!r}")
            from deepserve.models.deepseek_mtp import DeepseekMTP  # imports this module's layers
            self.mtp = nn.ModuleList(DeepseekMTP(cfg, cfg.num_hidden_layers + i, rotary, dtype, pctx)
                                     for i in range(self.num_mtp_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                dp_num_tokens: Optional[list[int]] = None) -> torch.Tensor:
        """`dp_num_tokens`: every DP rank's token count this step, which MoE layers need with DP
        attention + EP; the runner knows it, other callers leave it None and it is gathered."""
        if self.pctx.moe_dp_exchange and dp_num_tokens is None:
            dp_num_tokens = self.pctx.dp_token_counts(input_ids.shape[0], input_ids.device)
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, meta, dp_num_tokens)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ weights
    def _rename(self, name: str) -> Optional[str]:
        if "rotary_emb.inv_freq" in name:
            return None
        if self.tie_word_embeddings and name == "lm_head.weight":
            return None
        m = _LAYER_RE.match(name)
        if m is None or int(m[1]) < self.config.num_hidden_layers:
            return name
        # Layers past num_hidden_layers are the MTP module(s) R1 checkpoints carry
        # (model.layers.61.*), or layers an hf_overrides cut of num_hidden_layers dropped.
        # They belong to no main-model parameter: skip them on purpose, unless the MTP was
        # asked for, and then route them to self.mtp, never into self.model.
        index = int(m[1]) - self.config.num_hidden_layers
        if self.mtp is None or index >= len(self.mtp):
            return None
        rest = m[2]
        block = "" if rest.split(".")[0] in MTP_OWN_PARTS else "mtp_block."
        return f"mtp.{index}.{block}{rest}"

    def checkpoint_module(self, name: str) -> str:
        """The checkpoint's name for model module `name`: `_rename` backwards for the MTP
        layers (`mtp.0.mtp_block.mlp.shared_experts.down_proj` is R1's
        `model.layers.61.mlp.shared_experts.down_proj`), so a quantization described per
        checkpoint module (msModelSlim's description, a 4-bit skip list) reaches them too."""
        m = _MTP_MODULE_RE.match(name)
        if m is None:
            return name
        return f"model.layers.{self.config.num_hidden_layers + int(m[1])}.{m[2]}"

    def checkpoint_names(self, text: str) -> str:
        """`text` (an error) with the MTP layers' module names as the checkpoint's: a tensor a
        loader refuses as `mtp.0.mtp_block.mlp.experts.3.down_proj.weight_scale_inv` is R1's
        `model.layers.61.mlp.experts.3.down_proj.weight_scale_inv`, the name a user can find."""
        return _MTP_NAME_RE.sub(lambda m: f"model.layers.{self.config.num_hidden_layers + int(m[1])}.", text)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        try:
            return load_deepseek_weights(self, weights, self.stacked_params, self._rename)
        except ValueError as exc:
            if self.mtp is None:
                raise
            raise ValueError(self.checkpoint_names(str(exc))) from exc


def load_deepseek_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                          stacked_params, rename) -> set[str]:
    """`load_params`, with per-expert tensors (`...mlp.experts.{e}.gate_proj.weight`, and with
    fp8 experts their `.weight_scale_inv`) sent to the stacked expert parameters with shard id
    (e, "w1"|"w3"|"w2"). Every expert of every stacked parameter must come: a checkpoint that
    lacks one (a scale included) is refused naming the first missing tensor."""
    params = dict(module.named_parameters())
    experts_loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, str]]] = {}

    def others():
        for name, tensor in weights:
            name = rename(name)
            if name is None:
                continue
            m = _EXPERT_RE.match(name)
            if m is None:
                yield name, tensor
                continue
            stacked, part = EXPERT_SHARDS[m[3]]
            target = f"{m[1]}.{stacked.split('_')[0]}_{m[4]}"        # w13_weight, w13_qweight, ...
            if target not in params:
                what = "routed experts" if m[4] == "weight" else f"expert {m[4]} tensors"
                raise ValueError(f"checkpoint tensor {name} has no matching model parameter "
                                 f"(no {what} at {m[1]})")
            param = params[target]
            with named_as_checkpoint(target, name):
                param.weight_loader(param, tensor, (int(m[2]), part))
            experts_loaded.add(target)
            expert_parts.setdefault(target, set()).add((int(m[2]), m[3]))

    loaded = load_params(module, others(), stacked_params, lambda n: n)
    _check_every_expert(module, expert_parts)
    return loaded | experts_loaded


def _check_every_expert(module: nn.Module, expert_parts: dict[str, set[tuple[int, str]]]) -> None:
    """Each stacked expert parameter that received any tensor received all of its experts'."""
    for target, seen in expert_parts.items():
        prefix, stacked = target.rsplit(".", 1)
        experts = module.get_submodule(prefix)
        which, suffix = stacked.split("_", 1)                       # "w13", "weight_scale_inv"
        projections = [n for n, (s, _) in EXPERT_SHARDS.items() if s.split("_")[0] == which]
        for e in range(experts.num_experts):
            for proj in projections:
                if (e, proj) not in seen:
                    raise ValueError(f"checkpoint lacks tensor {prefix}.{e}.{proj}.{suffix}")
