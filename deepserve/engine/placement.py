"""Which DP rank a new request goes to (the front end's choice, engine/dp_engine.py)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional


class RankPlacement:
    """Which DP rank a new request goes to: the least loaded (unfinished sequences, then KV
    use, then the lowest rank), unless a rank was recently given a request with the same
    prompt prefix (whole KV blocks) and is at most `slack` sequences busier than the least
    loaded: it likely still holds that prefix in its cache. Prefixes are remembered by a
    chained hash per block, starting from the request's cache_salt (whose blocks only requests
    with the same salt share), the most recent `remember` blocks (placement only: a collision
    costs a cache miss, never a wrong output)."""

    def __init__(self, dp_size: int, block_size: int, slack: int = 4, remember: int = 1 << 16):
        self.load = [0] * dp_size
        self.block_size, self.slack, self.remember = block_size, slack, remember
        self._prefix: OrderedDict[int, int] = OrderedDict()   # chained block hash -> rank

    def _chain(self, prompt_ids: list[int], cache_salt: Optional[str]) -> list[int]:
        keys, key, bs = [], hash(cache_salt), self.block_size
        for start in range(0, len(prompt_ids) - bs + 1, bs):
            key = hash((key, tuple(prompt_ids[start:start + bs])))
            keys.append(key)
        return keys

    def choose(self, prompt_ids: list[int], n: int, kv_usage: list[float], cache_salt: Optional[str] = None) -> int:
        """Place a request of `n` sequences; returns its rank."""
        if len(self.load) == 1:  # one engine core: nothing to choose, no prefix to remember
            self.load[0] += n
            return 0
        least = min(range(len(self.load)), key=lambda r: (self.load[r], kv_usage[r], r))
        keys = self._chain(prompt_ids, cache_salt)
        holder = next((self._prefix[k] for k in reversed(keys) if k in self._prefix), None)
        rank = holder if holder is not None and self.load[holder] <= self.load[least] + self.slack else least
        for k in keys:
            self._prefix[k] = rank
            self._prefix.move_to_end(k)
        while len(self._prefix) > self.remember:
            self._prefix.popitem(last=False)
        self.load[rank] += n
        return rank

    def finished(self, rank: int, n: int) -> None:
        self.load[rank] -= n

