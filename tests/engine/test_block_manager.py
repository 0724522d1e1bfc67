"""Block manager on fake sequences: allocation, reference counts, prefix reuse, eviction order,
and prefix-cache keys that do not collide where Python's hash() does."""
from __future__ import annotations

import hashlib

import pytest

from deepserve.config import EngineArgs
from deepserve.engine.block_manager import BlockManager, block_hasher, prefix_salt
from deepserve.engine.sampling_params import SamplingParams
from deepserve.engine.sequence import Sequence

BS = 4


def seq(tokens, rid="r") -> Sequence:
    return Sequence(rid, 0, list(tokens), SamplingParams())


def prefill(bm: BlockManager, s: Sequence) -> list[int]:
    """Admit `s` as the scheduler does, compute all its tokens, publish its full blocks."""
    hits = bm.match_prefix(s)
    assert bm.can_allocate(s, s.num_tokens, hits)
    bm.allocate(s, s.num_tokens, hits)
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)
    return hits


def test_allocate_and_free_count_blocks():
    bm = BlockManager(8, BS)
    s = seq(range(10))                        # 10 tokens: 3 blocks
    prefill(bm, s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.usage() == pytest.approx(3 / 8)
    bm.free_seq(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, BS)


def test_prefix_reuse_shares_full_blocks_and_counts_hits():
    bm = BlockManager(16, BS)
    a = seq(range(10), "a")
    prefill(bm, a)
    b = seq(list(range(8)) + [99, 98, 97], "b")   # same first two blocks, then different
    hits = prefill(bm, b)
    assert hits == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and bm.ref_counts[hits[0]] == 2
    assert bm.prefix_queries == 10 + 11 and bm.prefix_hits == 8
    # a shared block stays allocated until its last user frees it
    bm.free_seq(a)
    assert bm.ref_counts[hits[0]] == 1 and hits[0] not in bm.free
    bm.free_seq(b)
    assert bm.num_free_blocks == 16


def test_never_the_whole_prompt_from_cache():
    """The last prompt token is always computed: logits come from it."""
    bm = BlockManager(16, BS)
    prefill(bm, seq(range(8), "a"))
    again = seq(range(8), "b")
    assert len(bm.match_prefix(again)) == 1     # 8 tokens: only the first block is reused


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    bm = BlockManager(4, BS)
    a = seq(range(8), "a")
    prefill(bm, a)
    first, second = a.block_table
    bm.free_seq(a)                              # freed in reverse: tail block evicted first
    assert list(bm.free)[-2:] == [second, first]
    again = seq(list(range(8)) + [5], "b")
    assert bm.match_prefix(again) == [first, second]   # still cached after free
    filler = seq(range(100, 112), "c")          # 3 blocks: takes the 2 never-used, then `second`
    prefill(bm, filler)
    assert second in filler.block_table and first not in filler.block_table
    assert bm.match_prefix(again) == [first]    # `second`'s key was evicted with it


def test_no_prefix_caching_means_no_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    prefill(bm, seq(range(9), "a"))
    assert bm.match_prefix(seq(range(9), "b")) == [] and bm.cached == {}


def test_keys_are_sha256_over_parent_and_token_ids():
    bm = BlockManager(8, BS, salt=b"salt")
    s = seq(range(9))
    prefill(bm, s)
    k0 = hashlib.sha256(b"salt" + b"".join(t.to_bytes(8, "little") for t in range(4))).digest()
    k1 = hashlib.sha256(k0 + b"".join(t.to_bytes(8, "little") for t in range(4, 8))).digest()
    assert s.block_hashes == [k0, k1]
    assert bm.cached == {k0: s.block_table[0], k1: s.block_table[1]}


@pytest.mark.parametrize("algo", ["sha256", "xxhash"])
def test_python_hash_collisions_do_not_share_kv(algo):
    """hash(0) == hash(2**61 - 1) in CPython (ints hash modulo 2**61 - 1), so the two blocks'
    tuples collide under hash(); with digest keys the second prompt reuses nothing."""
    a_tokens, b_tokens = [0, 1, 2, 3, 7], [2**61 - 1, 1, 2, 3, 7]
    assert hash((None, tuple(a_tokens[:BS]))) == hash((None, tuple(b_tokens[:BS])))
    bm = BlockManager(8, BS, hash_algo=algo)
    a = seq(a_tokens, "a")
    prefill(bm, a)
    b = seq(b_tokens, "b")
    assert prefill(bm, b) == []
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)
    # the same tokens still hit
    assert bm.match_prefix(seq(a_tokens, "c")) == a.block_table[:1]


