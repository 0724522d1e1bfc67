"""DeepSeek MTP drafts for speculative decoding (DeepSeek-V3 arXiv 2412.19437 section 2.2;
vLLM's `method: mtp` / `deepseek_mtp`).

The MTP module predicts token t+2 from the main model's hidden state at t and the embedding
of token t+1. After a target forward over some positions of a sequence, the module runs over
the same positions with the input ids shifted by one (position i gets token i+1; the last
position gets the token just sampled) and the target's hidden states, writing its own KV
(its attention layer has its own pool tensor, addressed by the sequence's block table). The
last position's logits give draft 1. Drafts 2..k reuse the same module autoregressively, as
vLLM does: one decode token per sequence at the next position, its input the previous draft
and its "previous hidden" the module's own output there.

Drafts are the argmax of the module's logits, so they are deterministic given the context and
verified as one-hot drafts (vLLM's MTP proposer does the same); the logits are returned too.
"""
from __future__ import annotations

from typing import Optional

import torch

from deepserve.layers.attention import AttentionMetadata


def decode_step_meta(meta: AttentionMetadata, seq_index: torch.Tensor, positions: torch.Tensor,
                     block_size: int, extra_len: int, write_kv: bool = True,
                     past: Optional[torch.Tensor] = None) -> AttentionMetadata:
    """Metadata of one decode token per drafting sequence at `positions` [S], in the block
    tables of `meta` (rows `seq_index`); `extra_len` bounds how far past meta.max_seq_len;
    `write_kv` False: the tokens' KV goes to no cache slot (the start-up warm-up); `past` [S]
    bool: rows whose position lies past the context (given as 0), which write no KV and
    attend to one token."""
    tables = meta.block_tables.index_select(0, seq_index)                       # [S, W]
    if write_kv:
        blocks = tables.gather(1, (positions // block_size)[:, None].to(torch.int64))[:, 0]
        slots = blocks.to(torch.int64) * block_size + positions % block_size
        if past is not None:
            slots = slots.masked_fill(past, -1)
    else:
        slots = torch.full_like(positions, -1, dtype=torch.int64)
    n = positions.shape[0]
    rows = torch.arange(n + 1, dtype=torch.int32, device=positions.device)
    return AttentionMetadata(query_start_loc=rows, seq_lens=(positions + 1).to(torch.int32), block_tables=tables,
                             slot_mapping=slots, logits_indices=rows[:n].to(torch.int64), max_query_len=1,
                             max_seq_len=meta.max_seq_len + extra_len, num_decodes=n)


class MTPProposer:
    """k draft tokens per sequence from a `DeepseekMTP` module (one MTP layer, reused)."""

    def __init__(self, mtp: torch.nn.Module, k: int, block_size: int, max_model_len: int):
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        self.mtp, self.k, self.block_size, self.max_model_len = mtp, k, block_size, max_model_len
        self.graphs = None   # an MTPGraphRunner (engine/cuda_graphs.py) where graphs are captured

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, previous: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The module over a flat batch -> (hidden [T, D], logits [len(meta.logits_indices), V]):
        a CUDA-graph replay where the batch is one-token rows a graph holds, else eagerly."""
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs.run_mtp(ids, positions, previous, meta)
        hidden = self.mtp(ids, positions, previous, meta)
        return hidden, self.mtp.compute_logits(hidden[meta.logits_indices])

    @torch.inference_mode()
    def propose(self, target_hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, write_kv: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """target_hidden [T, D] (the target's output over the step's flat batch), next_ids [T]
        (each row's following token: the input ids shifted by one within each sequence, the
        sampled token at a sequence's last row), positions [T], meta: the target step's metadata,
        whose logits_indices are the rows of the sequences that draft (their last rows);
        write_kv False: the forwards after the first write no KV either (the warm-up's)
        -> (draft ids [S, k] int64, draft logits [S, k, V] fp32)."""
        rows = meta.logits_indices
        hidden, first = self.forward(next_ids, positions, target_hidden, meta)
        hidden = hidden[rows]                                                       # [S, D]
        logits = [first.float()]
        drafts = [logits[0].argmax(dim=-1)]
        if self.k > 1:
            ends = meta.query_start_loc[1:].to(torch.int64) - 1
            seq_index = torch.searchsorted(ends, rows)                              # row -> its sequence
            last_pos = positions[rows]
        for j in range(1, self.k):
            # a sequence near the context's end drafts past it: those drafts are dropped (the
            # decoder keeps what the context has room for), so their rows run at position 0,
            # out of the rotary table's and block table's way, as vLLM's drafter clamps them
            pos = last_pos + j
            past = pos >= self.max_model_len
            pos = pos.masked_fill(past, 0)
            step = decode_step_meta(meta, seq_index, pos, self.block_size, j, write_kv, past)
            hidden, step_logits = self.forward(drafts[-1], pos, hidden, step)
            logits.append(step_logits.float())
            drafts.append(logits[-1].argmax(dim=-1))
        return torch.stack(drafts, dim=1), torch.stack(logits, dim=1)
