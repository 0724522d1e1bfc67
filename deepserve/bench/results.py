"""Saving a benchmark's result file: the path checked before the run, written after it."""
from __future__ import annotations

import os
from pathlib import Path


def check_result_path(path: Path, flag: str) -> None:
    """Fail before a run whose result could not be saved (its folder a file, not to be made or
    not writable, the file's place a folder): one line naming `flag`, not a traceback after it."""
    folder = path.parent
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ValueError(f"{flag}: {blocking} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot make the folder {exc.filename or folder} ({exc.strerror})") from None
    if path.is_dir():
        raise ValueError(f"{flag}: {path} is a folder")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag}: cannot write in {folder} (permission denied)")


def write_result(path: Path, text: str, append: bool = False) -> None:
    """The result file (appended: one JSON document a line, as vLLM appends them); a failure to
    write is one line."""
    try:
        if append:
            with path.open("a", encoding="utf-8") as f:
                f.write(("\n" if f.tell() else "") + text)
        else:
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