def test_salt_separates_servers_and_is_random_by_default():
    key = block_hasher("sha256")
    tokens = (1, 2, 3, 4)
    assert key(b"x", tokens) != key(b"y", tokens)
    assert prefix_salt(None) != prefix_salt(None) and len(prefix_salt(None)) == 32
    assert prefix_salt("fixed") == b"fixed"
    one, two = BlockManager(8, BS), BlockManager(8, BS)
    s1, s2 = seq(range(5)), seq(range(5))
    prefill(one, s1)
    prefill(two, s2)
    assert s1.block_hashes != s2.block_hashes   # two random salts


def test_xxhash_keys_are_128_bit():
    xxhash = pytest.importorskip("xxhash")
    key = block_hasher("xxhash")
    parent = b"p" * 16
    tokens = (5, 6, 7, 8)
    expected = xxhash.xxh3_128_digest(parent + b"".join(t.to_bytes(8, "little") for t in tokens))
    assert key(parent, tokens) == expected and len(expected) == 16


def test_hash_algo_is_validated():
    with pytest.raises(ValueError, match="prefix_caching_hash_algo must be one of .*'md5'"):
        block_hasher("md5")
    with pytest.raises(ValueError, match="prefix_caching_hash_algo must be sha256 or xxhash"):
        EngineArgs(prefix_caching_hash_algo="builtin")
    cfg = EngineArgs(prefix_caching_hash_algo="xxhash", prefix_caching_salt="s").create_engine_config()
    assert cfg.cache.prefix_caching_hash_algo == "xxhash" and cfg.cache.prefix_caching_salt == "s"


def test_keys_are_computed_once_per_sequence_and_only_for_complete_blocks():
    bm = BlockManager(16, BS)
    calls = []
    key = bm.block_key
    bm.block_key = lambda parent, tokens: calls.append(tokens) or key(parent, tokens)
    waiting = seq(range(41))
    for _ in range(3):                        # a waiting sequence is looked up every step
        bm.match_prefix(waiting)
    assert len(calls) == 10
    prefill(bm, waiting)
    assert len(calls) == 10 and waiting.block_hashes == waiting.prefix_keys[:10]
    # async scheduling: ids still on the device are not hashed (no key for a partial block)
    pending = seq(range(7))
    pending.num_pending = 2                   # 9 tokens, 7 on the host
    bm.match_prefix(pending)
    assert [len(t) for t in calls[10:]] == [BS] and len(pending.prefix_keys) == 1


def test_cached_tokens_are_the_first_admissions_hits():
    """A sequence preempted and admitted again hits the blocks it computed itself; the prompt
    tokens its usage reports as cached stay those of its first admission (vLLM's), never more
    than the prompt."""
    bm = BlockManager(16, BS)
    prefill(bm, seq(range(9), "a"))
    s = seq(list(range(9)) + [50, 51, 52, 53, 54, 55], "b")   # 9 prompt tokens shared, then 6 of its own
    s.num_prompt_tokens = 9
    prefill(bm, s)
    assert s.num_cached_tokens == 8
    bm.free_seq(s)                                         # preempted by recompute
    s.num_preemptions += 1
    assert len(prefill(bm, s)) == 3                       # now its own third block hits as well
    assert s.num_cached_tokens == 8


def test_skip_reading_prefix_cache_computes_the_prompt_and_still_caches_it():
    """vLLM's SamplingParams.skip_reading_prefix_cache: no hit is read for the request, but its
    full blocks are published for the next one."""
    bm = BlockManager(32, BS)
    prefill(bm, seq(range(10), "a"))
    skipping = Sequence("b", 0, list(range(13)), SamplingParams(skip_reading_prefix_cache=True))
    assert prefill(bm, skipping) == [] and skipping.num_cached_tokens == 0
    bm.free_seq(skipping)
    again = seq(range(13), "c")
    prefill(bm, again)
    assert again.num_cached_tokens == 12
    with pytest.raises(ValueError, match="skip_reading_prefix_cache must be a bool"):
        SamplingParams(skip_reading_prefix_cache="yes")
