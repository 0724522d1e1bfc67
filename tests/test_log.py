"""deepserve/log.py: a process that imports deepserve with DEEPSERVE_LOG_LEVEL set and no
logging of its own (an engine core process `deepserve serve` starts) logs the deepserve logger
to stderr at that level."""
from __future__ import annotations

import logging
import os

import pytest

from deepserve.log import ENV, configure_from_env, for_spawned_processes


@pytest.fixture
def bare_logging(monkeypatch):
    """A process without logging set up: no deepserve handler (and each test empties the
    root's, which pytest's log capture fills only once the test body runs)."""
    log = logging.getLogger("deepserve")
    monkeypatch.setattr(log, "handlers", [])
    monkeypatch.setattr(log, "propagate", True)
    monkeypatch.setattr(log, "level", log.level)
    return log


def test_configured_from_the_env(bare_logging, monkeypatch, capsys):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setenv(ENV, "info")
    configure_from_env()
    bare_logging.info("an info line")
    bare_logging.debug("a debug line")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].endswith("INFO deepserve: an info line")
    assert not bare_logging.propagate


def test_left_alone_without_the_env_or_with_logging_set_up(bare_logging, monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.delenv(ENV, raising=False)
    configure_from_env()
    assert bare_logging.handlers == []
    monkeypatch.setenv(ENV, "info")
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])  # the process's own
    configure_from_env()
    assert bare_logging.handlers == []


def test_level_set_only_while_starting_processes(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with for_spawned_processes("warning"):
        assert os.environ[ENV] == "warning"
    assert ENV not in os.environ
    monkeypatch.setenv(ENV, "debug")  # set by hand: kept
    with for_spawned_processes("warning"):
        assert os.environ[ENV] == "debug"
    assert os.environ[ENV] == "debug"
