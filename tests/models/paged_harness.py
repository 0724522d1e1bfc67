"""Run a deepserve model on a paged KV cache without the engine: prefill a batch of prompts
in one flat forward, then greedy-decode all of them together. Used by the model tests to
compare against `transformers` in isolation from the scheduler."""
from __future__ import annotations

import torch

from deepserve.layers.attention import AttentionMetadata


def allocate_kv_cache(model, num_blocks: int, block_size: int, dtype=torch.float32):
    for module in model.modules():
        if hasattr(module, "kv_cache_shapes"):
            module.kv_cache = [torch.zeros(num_blocks, *s, dtype=dtype) for s in module.kv_cache_shapes(block_size)]


def build_meta(q_lens, seq_lens, block_size, blocks_per_seq):
    B = len(q_lens)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    tables = torch.tensor([[b * blocks_per_seq + i for i in range(blocks_per_seq)] for b in range(B)],
                          dtype=torch.int32)
    slots, positions = [], []
    for b, (q, s) in enumerate(zip(q_lens, seq_lens)):
        for pos in range(s - q, s):
            slots.append(int(tables[b, pos // block_size]) * block_size + pos % block_size)
            positions.append(pos)
    meta = AttentionMetadata(
        query_start_loc=qsl, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        logits_indices=(qsl[1:] - 1).long(), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        num_decodes=sum(1 for q in q_lens if q == 1))
    return meta, torch.tensor(positions, dtype=torch.int64)


@torch.no_grad()
def prefill_logits(model, prompts: list[list[int]], block_size: int = 4, max_len: int = 128):
    """Logits [sum(len), V] of every prompt position, all prompts in one flat forward."""
    blocks_per_seq = -(-max_len // block_size)
    allocate_kv_cache(model, blocks_per_seq * len(prompts), block_size)
    lens = [len(p) for p in prompts]
    meta, positions = build_meta(lens, lens, block_size, blocks_per_seq)
    ids = torch.tensor([t for p in prompts for t in p])
    hidden = model(ids, positions, meta)
    return model.compute_logits(hidden)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new: int, block_size: int = 4,
                    max_len: int = 128) -> list[list[int]]:
    """Greedy continuation of each prompt, all decoded together in flat batches."""
    blocks_per_seq = -(-max_len // block_size)
    allocate_kv_cache(model, blocks_per_seq * len(prompts), block_size)
    seqs = [list(p) for p in prompts]
    q_lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    for _ in range(max_new):
        seq_lens = [len(s) for s in seqs]
        meta, positions = build_meta(q_lens, seq_lens, block_size, blocks_per_seq)
        hidden = model(ids, positions, meta)
        next_ids = model.compute_logits(hidden[meta.logits_indices]).argmax(-1)
        for s, t in zip(seqs, next_ids.tolist()):
            s.append(t)
        ids, q_lens = next_ids, [1] * len(seqs)
    return [s[len(p):] for s, p in zip(seqs, prompts)]
