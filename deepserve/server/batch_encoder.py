"""Prompt tokenization off the API server's event loop.

Encoding a 1,024-token prompt with the R1 tokenizer takes about 4 ms of CPU, all of it holding
the GIL. Done inline in each request's handler, a burst of 256 such requests holds the event
loop for about a second, during which no request gets its prompt to the engine core and no
stream gets its tokens. `BatchEncoder` queues the texts of the handlers that ask and encodes
them in one worker thread with the tokenizer's `encode_batch`, which releases the GIL (so the
loop goes on serving streams) and spreads a batch over the cores. One batch is in flight at a
time; the texts queued meanwhile form the next one, so a burst is encoded in a few batches.
A short text asked for while nothing is queued or in flight (a chat turn at low load) is encoded
at once on the loop, where it costs less than the hop to the worker thread and back.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor


INLINE_CHARS = 256   # about 64 tokens: tens of microseconds to encode on the loop itself


class BatchEncoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._queue: list[tuple[str, bool, asyncio.Future]] = []
        self._busy = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="deepserve-encode")

    async def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """The token ids of each text, as `tokenizer.encode(text, add_special_tokens)`."""
        add_special_tokens = bool(add_special_tokens)
        if not self._busy and sum(map(len, texts)) <= INLINE_CHARS:
            return self.tokenizer.encode_batch(texts, add_special_tokens)
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            futures.append(loop.create_future())
            self._queue.append((text, add_special_tokens, futures[-1]))
        if not self._busy:
            # the handlers made ready in this turn of the loop join the batch
            self._busy = True
            loop.call_soon(self._start, loop)
        return list(await asyncio.gather(*futures))

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queue = self._queue, []
        batch = [item for item in batch if not item[2].done()]   # handlers cancelled while queued
        if not batch:
            self._busy = False
            return
        job = loop.run_in_executor(self._pool, self._encode, batch)
        job.add_done_callback(lambda done: self._finish(loop, batch, done))

    def _encode(self, batch: list) -> list:
        """In the worker thread: one encode_batch call per add_special_tokens value; if a batch
        fails, its texts one by one, so that only the text at fault gets the error."""
        ids: list = [None] * len(batch)
        for special in (True, False):
            picked = [i for i, item in enumerate(batch) if item[1] is special]
            if not picked:
                continue
            try:
                encoded = self.tokenizer.encode_batch([batch[i][0] for i in picked], special)
            except Exception:  # noqa: BLE001  (told apart below, text by text)
                encoded = []
                for i in picked:
                    try:
                        encoded.append(self.tokenizer.encode_batch([batch[i][0]], special)[0])
                    except Exception as exc:  # noqa: BLE001  (handed to that text's request)
                        encoded.append(exc)
            for i, one in zip(picked, encoded):
                ids[i] = one
        return ids

    def _finish(self, loop: asyncio.AbstractEventLoop, batch: list, job: asyncio.Future) -> None:
        error = job.exception()
        for i, (_, _, future) in enumerate(batch):
            if future.done():
                continue
            result = error if error is not None else job.result()[i]
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._start(loop)
