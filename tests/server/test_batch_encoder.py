"""server/batch_encoder.BatchEncoder: prompts encoded off the event loop, in batches, with the
ids `Tokenizer.encode` gives."""
from __future__ import annotations

import asyncio
import random
import time

import pytest

from deepserve.engine.tokenizer import load_tokenizer
from deepserve.server.batch_encoder import INLINE_CHARS, BatchEncoder
from tests.conftest import DEMO_MODEL, TOKENIZERS


class CountingTokenizer:
    """A tokenizer whose encode_batch calls are counted."""

    def __init__(self, tok):
        self.tok, self.batches = tok, []

    def encode_batch(self, texts, add_special_tokens=True):
        self.batches.append(len(texts))
        return self.tok.encode_batch(texts, add_special_tokens)


@pytest.fixture(scope="module")
def r1_tokenizer():
    if not (TOKENIZERS / "deepseek-r1").is_dir():
        pytest.skip("../shared/tokenizers not found")
    return load_tokenizer(str(TOKENIZERS / "deepseek-r1"))


def _texts(tok, n: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [tok.decode([rng.randrange(1000, 100000) for _ in range(length)], skip_special_tokens=True) for _ in range(n)]


@pytest.mark.parametrize("repeat", [1, 40])
@pytest.mark.parametrize("special", [True, False])
def test_ids_equal_encode_with_and_without_bos(special, repeat):
    """The demo tokenizer adds BOS: encode_batch gives encode's ids, BOS included or not, on the
    loop (short texts) and in the worker thread (long ones)."""
    tok = load_tokenizer(str(DEMO_MODEL))
    texts = [t * repeat for t in ("Once upon a time", "", "The little dog ran.", "  two  spaces")]
    assert tok.add_bos_token
    ids = asyncio.run(BatchEncoder(tok).encode(texts, special))
    assert ids == [tok.encode(t, add_special_tokens=special) for t in texts]
    assert all((i[:1] == [tok.bos_token_id]) == special for i in ids)


def test_concurrent_requests_share_batches_and_keep_their_own_ids(r1_tokenizer):
    """40 handlers asking at once, half with special tokens: each gets its own text's ids, in
    a few encode_batch calls rather than 40."""
    texts = _texts(r1_tokenizer, 40, 128)
    assert min(map(len, texts)) > INLINE_CHARS
    counting = CountingTokenizer(r1_tokenizer)
    encoder = BatchEncoder(counting)

    async def main():
        return await asyncio.gather(*(encoder.encode([t], i % 2 == 0) for i, t in enumerate(texts)))

    got = asyncio.run(main())
    assert [g[0] for g in got] == [r1_tokenizer.encode(t, add_special_tokens=i % 2 == 0) for i, t in enumerate(texts)]
    assert sum(counting.batches) == 40 and len(counting.batches) <= 4, counting.batches


def test_event_loop_runs_while_a_burst_is_encoded(r1_tokenizer):
    """64 prompts of 1,024 tokens: the loop's longest stall while they are encoded is a small
    part of the encoding time (encoded inline, the loop would stall for all of it)."""
    texts = _texts(r1_tokenizer, 64, 1024)
    encoder = BatchEncoder(r1_tokenizer)

    async def main():
        gaps, done = [], False

        async def ticker():
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        ids = await asyncio.gather(*(encoder.encode([t]) for t in texts))
        took = time.perf_counter() - start
        done = True
        await tick
        return ids, took, max(gaps)

    ids, took, worst = asyncio.run(main())
    assert [i[0] for i in ids] == [r1_tokenizer.encode(t) for t in texts]
    assert worst < 0.5 * took, (worst, took)


def test_a_cancelled_request_leaves_the_others_their_ids(r1_tokenizer):
    texts = _texts(r1_tokenizer, 6, 256, seed=1)
    encoder = BatchEncoder(r1_tokenizer)

    async def main():
        tasks = [asyncio.create_task(encoder.encode([t])) for t in texts]
        await asyncio.sleep(0)
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # the encoder still serves later requests
        return results, await encoder.encode([texts[0]])

    results, again = asyncio.run(main())
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r[0] for i, r in enumerate(results) if i != 2] == [r1_tokenizer.encode(t) for i, t in enumerate(texts) if i != 2]
    assert again == [r1_tokenizer.encode(texts[0])]


class FailingOn:
    """A tokenizer that fails on one text (in a batch or alone)."""

    def __init__(self, tok, bad: str):
        self.tok, self.bad = tok, bad

    def encode_batch(self, texts, add_special_tokens=True):
        if self.bad in texts:
            raise ValueError(f"cannot encode {self.bad!r}")
        return self.tok.encode_batch(texts, add_special_tokens)


def test_a_text_that_fails_fails_only_its_own_request():
    tok = load_tokenizer(str(DEMO_MODEL))
    encoder = BatchEncoder(FailingOn(tok, "bad" * 100))
    texts = ["Once upon a time " * 20, "bad" * 100, "The little dog " * 20]

    async def main():
        return await asyncio.gather(*(encoder.encode([t]) for t in texts), return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], ValueError) and "badbad" in str(results[1])
    assert [results[0][0], results[2][0]] == [tok.encode(texts[0]), tok.encode(texts[2])]


def test_a_short_text_at_low_load_is_encoded_on_the_loop():
    """Nothing queued or in flight and a short text: no batch call in the worker thread (the
    ids are the same either way)."""
    tok = load_tokenizer(str(DEMO_MODEL))
    counting = CountingTokenizer(tok)
    encoder = BatchEncoder(counting)
    encoder._pool.shutdown()            # a hop to the worker thread would fail now

    async def main():
        return await encoder.encode(["Once upon a time"], True)

    assert asyncio.run(main()) == [tok.encode("Once upon a time")] and counting.batches == [1]
