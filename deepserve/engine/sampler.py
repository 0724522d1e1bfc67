"""From logits to next tokens: penalties, logit_bias, allowed_token_ids, min_tokens, bad_words,
grammar bitmasks, thinking budgets, logprobs (the most likely tokens', or those of the ids a
request names: vLLM's logprob_token_ids), then the model's `ops.sample`.

All per-row settings become tensors once per step; nothing loops over tokens. Seeded
requests draw their Exp(1) noise from their own generator, so a seed gives the same tokens
whatever else is in the batch. Logprobs are those of the model's raw distribution (vLLM's
default), taken before penalties, bias, grammar and temperature. A batch without
logit_bias, allowed_token_ids, bad_words or structured-output rows does no extra work for them,
and none of them needs a host-device sync.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from deepserve.ops import REFERENCE_OPS, OpTable
from deepserve.engine.input_staging import to_device_async
from deepserve.engine.sequence import Sequence
from deepserve.engine.thinking_budget import ThinkingBudget


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # per row: (sampled token logprob, its rank, [(token id, logprob), ...] top-k, or
    # [(token id, logprob, rank), ...] of the row's logprob_token_ids) or None
    logprobs: list[Optional[tuple[float, int, list[tuple[int, float]]]]]


def _padded(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return to_device_async([r + [fill] * (width - len(r)) for r in rows], torch.int64, device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (over prompt and output), frequency and presence penalties (over the output),
    from three small host-to-device copies (no sync)."""
    n, vocab = logits.shape
    dev = logits.device
    # counts of generated tokens per row; column `vocab` swallows the padding
    out_ids = _padded([s.output_token_ids for s in seqs], vocab, dev)
    counts = torch.zeros(n, vocab + 1, device=dev).scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float))
    counts = counts[:, :vocab]
    seen = counts > 0
    prompt_ids = _padded([s.token_ids[:s.num_prompt_tokens] for s in seqs], vocab, dev)
    seen_prompt = torch.zeros(n, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, prompt_ids, True)[:, :vocab]
    knobs = to_device_async([[s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
                             for s in seqs], torch.float32, dev)
    rep, pres, freq = knobs[:, 0:1], knobs[:, 1:2], knobs[:, 2:3]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen | seen_prompt, penalised, logits)
    return logits - freq * counts - pres * seen.float()


