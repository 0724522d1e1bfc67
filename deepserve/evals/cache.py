"""Per-sample JSONL cache: an interrupted evaluation resumes without redoing or losing work.

One line per finished request, appended, flushed and fsynced as soon as the reply arrives,
so a kill (even SIGKILL) loses at most the requests in flight. A line torn by a kill mid-write
is skipped on load. The key hashes the task, item id, sample index, the exact prompt and the
sampling settings, so changing any of them never reuses a stale reply, while several
settings can share one file. Raw replies are stored (not scores): scoring is redone on every
run, so a fix to answer extraction applies to cached results too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from deepserve.evals.client import SamplingSettings


def cache_key(task: str, item_id: str, sample: int, prompt: str,
              settings: SamplingSettings) -> str:
    """A stable hex key for one request (same inputs -> same key, on any machine)."""
    payload = json.dumps({"task": task, "item": item_id, "sample": sample, "prompt": prompt,
                          "settings": asdict(settings)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class ReplyCache:
    """Append-only store of replies by key; `get` after `load` on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        needs_newline = False
        try:   # opened now: a path that cannot be written fails before any request is sent
            if self.path.exists():
                self._load()
                with open(self.path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell():
                        f.seek(-1, os.SEEK_END)
                        needs_newline = f.read(1) != b"\n"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot use {self.path} as the reply cache: {exc.strerror}") from None
        if needs_newline:
            self._file.write("\n")   # never append to the end of a torn line

    def _load(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    self.records[record["key"]] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.torn_lines += 1  # a write cut short by a kill; that sample is redone

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def put(self, record: dict) -> None:
        """Store one reply durably before returning."""
        if "key" not in record:
            raise ValueError(f"cache record needs a 'key', got fields {sorted(record)}")
        if self._file is None:
            raise ValueError(f"the reply cache {self.path} is closed")
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.records[record["key"]] = record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
