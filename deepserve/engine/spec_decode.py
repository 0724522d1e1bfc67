"""Speculative decoding in the engine step: drafts per sequence, the verify step's flat inputs
(k + 1 positions per drafting sequence beside ordinary prefill chunks and decodes), the
verification of their logits, and the KV of rejected positions given back.

One step of a sequence with drafts d_1..d_k (its last token t not yet in the cache):

    inputs  t, d_1, ..., d_k  at positions L-1 .. L-1+k      (KV written for all of them)
    logits  k + 1 rows -> a token sampled at each -> d_1..d_a kept while they equal it,
            then the sampled token at the first mismatch (or after d_k)
    after   num_computed_tokens = L + a: the KV of the rejected d_{a+1}..d_k lies past it and is
            overwritten later; whole blocks past it go back to the pool (`release_rejected`)

Drafts here are deterministic (n-gram lookup, MTP's argmax): the draft distribution is
one-hot, and for it sampling the target and keeping the draft while it is the sampled token
is the rejection sampler exactly (Leviathan et al. 2023, algorithm 1): d is kept with
probability p(d) = min(1, p(d) / q(d)), and a rejected position's token follows p without d,
renormalised, which is normalize(max(0, p - q)). Each row is sampled as the plain sampler
samples one (the same op, one Exp(1) draw a row), and a seeded sequence's generator ends as
after the draws of the tokens it emits: its tokens are those it gets without speculation, and
do not depend on how many drafts it was given (the pool or the step's budget may cut them).

Only full blocks of accepted tokens reach the prefix cache (the block manager registers up to
num_computed_tokens), so the cache never holds a rejected token's KV. (With mtp a cached
block's MTP KV at its last position was written with the next token of the sequence that
computed it; a sequence that reuses the block with another next token drafts from it all the
same: its drafts may be accepted less, its output is unchanged, since verification is exact.)

Requests whose sampling reads the host's token history (penalties, min_tokens, grammars) or
that return logprobs get no drafts and decode as before: their per-position processing would
depend on the drafts before each position.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from deepserve.config import SpeculativeConfig
from deepserve.engine.ngram_proposer import NgramProposer
from deepserve.engine.sampler import Sampler, SamplerOutput, exp_noise
from deepserve.engine.sequence import Sequence
from deepserve.engine.step_inputs import MTPStepMessage, StepInputs, StepMessage

logger = logging.getLogger("deepserve")


@dataclass
class SpecStats:
    """vLLM's spec_decode counters: drafts (sequences that drafted), draft tokens, accepted
    tokens, and accepted tokens per draft position."""
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_draft: int, num_accepted: int) -> None:
        if not num_draft:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft:
            self.accepted_per_position += [0] * (num_draft - len(self.accepted_per_position))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    def counters(self) -> dict:
        """vLLM's metric names (spec_decode_num_accepted_tokens_per_pos as one key per position)."""
        out = {"spec_decode_num_drafts": self.num_drafts, "spec_decode_num_draft_tokens": self.num_draft_tokens,
               "spec_decode_num_accepted_tokens": self.num_accepted_tokens}
        # one number per key, so DP front ends can sum the cores' gauges
        out.update((f"spec_decode_num_accepted_tokens_per_pos_{j}", n) for j, n in enumerate(self.accepted_per_position))
        return out

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per drafting step: 1 + accepted drafts, on average (vLLM's log line)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


def can_speculate(seq: Sequence) -> bool:
    p = seq.params
    return not (p.needs_host_history or p.logit_bias or getattr(p, "allowed_token_ids", None))


def needs_sync_step(decoder: Optional["SpecDecoder"], batch) -> bool:
    """Under async scheduling, whether this step runs synchronously through
    `run_speculative_step` once the previous step's tokens are on the host: with mtp every
    step (the module runs over each step's kept positions, so its KV stays whole, and drafts
    with their hidden states); with ngram a step with a decode that may draft (its drafts
    are looked up from its last token, and the next step's positions depend on how many are
    accepted). Other steps launch ahead as without speculation."""
    if decoder is None:
        return False
    if decoder.mtp:
        return True
    return any(n == 1 and can_speculate(seq) for seq, n in zip(batch.seqs, batch.num_new_tokens))


def verify_inputs(seqs: list[Sequence], num_new: list[int], drafts: list[list[int]], block_size: int
                  ) -> tuple[StepInputs, list[int]]:
    """The flat batch of one step: each sequence's `num_new` tokens from num_computed_tokens,
    then its drafts (blocks already allocated for them). One-token rows go first (the attention
    and MLA kernels split the batch there). Returns (inputs, the sequence order used); a
    sequence whose tokens reach its end gets logits rows for its last token and each draft."""
    order = sorted(range(len(seqs)), key=lambda i: num_new[i] + len(drafts[i]) != 1)
    ids, positions, q_lens, seq_lens, rows, tables = [], [], [], [], [], []
    for i in order:
        seq, n, d = seqs[i], num_new[i], drafts[i]
        start = seq.num_computed_tokens
        toks = seq.token_ids[start:start + n] + d
        offset = len(ids)
        ids += toks
        positions.append(np.arange(start, start + len(toks)))
        q_lens.append(len(toks))
        seq_lens.append(start + len(toks))
        if start + n == seq.num_tokens:
            rows += range(offset + n - 1, offset + len(toks))
        tables.append(seq.block_table)
    pos = np.concatenate(positions)
    padded, slots = tables_and_slots(tables, q_lens, pos, block_size)
    inputs = StepInputs(ids=ids, positions=pos, slots=slots, q_lens=q_lens, seq_lens=seq_lens,
                        tables=padded.tolist(), logits_rows=rows, num_decodes=q_lens.count(1))
    return inputs, order


def as_decode_rows(inputs: StepInputs) -> StepInputs:
    """The same step with every token as a one-token row of its own (its sequence's block
    table, seq_len = its position + 1): each row attends over its sequence's positions up to
    its own, as causal attention over the sequence's new tokens does, because every layer
    writes the whole step's KV before any row attends. A verify step of decodes (each its
    last token and k drafts) thus becomes a decode step of tokens = batch * (k + 1) rows,
    which CUDA graphs replay. Logits rows stay the same flat rows."""
    tables = np.repeat(np.asarray(inputs.tables, dtype=np.int32), inputs.q_lens, axis=0)
    n = inputs.num_tokens
    return StepInputs(ids=inputs.ids, positions=inputs.positions, slots=inputs.slots, q_lens=[1] * n,
                      seq_lens=(inputs.positions + 1).tolist(), tables=tables,
                      logits_rows=inputs.logits_rows, num_decodes=n)


def tables_and_slots(tables: list[list[int]], q_lens: list[int], positions: np.ndarray, block_size: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Block tables 0-padded to one width [S, W], and the KV slot of each flat token [T]."""
    width = max(len(t) for t in tables)
    padded = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)
    owner = np.repeat(np.arange(len(tables)), q_lens)
    return padded, padded[owner, positions // block_size] * block_size + positions % block_size


class SpecDecoder:
    """Drafts and verification for one engine core: n-gram drafts looked up at each step, or
    MTP drafts made at the end of the previous step (engine/mtp_proposer.py) and kept here."""

    def __init__(self, spec: SpeculativeConfig, max_model_len: int):
        self.method, self.k = spec.method, spec.num_speculative_tokens
        self.max_model_len = max_model_len
        # with mtp the runner's MTP module drafts (DriverRunner.run_mtp); the decoder keeps no
        # reference to it, so the module's weights go with the runner's release
        self.mtp = spec.method == "mtp"
        if not self.mtp:
            self.proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max, self.k, max_model_len)
        # the runner's sampler (its sampling op and vocabulary) samples the verified rows
        self.sampler: Optional[Sampler] = None
        self.pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # Sequence -> MTP drafts
        self.stats = SpecStats()
        self.log_interval_s, self._logged_at = 10.0, time.monotonic()

    def propose(self, seq: Sequence) -> list[int]:
        """Drafts for `seq`'s next step, never more than its max_tokens and context leave room
        for after the step's own token."""
        drafts = self.pending.pop(seq, [])
        if not can_speculate(seq):
            return []
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        if not self.mtp:
            drafts = self.proposer.propose(seq.token_ids)
        return drafts[:max(0, room)]

    @torch.inference_mode()
    def verify(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> list[list[int]]:
        """logits [sum(len(d) + 1), V]: each sequence's rows in order -> the tokens each sequence
        emits (its accepted drafts, then one more)."""
        if all(s.params.greedy for s in seqs):
            # one [rows] argmax and one host copy; no settings or noise over the vocabulary
            out = keep_matching(logits.argmax(dim=-1).tolist(), drafts)
        else:
            out = verify_sampled(logits, seqs, drafts, self.sampler)
        for d, toks in zip(drafts, out):
            self.stats.record(len(d), len(toks) - 1)
        self._maybe_log()
        return out

    def _maybe_log(self) -> None:
        """vLLM's periodic spec-decode line: mean acceptance length, accepted / drafted tokens."""
        now = time.monotonic()
        if now - self._logged_at < self.log_interval_s:
            return
        self._logged_at = now
        st = self.stats
        logger.info("speculative decoding (%s, k=%d): mean acceptance length %.2f, %d of %d draft tokens "
                    "accepted (%.1f%%), accepted per position %s", self.method, self.k, st.mean_acceptance_length,
                    st.num_accepted_tokens, st.num_draft_tokens,
                    100.0 * st.num_accepted_tokens / max(1, st.num_draft_tokens), st.accepted_per_position)


def keep_matching(sampled: list[int], drafts: list[list[int]]) -> list[list[int]]:
    """`sampled`: the token of each verified row, each sequence's len(d) + 1 rows in order ->
    each sequence's drafts while they equal the token sampled at their row, then the token
    sampled at the first mismatch (or after the last draft)."""
    out, row = [], 0
    for d in drafts:
        a = 0
        while a < len(d) and d[a] == sampled[row + a]:
            a += 1
        out.append(d[:a] + [sampled[row + a]])
        row += len(d) + 1
    return out


def verify_sampled(logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
                   sampler: Optional[Sampler] = None) -> list[list[int]]:
    """Each sequence's len(d) + 1 rows of logits sampled as `sampler` (default: the reference
    op over the whole row) samples a step's rows, its drafts kept while they equal the sampled
    tokens (the module docstring says why this is the rejection sampler for one-hot drafts);
    a seeded sequence's row j takes the j-th draw of its generator, which is then put back to
    where the draws of its emitted tokens leave it. Returns the tokens each sequence emits."""
    if sampler is None:
        sampler = Sampler(set(), logits.shape[1])
    rows = logits.float()[:, :sampler.vocab_size]
    counts = [len(d) + 1 for d in drafts]
    knob_rows, generators = [], []
    for s, c in zip(seqs, counts):
        p = s.params
        knob_rows += [[p.temperature, p.top_k, p.top_p, p.min_p]] * c
        generators += [s.generator] * c
    states: list = []
    sampled = sampler.race(rows, knob_rows, exp_noise(rows, generators, states)).tolist()
    out = keep_matching(sampled, drafts)
    first = 0
    for s, c, toks in zip(seqs, counts, out):
        if s.generator is not None:
            s.generator.set_state(states[first + len(toks) - 1])
        first += c
    return out


def release_rejected(block_manager, seq: Sequence) -> None:
    """Give back the blocks past what `seq`'s computed tokens occupy (allocated for drafts
    that were rejected)."""
    block_manager.trim(seq, seq.num_computed_tokens)


def make_spec_decoder(config, runner) -> Optional[SpecDecoder]:
    """The engine's SpecDecoder for config.speculative (None without one); mtp drafts with the
    model's first MTP layer, reused for every draft position."""
    spec = config.speculative
    if spec is None:
        return None
    if spec.method == "mtp" and runner.mtp is None:
        raise ValueError(f"speculative method {spec.method!r} needs the model's MTP module")
    decoder = SpecDecoder(spec, config.model.max_model_len)
    decoder.sampler = runner.sampler
    return decoder


def run_speculative_step(engine, batch) -> list:
    """One synchronous engine step with drafts (LLMEngine with a SpecDecoder): each decode
    sequence that can speculate gets its drafts and blocks for them (none when the pool is
    short; fewer when the step's token budget runs out), one forward verifies all of them beside the step's prefill chunks, sequences with
    drafts are verified (`SpecDecoder.verify`) and the others through the engine's sampler (their
    penalties, logprobs and grammars as without speculation); then the computed counts advance
    by the accepted tokens, the rejected drafts' blocks go back and full blocks are registered."""
    runner, bm, decoder = engine.runner, engine.block_manager, engine.spec
    seqs, num_new = batch.seqs, batch.num_new_tokens
    # drafts count against the step's token budget (max_num_batched_tokens)
    budget = engine.config.scheduler.max_num_batched_tokens - sum(num_new)
    drafts = []
    for seq, n in zip(seqs, num_new):
        d = decoder.propose(seq) if n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens else []
        d = d[:max(0, budget)]
        budget -= len(d)
        if d and bm.blocks_needed(seq, seq.num_tokens + len(d)) > bm.num_free_blocks:
            d = []
        if d:
            bm.append_slots(seq, seq.num_tokens + len(d))
        drafts.append(d)
    inputs, order = verify_inputs(seqs, num_new, drafts, bm.block_size)
    # one-token rows where the decode CUDA graphs replay the step (DriverRunner.runs_as_rows: decided
    # from the batch as scheduled, as a DP rank told the others)
    as_rows = runner.runs_as_rows(batch)
    forward = as_decode_rows(inputs) if as_rows else inputs
    # (mtp: every rank keeps the hidden states of every row for the MTP step)
    msg = StepMessage(forward, runner.graph_size, keep_hidden=decoder.mtp)
    runner.publish(msg)
    logits = runner.run_step(msg)
    engine.stats["steps"] += 1
    # logits rows, in `order`: len(d) + 1 per sequence that reaches its end
    spec_rows, spec_seqs, plain_rows, plain_seqs, row = [], [], [], [], 0
    for i in order:
        seq = seqs[i]
        if seq.num_computed_tokens + num_new[i] != seq.num_tokens:
            continue
        if drafts[i]:
            spec_rows += range(row, row + len(drafts[i]) + 1)
            spec_seqs.append(i)
        else:
            plain_rows.append(row)
            plain_seqs.append(i)
        row += len(drafts[i]) + 1
    emitted: dict[int, list[int]] = {}
    logprobs: dict[int, object] = {}
    if spec_seqs:
        out = decoder.verify(logits[spec_rows], [seqs[i] for i in spec_seqs], [drafts[i] for i in spec_seqs])
        emitted.update(zip(spec_seqs, out))
    if plain_seqs:
        sampled = runner.sampler(logits[plain_rows], [seqs[i] for i in plain_seqs])
        for i, tok, lp in zip(plain_seqs, sampled.token_ids, sampled.logprobs):
            emitted[i], logprobs[i] = [tok], lp
    next_drafts = {}
    if decoder.mtp:
        next_drafts = mtp_step(runner, bm, seqs, order, num_new, emitted, inputs, as_rows)
    flat_seqs, flat_tokens, flat_lps = [], [], []
    for i, seq in enumerate(seqs):
        toks = emitted.get(i, [])
        seq.num_computed_tokens += num_new[i] + max(0, len(toks) - 1)
        flat_seqs += [seq] * len(toks)
        flat_tokens += toks
        flat_lps += [logprobs.get(i)] + [None] * (len(toks) - 1) if toks else []
    outputs = engine._postprocess(flat_seqs, SamplerOutput(flat_tokens, flat_lps))
    for i, (seq, d) in enumerate(zip(seqs, drafts)):
        if not seq.is_finished:
            if d and not decoder.mtp:    # (MTP: those blocks hold the next drafts' positions)
                bm.trim(seq, seq.num_computed_tokens)
            bm.register_full_blocks(seq)
            if i in next_drafts:
                decoder.pending[seq] = next_drafts[i]
    return outputs


def mtp_step(runner, block_manager, seqs: list, order: list[int], num_new: list[int],
             emitted: dict[int, list[int]], target_inputs: StepInputs, decode_rows: bool = False
             ) -> dict[int, list[int]]:
    """After a verify step (engine/spec_decode.py), before the computed counts advance: the MTP
    module over every position whose target KV the step keeps (each sequence's new tokens and
    its accepted drafts), with the next token at each (the emitted tokens included), so its own
    KV stays complete; sequences that sampled draft the next step's k tokens (blocks for the
    k - 1 positions drafting reuses the module at are taken now; a sequence the pool cannot
    give them to drafts nothing). `decode_rows`: run the module over one-token rows
    (`as_decode_rows`, which its CUDA graphs replay). Returns {index in seqs: drafts}."""
    bm, k, bs = block_manager, runner.mtp.k, block_manager.block_size
    entries, offset = [], 0           # (seq index, first position, kept rows, first target row, next ids, drafts?)
    for slot, i in enumerate(order):
        seq, toks = seqs[i], emitted.get(i)
        start = seq.num_computed_tokens
        kept = num_new[i] + (len(toks) - 1 if toks else 0)
        ext = seq.token_ids + (toks or [])
        drafts = toks is not None and bm.blocks_needed(seq, start + kept + k - 1) <= bm.num_free_blocks
        if drafts:
            bm.append_slots(seq, start + kept + k - 1)
        entries.append((i, start, kept, offset, ext[start + 1:start + kept + 1], drafts))
        offset += target_inputs.q_lens[slot]
    entries.sort(key=lambda e: e[2] != 1)           # one-token rows first, as the attention splits them
    ids, positions, rows, logits_rows, tables = [], [], [], [], []
    for i, start, kept, first, next_ids, drafts in entries:
        ids += next_ids
        positions.append(np.arange(start, start + kept))
        rows += range(first, first + kept)
        if drafts:
            logits_rows.append(len(ids) - 1)
        tables.append(seqs[i].block_table)
    q_lens = [e[2] for e in entries]
    pos = np.concatenate(positions)
    padded, slots = tables_and_slots(tables, q_lens, pos, bs)
    inputs = StepInputs(ids=ids, positions=pos, slots=slots, q_lens=q_lens, seq_lens=[e[1] + e[2] for e in entries],
                        tables=padded.tolist(), logits_rows=logits_rows, num_decodes=q_lens.count(1))
    msg = MTPStepMessage(as_decode_rows(inputs) if decode_rows else inputs, rows)
    runner.publish(msg)
    draft_ids = runner.run_mtp(msg)                 # (None: nothing to draft, the module's KV kept whole)
    if draft_ids is None:
        return {}
    drafting = [e[0] for e in entries if e[5]]
    return dict(zip(drafting, draft_ids.tolist()))
