"""The deepserve logger in processes the API server spawns (engine cores, their TP / PP
workers): `deepserve serve` sets DEEPSERVE_LOG_LEVEL to its --log-level while it starts the
engine, and a process that imports deepserve with it set and no logging of its own logs the
"deepserve" logger to stderr at that level, so the engine's start-up lines (weights, KV pool,
--ops-profile) show wherever the engine runs. vLLM configures its logger at import the same
way (VLLM_LOGGING_LEVEL); DEEPSERVE_LOG_LEVEL set by hand does the same for any process.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

ENV = "DEEPSERVE_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_from_env() -> None:
    level = os.environ.get(ENV, "").upper()
    logger = logging.getLogger("deepserve")
    if not level or logging.getLogger().handlers or logger.handlers:  # this process set up logging itself
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, level, logging.INFO))
    logger.propagate = False  # a root handler added later must not print each line twice


@contextlib.contextmanager
def for_spawned_processes(level: str):
    """DEEPSERVE_LOG_LEVEL=level (unless already set) while the body starts processes."""
    before = os.environ.get(ENV)
    os.environ.setdefault(ENV, level)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
