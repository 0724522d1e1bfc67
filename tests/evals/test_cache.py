"""The reply cache: keys, durability, and recovery from a write torn by a kill."""
from __future__ import annotations

import json

from deepserve.evals.cache import ReplyCache, cache_key
from deepserve.evals.client import SamplingSettings, api_root


def test_key_depends_on_every_request_input():
    s = SamplingSettings("r1")
    base = cache_key("gsm8k", "7", 0, "prompt", s)
    assert base == cache_key("gsm8k", "7", 0, "prompt", SamplingSettings("r1"))
    variants = [cache_key("math500", "7", 0, "prompt", s), cache_key("gsm8k", "8", 0, "prompt", s),
                cache_key("gsm8k", "7", 1, "prompt", s), cache_key("gsm8k", "7", 0, "prompt2", s),
                cache_key("gsm8k", "7", 0, "prompt", SamplingSettings("r1", temperature=0.0)),
                cache_key("gsm8k", "7", 0, "prompt", SamplingSettings("r1", max_tokens=100)),
                cache_key("gsm8k", "7", 0, "prompt", SamplingSettings("r1", seed=1)),
                cache_key("gsm8k", "7", 0, "prompt", SamplingSettings("other"))]
    assert len({base, *variants}) == 1 + len(variants)


def test_records_survive_reopen_and_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ReplyCache(path)
    cache.put({"key": "a", "content": "x"})
    cache.put({"key": "b", "content": "y \u00e9"})
    cache.close()
    with open(path, "ab") as f:        # a kill in the middle of writing a third record
        f.write(b'{"key": "c", "content": "trunc\xc3')
    cache = ReplyCache(path)
    assert len(cache) == 2 and cache.torn_lines == 1 and "c" not in cache
    assert cache.get("b")["content"] == "y \u00e9"
    cache.put({"key": "c", "content": "z"})
    cache.close()
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    assert json.loads(lines[-1]) == {"key": "c", "content": "z"}   # not glued to the torn line
    reopened = ReplyCache(path)
    assert sorted(reopened.records) == ["a", "b", "c"] and reopened.torn_lines == 1


def test_api_root_forms():
    assert api_root("http://h:8000") == "http://h:8000/v1"
    assert api_root("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_root(" https://x.y/api/v1 ") == "https://x.y/api/v1"