def top_logprobs(logprobs: torch.Tensor, chosen_ids: torch.Tensor, k: int
                 ) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """Per row of `logprobs` [N, V]: (the chosen token's logprob, its rank (1 = most likely),
    the k most likely (token id, logprob) pairs)."""
    top_vals, top_ids = logprobs.topk(max(k, 1), dim=-1)
    chosen = logprobs.gather(1, chosen_ids[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    top_vals, top_ids = top_vals[:, :k].tolist(), top_ids[:, :k].tolist()
    return [(c, r, list(zip(i, v))) for c, r, i, v in zip(chosen.tolist(), ranks.tolist(), top_ids, top_vals)]


def listed_logprobs(logprobs: torch.Tensor, rows: list[int], token_ids: list[list[int]]
                    ) -> list[list[tuple[int, float, int]]]:
    """vLLM's logprob_token_ids: for each of `rows` of `logprobs` [N, V], (token id, logprob,
    rank) of each id of its list, in the list's order."""
    dev = logprobs.device
    listed = logprobs[to_device_async(rows, torch.int64, dev)]   # [R, V]
    ids = _padded(token_ids, 0, dev)                             # [R, W]
    values = listed.gather(1, ids)                               # [R, W]
    # one column at a time: a [R, V] comparison each, no larger than top_logprobs' own
    ranks = torch.stack([(listed > values[:, j:j + 1]).sum(dim=-1) for j in range(ids.shape[1])], dim=1) + 1
    return [list(zip(t, v, r)) for t, v, r in zip(token_ids, values.tolist(), ranks.tolist())]


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Add each row's logit_bias in place (one small host-to-device copy, no sync)."""
    rows, cols, vals = [], [], []
    for i, s in enumerate(seqs):
        for tid, bias in (s.params.logit_bias or {}).items():
            rows.append(i)
            cols.append(tid)
            vals.append(bias)
    index = to_device_async([rows, cols], torch.int64, logits.device)
    logits.index_put_((index[0], index[1]), to_device_async(vals, torch.float32, logits.device), accumulate=True)


def apply_allowed_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """-inf outside each restricted row's allowed_token_ids (small copies, no sync)."""
    rows, cols, restricted = [], [], []
    for i, s in enumerate(seqs):
        if s.params.allowed_token_ids:
            restricted.append(i)
            rows += [i] * len(s.params.allowed_token_ids)
            cols += s.params.allowed_token_ids
    index = to_device_async([rows, cols], torch.int64, logits.device)
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[index[0], index[1]] = True
    keep[to_device_async([i for i in range(len(seqs)) if i not in restricted], torch.int64, logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


def bad_words_banned(seqs: list[Sequence]) -> list[tuple[int, int]]:
    """(row, token id) of each token a row's bad_words ban at this step (vLLM's rule): a word's
    last token, where the tokens generated so far end with the word's other tokens."""
    banned = []
    for i, s in enumerate(seqs):
        if not s.params.bad_words_token_ids:
            continue
        singles, by_prefix, lengths = s.params.bad_words_index()
        banned += [(i, t) for t in singles]
        for k in lengths:
            if k > s.num_output_tokens:
                break
            banned += [(i, t) for t in by_prefix.get(tuple(s.token_ids[-k:]), ())]
    return banned


def exp_noise(logits: torch.Tensor, generators: list, states: Optional[list] = None) -> torch.Tensor:
    """Exp(1) draws [N, V] for the exponential race over logits [N, V]: a row with a generator
    (a seeded request's) takes the next V draws of it, the others the device's stream.
    `states`: gets each row's generator state after its draw (None for a row without one), so
    a caller that uses fewer rows than it drew for can put a generator back."""
    dev, vocab = logits.device, logits.shape[1]
    noise = torch.empty_like(logits).exponential_(1)
    for i, g in enumerate(generators):
        if g is not None:  # seeded: the request's own stream
            noise[i] = to_device_async(torch.empty(vocab).exponential_(1, generator=g), torch.float32, dev)
        if states is not None:
            states.append(g.get_state() if g is not None else None)
    return noise


class Sampler:
    def __init__(self, eos_token_ids: set[int], vocab_size: int, ops: OpTable = REFERENCE_OPS):
        self.eos_token_ids = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.ops = ops
        # each structured-output sequence's grammar state, dropped with the sequence
        self._grammars: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._fill_bitmask = None
        # each thinking_token_budget sequence's reasoning count, dropped with the sequence
        self._budgets: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        logits = logits.float()[:, :self.vocab_size]
        n = logits.shape[0]
        want_logprobs = [s.params.logprobs is not None for s in seqs]
        raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
        grammars = self._grammar_states(seqs)
        next_ids = self._choose(logits, seqs, grammars)

        token_ids = next_ids.tolist()
        for i, st in grammars:
            st.accept(token_ids[i])
        logprobs: list = [None] * n
        if raw_logprobs is not None:
            k = max((s.params.logprobs or 0 for s in seqs if s.params.logprob_token_ids is None), default=0)
            listed = [i for i, s in enumerate(seqs) if s.params.logprob_token_ids is not None]
            chosen = dict(zip(listed, listed_logprobs(raw_logprobs, listed, [seqs[i].params.logprob_token_ids
                                                                              for i in listed]))) if listed else {}
            for i, (s, row) in enumerate(zip(seqs, top_logprobs(raw_logprobs, next_ids, k))):
                if want_logprobs[i]:
                    logprobs[i] = (row[0], row[1], chosen[i] if i in chosen else row[2][:s.params.logprobs])
        return SamplerOutput(token_ids, logprobs)

    def _grammar_states(self, seqs: list[Sequence]) -> list:
        """(row, GrammarState) of the rows with structured output."""
        out = []
        for i, s in enumerate(seqs):
            if s.params.guided is not None:
                st = self._grammars.get(s)
                if st is None:
                    from deepserve.engine.grammar import GrammarState
                    st = self._grammars[s] = GrammarState(s.params.guided)
                out.append((i, st))
        return out

    def sample_ids(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The next token of each row as a device tensor, without waiting for it (async
        scheduling, whose steps have no logprobs, penalties, min_tokens or grammars: those
        read the host's token history, which lags one step there)."""
        return self._choose(logits.float()[:, :self.vocab_size], seqs)

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence], grammars: list = ()) -> torch.Tensor:
        """Penalties, logit_bias, tokens banned by min_tokens and bad_words, the grammars'
        bitmasks, the end of reasoning where a thinking budget is spent, then the greedy or
        sampled id of each row."""
        dev = logits.device
        if any(s.params.has_penalties for s in seqs):
            logits = apply_penalties(logits, seqs)
        if any(s.params.logit_bias for s in seqs):
            apply_logit_bias(logits, seqs)
        if any(s.params.allowed_token_ids for s in seqs):
            logits = apply_allowed_tokens(logits, seqs)
        banned = [(i, tid) for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens
                  for tid in ([] if s.params.ignore_eos else self.eos_token_ids) + s.params.stop_token_ids]
        if any(s.params.bad_words_token_ids for s in seqs):
            banned += bad_words_banned(seqs)
        if banned:
            index = to_device_async(list(zip(*banned)), torch.int64, dev)
            logits[index[0], index[1]] = float("-inf")
        if grammars:
            if self._fill_bitmask is None:
                from deepserve.engine.grammar import BitmaskFiller
                self._fill_bitmask = BitmaskFiller()
            logits = logits.contiguous()
            self._fill_bitmask(logits, grammars)
        if any(s.params.thinking_token_budget is not None for s in seqs):
            logits = force_reasoning_ends(logits, seqs, self._budgets)
        if all(s.params.greedy for s in seqs):
            return logits.argmax(dim=-1)
        return self._draw(logits, [[s.params.temperature, s.params.top_k, s.params.top_p, s.params.min_p]
                                   for s in seqs], [s.generator for s in seqs])

    def _draw(self, logits: torch.Tensor, knob_rows: list, generators: list) -> torch.Tensor:
        """The sampled id of each row from its [temperature, top_k, top_p, min_p] and its
        generator (None: the device's stream)."""
        return self.race(logits, knob_rows, exp_noise(logits, generators))

    def race(self, logits: torch.Tensor, knob_rows: list, noise: torch.Tensor) -> torch.Tensor:
        """The model's `ops.sample` over rows of logits [N, V] with their [temperature, top_k,
        top_p, min_p] and Exp(1) noise [N, V]: the token each row draws."""
        # one copy for the four per-row settings (top_k < 2^24 is exact in fp64), without a sync
        knobs = to_device_async(knob_rows, torch.float64, logits.device)
        temperature, top_p, min_p = (knobs[:, j].float() for j in (0, 2, 3))
        top_k = knobs[:, 1].long()
        return self.ops.sample(logits, temperature, top_k, top_p, min_p, noise)

    def warm_up(self, logits: torch.Tensor) -> torch.Tensor:
        """Sample these rows with temperature, top-k, top-p and min-p all on, as a request's
        sampled step does (engine/warm_up.py: its kernel compiles at start)."""
        rows = logits.float()[:, :self.vocab_size]
        return self._draw(rows, [[0.8, 20, 0.9, 0.05]] * rows.shape[0], [None] * rows.shape[0])


def force_reasoning_ends(logits: torch.Tensor, seqs: list[Sequence], states: dict) -> torch.Tensor:
    """Rows whose budget is spent get -inf everywhere but their forced token (greedy and sampled
    rows alike then take it). `states` keeps each budgeted sequence's ThinkingBudget."""
    rows, tokens = [], []
    for i, s in enumerate(seqs):
        if s.params.thinking_token_budget is None:
            continue
        state = states.get(s)
        if state is None:
            state = states[s] = ThinkingBudget(s)
        token = state.forced_token(s.token_ids)
        if token is not None:
            rows.append(i)
            tokens.append(token)
    if not rows:
        return logits
    index = to_device_async([rows, tokens], torch.int64, logits.device)
    logits[index[0]] = float("-inf")
    logits[index[0], index[1]] = 0.0   # finite even where a mask had put -inf
    return logits
