"""Paged KV cache bookkeeping: free blocks, block tables, prefix caching over full blocks.

Every block has a reference count. A full block whose KV has been written is registered
under a key hashing (its parent block's key, its token ids), so a later sequence with the same
prefix reuses it instead of recomputing it (vLLM's automatic prefix caching). A block whose
count drops to zero goes to the end of the free queue but keeps its key until it is handed
out again: cached blocks are evicted least recently freed first.

Keys are sha256 (or xxhash's 128-bit xxh3) digests, as in vLLM: with Python's `hash()` two
different prefixes that collide would silently share KV, across requests and tenants. The
first block's parent is a salt, by default random bytes drawn when the server starts, so keys
cannot be predicted (and collisions not crafted) from outside. A request's cache_salt (vLLM's)
enters that parent too: requests with different salts never share a block, so one tenant
cannot learn from cache hits what another's prompts were.
"""
from __future__ import annotations

import hashlib
import logging
import os
from array import array
from collections import OrderedDict
from typing import Callable, Optional

from deepserve.engine.sequence import Sequence

PREFIX_HASH_ALGOS = ("sha256", "xxhash")

logger = logging.getLogger("deepserve")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def block_hasher(algo: str = "sha256") -> Callable[[bytes, tuple[int, ...]], bytes]:
    """`key(parent_key, token_ids)` for one of PREFIX_HASH_ALGOS."""
    if algo == "sha256":
        digest = _sha256
    elif algo == "xxhash":
        try:
            import xxhash  # optional: only when asked for
        except ImportError:
            raise ImportError("--prefix-caching-hash-algo xxhash needs the xxhash package: "
                              "pip install xxhash") from None
        digest = xxhash.xxh3_128_digest
    else:
        raise ValueError(f"prefix_caching_hash_algo must be one of {PREFIX_HASH_ALGOS}, got {algo!r}")

    def key(parent: bytes, tokens: tuple[int, ...]) -> bytes:
        # a parent key has one length (a digest, or the manager's salt), so this is one-to-one
        return digest(parent + array("q", tokens).tobytes())
    return key


def prefix_salt(salt: Optional[str]) -> bytes:
    """The first block's parent key: 32 random bytes when `salt` is None, else its UTF-8 bytes
    (a fixed salt makes keys reproducible across restarts; "" is no salt)."""
    return os.urandom(32) if salt is None else salt.encode()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_algo: str = "sha256", salt: Optional[bytes] = None):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_key = block_hasher(hash_algo)
        self.root_key = prefix_salt(None) if salt is None else salt
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[Optional[bytes]] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}                # key -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_queries = 0                           # prompt tokens looked up
        self.prefix_hits = 0                              # of those, found in the cache

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_tokens` tokens in total."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    # ---------------------------------------------------------------- prefix cache
    def _full_block_hashes(self, seq: Sequence, upto_tokens: int) -> list[bytes]:
        """Keys of the full blocks among seq's first `upto_tokens` tokens. Each is computed once
        and kept on the sequence (token ids only grow; a waiting sequence asks every step)."""
        bs, keys = self.block_size, seq.prefix_keys
        n_blocks = min(upto_tokens, len(seq.token_ids)) // bs      # (ids still on the device: not yet)
        if len(keys) >= n_blocks:
            return keys[:n_blocks]
        parent = keys[-1] if keys else self.chain_root(seq.cache_salt)
        for i in range(len(keys), n_blocks):
            parent = self.block_key(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs]))
            keys.append(parent)
        return keys[:n_blocks]

    def chain_root(self, cache_salt: Optional[str]) -> bytes:
        """The parent key of a sequence's first block: the manager's salt, or with a request's
        cache_salt a key over both. The salt's bytes go in as ids after -1, an id no token has,
        so that key is never one of a block of tokens (whatever the salt's length), and no
        block under one salt is ever matched by a sequence with another or with none."""
        if cache_salt is None:
            return self.root_key
        return self.block_key(self.root_key, (-1, *cache_salt.encode()))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`'s tokens (never all of them: the last token
        must be computed to get logits); none when its params skip reading the cache."""
        if not self.enable_prefix_caching or seq.params.skip_reading_prefix_cache:
            return []
        hits = []
        for h in self._full_block_hashes(seq, seq.num_tokens - 1):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's reset_prefix_cache: between benchmark runs, after
        new weights), so no later prompt hits; only when no sequence holds a block, as a held
        block's key may still be published. False, with nothing changed, when one is held.
        The hit / query counters are totals since start and stay."""
        held = self.num_blocks - len(self.free)
        if held:
            logger.warning("Failed to reset prefix cache because some blocks (%d) are not freed yet", held)
            return False
        self.cached.clear()
        self.hash_of = [None] * self.num_blocks
        return True

    # ---------------------------------------------------------------- allocation
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hash_of[block]
        if old is not None:  # evict its cached contents
            self.cached.pop(old, None)
            self.hash_of[block] = None
        return block

    def can_allocate(self, seq: Sequence, num_tokens: int, hits: list[int] = ()) -> bool:
        reused_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        need = self.blocks_needed(seq, num_tokens) - len(hits)
        return need + reused_free <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int, hits: list[int] = ()) -> None:
        """Give a new sequence its prefix-cache hits and fresh blocks for `num_tokens` tokens."""
        assert not seq.block_table
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
            seq.block_table.append(b)
        seq.block_hashes = [self.hash_of[b] for b in hits]
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:   # a re-admission hits its own blocks: its usage keeps the first one's (vLLM's)
            seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_computed_tokens
        self.append_slots(seq, num_tokens)

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_tokens)):
            b = self._take_free()
            self.ref_counts[b] = 1
            seq.block_table.append(b)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish the blocks whose KV is now complete to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        n_full = seq.num_computed_tokens // self.block_size
        if n_full <= len(seq.block_hashes):
            return
        keys = self._full_block_hashes(seq, n_full * self.block_size)
        for i in range(len(seq.block_hashes), len(keys)):
            key = keys[i]
            seq.block_hashes.append(key)
            block = seq.block_table[i]
            if key not in self.cached and self.hash_of[block] is None:
                self.cached[key] = block
                self.hash_of[block] = key

    def free_seq(self, seq: Sequence) -> None:
        self._release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back `seq`'s blocks past those its first `num_tokens` tokens occupy (speculative
        decoding: blocks allocated for drafts that were rejected; they hold no registered key)."""
        keep = -(-num_tokens // self.block_size)
        self._release(seq.block_table[keep:])
        del seq.block_table[keep:]

    def _release(self, blocks: list[int]) -> None:
        # in reverse so a sequence's tail blocks are evicted before its prefix
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free[b] = None
