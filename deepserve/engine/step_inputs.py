"""Typed step inputs: what one rank needs to run one forward, as host arrays that are cheap
to pickle and send to the other ranks of its DP rank (TP and PP peers).

`StepInputs` is one DP rank's flat token batch (the scheduler's `ScheduledBatch` flattened);
`StepMessage` is what a driver publishes to its workers each step; `STOP` ends a worker.
The device side (`AttentionMetadata`) is built from a `StepInputs` by `ModelRunner.to_device`.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from deepserve.engine.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    ids: list[int]                 # [T] input token ids (0 where async scheduling fills them on the device)
    positions: np.ndarray          # [T] int64
    slots: np.ndarray              # [T] int64 KV slot of each token (-1: write nothing)
    q_lens: list[int]              # [S] new tokens per sequence
    seq_lens: list[int]            # [S] tokens per sequence after this step
    tables: list[list[int]] | np.ndarray   # [S, max blocks] block tables, 0-padded
    logits_rows: list[int]         # rows of the flat batch whose logits are needed
    num_decodes: int               # the first num_decodes sequences are one-token decodes
    dummy: bool = False            # an idle DP rank's filler step (MoE collectives need every rank)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == len(self.q_lens) and max(self.q_lens) == 1

    @classmethod
    def dummy_step(cls) -> "StepInputs":
        """One token at position 0 that writes no cache slot; its logits row is discarded."""
        return cls(ids=[0], positions=np.zeros(1, dtype=np.int64), slots=np.full(1, -1, dtype=np.int64),
                   q_lens=[1], seq_lens=[1], tables=[[0]], logits_rows=[0], num_decodes=1, dummy=True)

    @classmethod
    def from_batch(cls, batch: ScheduledBatch, block_size: int) -> "StepInputs":
        """Flatten a scheduled batch. Work is per sequence (numpy over its new tokens), never
        per token in Python."""
        ids, positions, slots, q_lens, seq_lens, logits_rows = [], [], [], [], [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            toks = seq.token_ids[start:start + n]
            # a token still on the device (async scheduling) goes in as 0; `launch` fills it in
            ids.append(toks if len(toks) == n else toks + [0] * (n - len(toks)))
            pos = np.arange(start, start + n)
            positions.append(pos)
            slots.append(np.asarray(seq.block_table)[pos // block_size] * block_size + pos % block_size)
            q_lens.append(n)
            seq_lens.append(start + n)
            offset += n
            if start + n == seq.num_tokens:  # chunk reaches the end: sample a token
                logits_rows.append(offset - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        return cls(ids=list(itertools.chain.from_iterable(ids)), positions=np.concatenate(positions),
                   slots=np.concatenate(slots), q_lens=q_lens, seq_lens=seq_lens, tables=tables,
                   logits_rows=logits_rows, num_decodes=batch.num_decodes)


@dataclass
class DPSync:
    """What the DP ranks agree on before each step (one all-reduce MAX of a fixed-size
    vector, so its size does not grow with the number of DP ranks)."""
    has_work: bool
    num_tokens: int
    mixed: bool          # some rank's step does not run as decode rows (no CUDA graph this step)
    longest: int         # the longest sequence of any rank (CUDA graphs cover max_model_len)
    stop: bool = False   # some rank is shutting down: all leave the loop in this round

    def to_list(self) -> list[int]:
        return [int(self.has_work), self.num_tokens, int(self.mixed), self.longest, int(self.stop)]

    @classmethod
    def from_list(cls, v: list[int]) -> "DPSync":
        return cls(bool(v[0]), int(v[1]), bool(v[2]), int(v[3]), bool(v[4]))


@dataclass
class StepMessage:
    """A driver's step for its workers: this DP rank's inputs, and the CUDA graph size every
    DP rank replays this step (DP attention + EP; 0 runs eagerly)."""
    inputs: StepInputs
    graph_size: int = 0
    dp_num_tokens: Optional[list[int]] = field(default=None)
    # async scheduling: some input ids are last step's samples, still on the driver's device;
    # the driver broadcasts the step's ids over its TP group before the forward
    device_ids: bool = False
    # speculative decoding with mtp: every rank keeps the step's hidden states [T, D] for the
    # MTP step that follows (`MTPStepMessage`)
    keep_hidden: bool = False
    # a start-up warm-up step (engine/warm_up.py): a worker's compile watch logs the compiles of
    # the steps after the last of them
    warm_up: bool = False


@dataclass
class MTPStepMessage:
    """The MTP module's forward after a verify step kept its hidden states (speculative
    decoding with mtp, engine/spec_decode.py): its flat batch (`inputs.ids` the next token at
    each kept position), the rows of the verify step's hidden states that feed it, and whether
    any sequence drafts (`inputs.logits_rows`: each drafting sequence's last row): then the
    module runs k times (engine/mtp_proposer.py), else once to write its KV."""
    inputs: StepInputs
    target_rows: list[int]
    # a start-up warm-up step: the draft forwards after the first write no cache slot either
    warm_up: bool = False


@dataclass(frozen=True)
class Stop:
    """Tells a worker to leave its step loop."""


STOP = Stop()
