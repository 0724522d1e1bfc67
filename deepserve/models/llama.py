"""Llama (GQA, llama3 rope scaling) and Qwen2 (the same with q/k/v biases), for the
R1-Distill-Llama and R1-Distill-Qwen models. Parameter names are Hugging Face's; q/k/v
and gate/up are fused into one GEMM each at load time (`stacked_params`).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.config import HFConfig
from deepserve.distributed.parallel_state import ParallelContext, divide, single_process
from deepserve.layers.attention import Attention, AttentionMetadata
from deepserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from deepserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.models.weights import load_params


class LlamaMLP(nn.Module):
    ops: OpTable = REFERENCE_OPS  # the model runner's table after `ops.bind`

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, pctx: ParallelContext,
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2, bias, dtype, pctx)
        self.down_proj = RowParallelLinear(intermediate, hidden, bias, dtype, pctx)

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: HFConfig, dtype: torch.dtype, pctx: ParallelContext, qkv_bias: bool,
                 o_bias: bool):
        super().__init__()
        hidden = cfg.hidden_size
        total_heads = cfg.num_attention_heads
        total_kv = cfg.get("num_key_value_heads") or total_heads
        self.head_dim = cfg.get("head_dim") or hidden // total_heads
        self.num_heads = divide(total_heads, pctx.tp_size, "num_attention_heads")
        self.num_kv_heads = max(1, total_kv // pctx.tp_size)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv, qkv_bias, dtype, pctx)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, o_bias, dtype, pctx)
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                                          cfg.rope_scaling, is_neox_style=True)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5)

    def project(self, positions, x) -> tuple[torch.Tensor, ...]:
        """x [T, D] -> the attention's inputs: q [T, H, hd], k [T, Hk, hd] (both rotated), v [T, Hk, hd]."""
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v.view(-1, self.num_kv_heads, self.head_dim)

    def attend(self, positions, parts: tuple[torch.Tensor, ...], meta: AttentionMetadata,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Paged attention over `project`'s parts -> [T, H * hd], o_proj's input (written into
        `out` when given). The part of a layer that piecewise CUDA graphs leave eager
        (engine/piecewise_graphs.py)."""
        return self.attn(*parts, meta, out=out)

    def forward(self, positions, x, meta: AttentionMetadata):
        return self.o_proj(self.attend(positions, self.project(positions, x), meta))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: HFConfig, dtype: torch.dtype, pctx: ParallelContext, qkv_bias: bool,
                 o_bias: bool):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.self_attn = LlamaAttention(cfg, dtype, pctx, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype)
        self.mlp = LlamaMLP(cfg.hidden_size, cfg.intermediate_size, dtype, pctx, cfg.get("mlp_bias", False))

    def before_attention(self, positions, x, residual: Optional[torch.Tensor]):
        """The input norm (adding the residual) and the attention's inputs -> (parts, residual)."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(positions, x), residual

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor):
        """o_proj, the post-attention norm and the MLP -> (x, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return self.mlp(x), residual

    def forward(self, positions, x, residual: Optional[torch.Tensor], meta: AttentionMetadata):
        parts, residual = self.before_attention(positions, x, residual)
        return self.after_attention(self.self_attn.attend(positions, parts, meta), residual)


class LlamaForCausalLM(nn.Module):
    qkv_bias = False  # Qwen2: q/k/v always carry biases, o_proj never
    # checkpoint name part -> (fused parameter name part, shard id)
    stacked_params = [("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"),
                      ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1)]

    def __init__(self, cfg: HFConfig, dtype: torch.dtype = torch.float32,
                 pctx: Optional[ParallelContext] = None):
        super().__init__()
        pctx = pctx or single_process()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, pctx)
        attention_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = self.qkv_bias or attention_bias
        o_bias = attention_bias and not self.qkv_bias
        self.model.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype, pctx, qkv_bias, o_bias)
                                          for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, pctx)
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(name: str) -> Optional[str]:
            if "rotary_emb.inv_freq" in name:
                return None
            if self.tie_word_embeddings and name == "lm_head.weight":
                return None  # tied: the embedding is the head
            return name
        return load_params(self, weights, self.stacked_params, rename)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
