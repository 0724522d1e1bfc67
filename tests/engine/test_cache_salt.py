"""cache_salt (vLLM's): requests share prefix-cache blocks only with requests of the same salt,
and unsalted ones only with each other; the hit counters count what was shared. Checked on the
block manager, through the offline LLM (a prompt dict's cache_salt, as vLLM's), and with the
engine core in a process of its own (the salt crosses to it with the request)."""
from __future__ import annotations

import pytest

from deepserve import LLM, SamplingParams
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.dp_engine import DataParallelEngine
from deepserve.engine.sampling_params import SamplingParams as Params
from deepserve.engine.sequence import Sequence
from tests.conftest import DEMO_MODEL
from tests.engine.test_block_manager import prefill as admit

BS = 4


def prefill(bm: BlockManager, tokens: list[int], salt=None) -> Sequence:
    s = Sequence("r", 0, list(tokens), Params(), salt)
    admit(bm, s)
    return s


def test_blocks_are_shared_only_under_the_same_salt():
    bm = BlockManager(64, BS)
    tokens = list(range(13))                                  # three full blocks are looked up
    assert prefill(bm, tokens).num_cached_tokens == 0
    assert prefill(bm, tokens).num_cached_tokens == 12
    assert prefill(bm, tokens, "tenant-a").num_cached_tokens == 0
    assert prefill(bm, tokens, "tenant-b").num_cached_tokens == 0
    assert prefill(bm, tokens, "tenant-a").num_cached_tokens == 12
    assert prefill(bm, tokens, "tenant-a2").num_cached_tokens == 0
    assert (bm.prefix_queries, bm.prefix_hits) == (6 * 13, 2 * 12)
    # every block of another salt has another key, the first one and those after it
    a, b = prefill(bm, tokens, "x"), prefill(bm, tokens, "y")
    assert not set(a.block_hashes) & set(b.block_hashes) and len(a.block_hashes) == 3


def test_a_salt_spelling_token_ids_is_no_block_of_tokens():
    """The salt's key is not the key of a block whose tokens are the salt's bytes (nor of a
    block after the salt's bytes), so a salt cannot be matched by a crafted unsalted prompt."""
    bm = BlockManager(64, BS)
    salt = "\x01\x02\x03\x04"
    assert bm.chain_root(salt) not in {bm.block_key(bm.root_key, (1, 2, 3, 4)),
                                       bm.block_key(bm.root_key, (0, 1, 2, 3)), bm.root_key}
    plain = prefill(bm, [1, 2, 3, 4, 9, 9, 9, 9, 5])
    salted = prefill(bm, [9, 9, 9, 9, 5], salt)
    assert salted.num_cached_tokens == 0 and plain.block_hashes[1] != salted.block_hashes[0]


PROMPT = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her friends."
GREEDY = SamplingParams(temperature=0, max_tokens=8)


def _cached(llm, salt=None) -> tuple[int, str]:
    prompt = {"prompt": PROMPT, **({"cache_salt": salt} if salt is not None else {})}
    out = llm.generate(prompt, GREEDY)[0]
    return out.num_cached_tokens, out.outputs[0].text


def _check_salts(llm) -> int:
    """The prompt's hits when repeated under the same salt."""
    first, text = _cached(llm)
    assert first == 0
    hits, same = _cached(llm)
    assert hits > 0 and same == text
    assert _cached(llm, "s1") == (0, text)                    # another salt: computed again, same text
    assert _cached(llm, "s2") == (0, text)
    assert _cached(llm, "s1") == (hits, text)
    assert _cached(llm) == (hits, text)
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        llm.generate({"prompt": PROMPT, "cache_salt": ""}, GREEDY)
    return hits


def test_offline_llm_salts_its_prompts():
    with LLM(str(DEMO_MODEL), block_size=4) as llm:
        hits = _check_salts(llm)
        assert llm.engine.gauges()["prefix_cache_hits"] == 3 * hits    # the repeats under the same salt


def test_the_salt_reaches_an_engine_core_process(monkeypatch):
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")
    with LLM(str(DEMO_MODEL), block_size=4) as llm:
        assert isinstance(llm.engine, DataParallelEngine)
        _check_salts(llm)


def test_skip_reading_prefix_cache_through_the_offline_llm():
    """vLLM's skip_reading_prefix_cache=True: the cached prompt is computed again (no hit), the
    same text comes out, and the next request still hits."""
    with LLM(str(DEMO_MODEL), block_size=4) as llm:
        _, text = _cached(llm)
        hits, _ = _cached(llm)
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, skip_reading_prefix_cache=True))[0]
        assert (out.num_cached_tokens, out.outputs[0].text) == (0, text) and hits > 0
        assert _cached(llm) == (hits, text)
