"""bad_words (vLLM's SamplingParams.bad_words): a word's last token is banned where the tokens
generated so far end with its other tokens; each word counts as tokenized alone and, when that
gives other tokens of the same number, after a space. Checked against the rule written out per
token, then on the demo model's greedy output, with async scheduling and n-gram drafts too."""
from __future__ import annotations

import json
import random

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.engine.dp_engine import DataParallelEngine
from deepserve.engine.sampler import Sampler, bad_words_banned
from deepserve.engine.sequence import Sequence
from deepserve.engine.tokenizer import Tokenizer
from tests.conftest import DEMO_MODEL

VOCAB = 24


class WordTokenizer:
    """Each space-separated piece of a word is the token id it spells; a leading space adds
    nothing (so only the plain tokenization counts)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(w) for w in text.split()]


def _seq(words: list[list[int]], generated: list[int], prompt=(1, 2, 3)) -> Sequence:
    params = SamplingParams(temperature=0, bad_words=[" ".join(map(str, w)) for w in words] or None)
    params.update_from_tokenizer(WordTokenizer())
    seq = Sequence("r", 0, list(prompt), params)
    seq.token_ids += generated
    return seq


def reference_mask(words: list[list[int]], generated: list[int]) -> torch.Tensor:
    """The rule, token by token: t is banned when some word ends in t and the generated tokens
    end with the rest of that word."""
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    for t in range(VOCAB):
        for w in words:
            rest = w[:-1]
            if w[-1] == t and len(rest) <= len(generated) and generated[len(generated) - len(rest):] == rest:
                mask[t] = True
    return mask


def test_bans_match_the_rule_written_out():
    rng = random.Random(0)
    sampler = Sampler({0}, VOCAB)
    for trial in range(30):
        rows, seqs, masks = 6, [], []
        logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(trial))
        top = logits.argmax(dim=-1).tolist()
        for r in range(rows):
            generated = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 5))]
            words = []
            for _ in range(rng.randrange(0, 4)):   # some words end in the row's top token after its tail
                n = rng.randrange(1, 4)
                tail = generated[len(generated) - (n - 1):] if rng.random() < 0.6 and n - 1 <= len(generated) else \
                    [rng.randrange(1, VOCAB) for _ in range(n - 1)]
                words.append(tail + [top[r] if rng.random() < 0.7 else rng.randrange(1, VOCAB)])
            seqs.append(_seq(words, generated))
            masks.append(reference_mask(words, generated))
        want = logits.masked_fill(torch.stack(masks), float("-inf")).argmax(dim=-1).tolist()
        assert sampler(logits.clone(), seqs).token_ids == want
        assert any(m[t] for m, t in zip(masks, top)), "a trial where nothing is banned tests nothing"


class _Unwalkable(list):
    def __iter__(self):
        raise AssertionError("a step walked the whole bad_words list")


def test_a_step_looks_words_up_by_their_prefix():
    # thousands of words (a long list of banned names) cost a step a lookup per prefix length
    words = [[5], [7, 8], [9, 7, 8], [4, 9, 6]] + [[10 + i % 9, 11 + i % 7, 3] for i in range(5000)]
    seq = _seq(words, [4, 9, 7])
    assert sorted(t for _, t in bad_words_banned([seq])) == [5, 8, 8]
    seq.params._bad_words_token_ids = _Unwalkable(seq.params._bad_words_token_ids)   # the next steps
    assert sorted(t for _, t in bad_words_banned([seq])) == [5, 8, 8]
    seq.token_ids.append(4)
    assert sorted(t for _, t in bad_words_banned([seq])) == [5]


def test_a_multi_token_word_bans_only_its_last_token_after_the_rest():
    sampler = Sampler({0}, VOCAB)
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 5] = 2.0, 1.0
    word = [[5, 7]]
    assert sampler(logits.clone(), [_seq(word, [3, 5])]).token_ids == [5]    # after 5: 7 is banned
    assert sampler(logits.clone(), [_seq(word, [5, 3])]).token_ids == [7]    # elsewhere it is not
    assert sampler(logits.clone(), [_seq(word, [])]).token_ids == [7]
    # the prompt is not what was generated (vLLM's rule too): a prompt ending in 5 bans nothing
    assert sampler(logits.clone(), [_seq(word, [], prompt=(1, 5))]).token_ids == [7]
    assert sampler(logits.clone(), [_seq([[7]], [])]).token_ids == [5]       # one token: always


def test_words_are_tokenized_alone_and_after_a_space():
    tok = Tokenizer(DEMO_MODEL)
    params = SamplingParams(bad_words=["Lily", "  park"])
    params.update_from_tokenizer(tok)
    want = []
    for word in ("Lily", "park"):
        plain, spaced = tok.encode(word, False), tok.encode(" " + word, False)
        want.append(plain)
        if spaced[0] != plain[0] and len(spaced) == len(plain):
            want.append(spaced)
    assert params.bad_words_token_ids == want and [317] in want
    for bad, message in (([""], "empty string"), ("Lily", "list of strings"), ([3], "list of strings")):
        with pytest.raises(ValueError, match=f"bad_words.*{message}"):
            SamplingParams(bad_words=bad)


@pytest.fixture(scope="module")
def llm():
    with LLM(str(DEMO_MODEL), block_size=4) as engine:
        yield engine


PROMPT = "Once upon a time"
GREEDY = dict(temperature=0, max_tokens=40)


def _ids(llm, **params) -> list[int]:
    return llm.generate(PROMPT, SamplingParams(**GREEDY, **params))[0].outputs[0].token_ids


def _find(ids: list[int], word: list[int]) -> int:
    return next((i for i in range(len(ids) - len(word) + 1) if ids[i:i + len(word)] == word), -1)


def test_greedy_output_loses_the_bad_words(llm):
    tok = llm.get_tokenizer()
    plain = _ids(llm)
    lily, park = tok.encode("Lily", False), tok.encode("park", False)   # one token; three
    assert len(lily) == 1 and len(park) == 3
    assert _find(plain, lily) >= 0 and _find(plain, park) >= 0
    banned = _ids(llm, bad_words=["Lily"])
    assert lily[0] not in banned and banned != plain
    # "park": its first two tokens are still generated; only its last is banned after them
    j = _find(plain, park)
    banned = _ids(llm, bad_words=["park"])
    assert _find(banned, park) == -1
    assert banned[:j + 2] == plain[:j + 2] and banned[j + 2] != park[2]
    out = llm.generate(PROMPT, SamplingParams(temperature=0.8, seed=0, max_tokens=40, bad_words=["Lily"], n=2))[0].outputs
    assert all(lily[0] not in o.token_ids for o in out)
    with pytest.raises(ValueError, match="bad_words"):
        llm.generate(PROMPT, SamplingParams(bad_words=[""]))


def test_async_scheduling_ngram_drafts_and_core_process_keep_the_bans(llm, monkeypatch):
    want = _ids(llm, bad_words=["Lily", "park"])
    with LLM(str(DEMO_MODEL), block_size=4, async_scheduling=True) as other:
        assert _ids(other, bad_words=["Lily", "park"]) == want
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    with LLM(str(DEMO_MODEL), block_size=4, speculative_config=spec) as other:
        assert _ids(other, bad_words=["Lily", "park"]) == want
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "1")   # the words cross to the core with the request
    with LLM(str(DEMO_MODEL), block_size=4) as other:
        assert isinstance(other.engine, DataParallelEngine)
        assert _ids(other, bad_words=["Lily", "park"]) == want
