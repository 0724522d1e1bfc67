"""The Responses API's store (OpenAI's `store`, vLLM's VLLM_ENABLE_RESPONSES_API_STORE): the
responses of /v1/responses kept in the API server's memory, each with the conversation that
led to it, for GET /v1/responses/{id}, previous_response_id, background responses and their
cancel.

The store is bounded: past `max_size` responses the oldest finished one is dropped (the oldest
of all when every one is still running in the background; its generation is then cancelled), so
a long-running server does not grow without limit. vLLM's store keeps everything.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import AsyncIterator, Optional

logger = logging.getLogger("deepserve")

RUNNING = ("queued", "in_progress")


class EventLog:
    """A background stream's SSE frames, kept for replay (vLLM's event store): the frame of
    sequence number i is frames[i]; readers wait for more until the generation has ended."""

    def __init__(self):
        self.frames: list[str] = []
        self.done = False
        self._changed = asyncio.Event()

    def add(self, frame: str) -> None:
        self.frames.append(frame)
        self._changed.set()

    def close(self) -> None:
        self.done = True
        self._changed.set()

    async def replay(self, start: int = 0) -> AsyncIterator[str]:
        """The frames from sequence number `start` on, as they come, until the stream ends (its
        last event, or a cancel, which sends none)."""
        i = start
        while True:
            self._changed.clear()
            while i < len(self.frames):
                yield self.frames[i]
                i += 1
            if self.done:
                return
            await self._changed.wait()


@dataclass
class StoredResponse:
    response: dict                       # the Response object as GET returns it
    items: list[dict]                    # its input items after the previous responses' (no instructions)
    task: Optional[asyncio.Task] = None  # a background response's generation
    events: Optional[EventLog] = None    # a background stream's events

    @property
    def running(self) -> bool:
        return self.response["status"] in RUNNING

    def conversation(self) -> list[dict]:
        """The input items that continue this response: its conversation, then its output."""
        return self.items + [item for item in map(output_as_input, self.response["output"]) if item is not None]


def output_as_input(item: dict) -> Optional[dict]:
    """An output item as the input item that sends it back (None for a message without text)."""
    if item["type"] == "message":
        text = "".join(part.get("text") or "" for part in item["content"])
        return {"type": "message", "role": "assistant", "content": text} if text else None
    if item["type"] == "reasoning":
        return {"type": "reasoning", "content": [dict(part) for part in item["content"]]}
    return {"type": item["type"], "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}


class ResponseStore:
    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, response_id: str) -> Optional[StoredResponse]:
        return self._entries.get(response_id)

    def put(self, response_id: str, entry: StoredResponse) -> None:
        self._entries.pop(response_id, None)
        self._entries[response_id] = entry
        while len(self._entries) > self.max_size:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        victim = next((rid for rid, e in self._entries.items() if not e.running), None)
        if victim is None:
            victim = next(iter(self._entries))
            logger.warning("responses store full (%d) of background responses: cancelling the oldest, %s",
                           self.max_size, victim)
        entry = self._entries.pop(victim)
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()   # aborts its engine request
