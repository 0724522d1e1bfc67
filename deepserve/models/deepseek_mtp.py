"""DeepSeek-V3 / R1 multi-token prediction (MTP) module (DeepSeek-V3 arXiv 2412.19437, 2.2).

R1 checkpoints carry it as `model.layers.{num_hidden_layers}.*`: its own embed_tokens,
`enorm` (for the next token's embedding), `hnorm` (for the main model's hidden state),
`eh_proj` [D, 2D] combining them, one full decoder layer (MLA + MoE, here `mtp_block`),
and `shared_head.norm` / `shared_head.head` giving logits. It predicts token t+2 from the
main model's final hidden state at t and the embedding of token t+1, so speculative
decoding can draft one extra token per step.

Parameter names follow the checkpoint with the `model.layers.N.` prefix dropped (the block's
tensors under `mtp_block.`); `DeepseekV3ForCausalLM(load_mtp=True)` fills them in the same
pass as the main model, `DeepseekMTP.load_weights` fills a standalone one.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from deepserve.config import HFConfig
from deepserve.distributed.parallel_state import ParallelContext, single_process
from deepserve.layers.attention import AttentionMetadata
from deepserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from deepserve.layers.linear import ReplicatedLinear
from deepserve.layers.norm import RMSNorm
from deepserve.layers.rotary import RotaryEmbedding
from deepserve.models.deepseek_v3 import (MTP_OWN_PARTS, DeepseekDecoderLayer, DeepseekV3ForCausalLM,
                                          build_rotary, load_deepseek_weights)


class SharedHead(nn.Module):
    def __init__(self, cfg: HFConfig, dtype: torch.dtype, pctx: ParallelContext):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, pctx)


class DeepseekMTP(nn.Module):
    def __init__(self, cfg: HFConfig, layer_idx: int, rotary: Optional[RotaryEmbedding] = None,
                 dtype: torch.dtype = torch.float32, pctx: Optional[ParallelContext] = None):
        super().__init__()
        pctx = pctx or single_process()
        self.pctx = pctx
        self.layer_idx = layer_idx
        d = cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, d, dtype, pctx)
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        self.eh_proj = ReplicatedLinear(2 * d, d, False, dtype)
        self.mtp_block = DeepseekDecoderLayer(cfg, layer_idx, rotary or build_rotary(cfg), dtype, pctx)
        self.shared_head = SharedHead(cfg, dtype, pctx)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, previous_hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] (tokens t+1), previous_hidden [T, D] (the main model's output at t, or
        this module's own output at t for drafts past the first) -> [T, D], before
        shared_head.norm: drafting k > 1 tokens feeds it back as previous_hidden (as vLLM).
        With DP attention + EP its MoE layer exchanges tokens with the other DP ranks' MTP
        forwards, so every DP rank runs as many of them per step (engine/spec_decode.py)."""
        dp_num_tokens = None
        if self.pctx.moe_dp_exchange:
            dp_num_tokens = self.pctx.dp_token_counts(input_ids.shape[0], input_ids.device)
        e = self.enorm(self.embed_tokens(input_ids))
        h = self.hnorm(previous_hidden)
        x = self.eh_proj(torch.cat((e, h), dim=-1))                   # [T, D]
        x, residual = self.mtp_block(positions, x, None, meta, dp_num_tokens)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(hidden))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load from a whole checkpoint: only `model.layers.{layer_idx}.*` is taken."""
        prefix = re.compile(rf"^model\.layers\.{self.layer_idx}\.(.*)$")

        def rename(name: str) -> Optional[str]:
            m = prefix.match(name)
            if m is None:
                return None  # the main model's tensors
            rest = m[1]
            return rest if rest.split(".")[0] in MTP_OWN_PARTS else f"mtp_block.{rest}"

        return load_deepseek_weights(self, weights, DeepseekV3ForCausalLM.stacked_params, rename)
