"""Seeded sampling does not depend on the batch (vLLM's per-request seeds): a request with a
seed gives the same tokens alone and among 16 others, with and without preemption, and with
n-gram speculative decoding the same tokens as without it (verification samples each row as
the plain sampler does, drawing from the request's generator only for the tokens it emits)."""
from __future__ import annotations

import random

import pytest
import torch

from deepserve import LLM, SamplingParams
from deepserve.engine.sequence import Sequence
from deepserve.engine.spec_decode import verify_sampled

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
TARGET = "Tom and Lily went to the park. Tom and Lily"
SEEDED = SamplingParams(temperature=0.8, seed=1234, max_tokens=24, n=2)


def _others(tok, count=16):
    """Other requests of every kind: greedy, unseeded and seeded sampling, lengths that vary."""
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(rng.randrange(2, 30))]}
               for _ in range(count)]
    params = [SamplingParams(temperature=0.8 if i % 2 else 0, seed=i if i % 4 == 1 else None,
                             max_tokens=4 + i) for i in range(count)]
    return prompts, params


def _seeded_tokens(llm, among=None):
    """The seeded request's two samples, alone or in the middle of `among` (prompts, params)."""
    prompts, params = among or ([], [])
    at = len(prompts) // 2
    outs = llm.generate(prompts[:at] + [TARGET] + prompts[at:], params[:at] + [SEEDED] + params[at:])
    return [c.token_ids for c in outs[at].outputs]


@pytest.fixture(scope="module")
def plain_alone():
    llm = LLM(block_size=4, enable_prefix_caching=False)
    return _seeded_tokens(llm)


@pytest.mark.parametrize("kwargs", [
    dict(block_size=4, max_num_batched_tokens=9, max_model_len=128, speculative_config=NGRAM),
    dict(block_size=4, num_gpu_blocks_override=24, speculative_config=NGRAM),   # preempts
    dict(block_size=4, num_gpu_blocks_override=24),
], ids=["ngram-chunked", "ngram-preempting", "preempting"])
def test_seeded_request_alone_equals_in_a_batch(plain_alone, kwargs):
    llm = LLM(**kwargs)
    assert _seeded_tokens(llm) == plain_alone
    assert _seeded_tokens(llm, _others(llm.get_tokenizer())) == plain_alone
    engine = llm.engine
    if kwargs.get("num_gpu_blocks_override"):
        assert engine.scheduler.num_preemptions > 0
    if "speculative_config" in kwargs:
        assert engine.gauges()["spec_decode_num_accepted_tokens"] > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_verification_draws_only_for_the_emitted_tokens():
    """A seeded sequence whose 3 drafts are cut at the first one by a mismatch leaves its
    generator as two plain draws would: the next draw is the same whatever the draft count."""
    vocab = 50
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.8, seed=5)
    seq = Sequence("s", 0, [1, 2], params)
    first = verify_sampled(logits[:1], [seq], [[]])[0][0]
    mismatch = (first + 1) % vocab
    drafted = Sequence("d", 0, [1, 2], params)
    emitted = verify_sampled(logits, [drafted], [[mismatch, 7, 8]])[0]
    assert emitted == [first]                     # the first row's draw decides, as without drafts
    assert torch.equal(drafted.generator.get_state(), seq.generator.get_state())


def test_verified_tokens_follow_the_target_at_each_position():
    """Over 20000 unseeded copies of one step with drafts [d1, d2]: the first token follows
    the target p1 (d1 kept with probability p1(d1)), and after d1 the second follows p2, as the
    rejection sampler's one-hot case does (4 standard deviations per token)."""
    vocab, n = 6, 20000
    torch.manual_seed(0)
    logits = torch.randn(3, vocab) * 1.5
    d1, d2 = int(logits[0].argmax()), int(logits[1].argmin())
    params = SamplingParams(temperature=1.0)
    seqs = [Sequence(f"r{i}", 0, [1], params) for i in range(n)]
    out = verify_sampled(logits.repeat(n, 1), seqs, [[d1, d2]] * n)
    p = logits.softmax(dim=-1)
    first = torch.tensor([t[0] for t in out])
    second = torch.tensor([t[1] for t in out if t[0] == d1 and len(t) > 1])
    for tokens, probs in ((first, p[0]), (second, p[1])):
        freq = torch.bincount(tokens, minlength=vocab).float() / len(tokens)
        assert torch.all((freq - probs).abs() <= 4 * (probs * (1 - probs) / len(tokens)).sqrt() + 1e-3)
    assert all(len(t) == 3 for t in out if t[:2] == [d1, d2])      # both kept: the bonus token follows
