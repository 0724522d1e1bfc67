"""N-gram (prompt lookup) drafts for speculative decoding (Saxena 2023, "Prompt Lookup
Decoding"; vLLM's `method: ngram`).

The last n tokens of a sequence (prompt and output so far) are looked up earlier in the same
sequence, for the largest n in [prompt_lookup_min, prompt_lookup_max] that matches; the tokens
that followed the earliest such match are the drafts, up to k of them (fewer when the match
sits near the end, none when nothing matches). Drafts are deterministic, so the rejection
sampler treats them as one-hot draft distributions. Same rule as vLLM's NgramProposer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens, min_n: int, max_n: int, k: int, max_len: int | None = None) -> list[int]:
    """Draft tokens for the sequence `tokens` (a list or 1-D array of ids): the up-to-k tokens
    after the earliest earlier occurrence of its longest suffix of length in [min_n, max_n].
    `max_len`: the model's context length; drafts never run past it."""
    arr = np.asarray(tokens, dtype=np.int64)
    total = arr.shape[0]
    if max_len is not None:
        k = min(k, max_len - total)
    if k <= 0 or total < min_n + 1:
        return []
    # a match must end before the last token, so that at least one token follows it
    history = arr[:total - 1]
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        windows = sliding_window_view(history, n)                    # [total - n, n]
        hits = np.flatnonzero((windows == arr[total - n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return arr[start:start + k].tolist()
    return []


@dataclass(frozen=True)
class NgramProposer:
    """`propose_ngram` with a speculative config's settings."""
    min_n: int
    max_n: int
    k: int
    max_len: int | None = None

    def propose(self, tokens) -> list[int]:
        return propose_ngram(tokens, self.min_n, self.max_n, self.k, self.max_len)
