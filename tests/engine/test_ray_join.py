"""Joining a Ray cluster that does not answer: one line before ray.init, which would retry the
cluster's GCS without end (a head stopped without `ray stop` leaves its address in Ray's file,
and ray.init with no RAY_ADDRESS joins it)."""
from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest

from deepserve.engine import ray_executor


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_ray_file(monkeypatch):
    ray_utils = pytest.importorskip("ray._private.utils")
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: None)
    return ray_utils


def test_a_ray_address_that_does_not_answer_is_one_line(monkeypatch, no_ray_file):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"does not answer .*RAY_ADDRESS") as err:
        ray_executor.check_cluster_answers()
    assert "\n" not in str(err.value) and time.monotonic() - start < 5


def test_the_address_ray_start_left_behind(monkeypatch, no_ray_file):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(no_ray_file, "read_ray_address", lambda temp_dir=None: f"127.0.0.1:{closed_port()}")
    with pytest.raises(RuntimeError, match=r"ray_current_cluster, left by `ray start`\) does not answer"):
        ray_executor.check_cluster_answers()
    # ray.init is never reached
    inits = []
    fake = SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: inits.append(kw))
    monkeypatch.setattr(ray_executor, "_import_ray", lambda: fake)
    with pytest.raises(RuntimeError, match="does not answer"):
        ray_executor._join_ray()
    assert inits == []


def test_a_cluster_that_answers_or_none_to_join_passes(monkeypatch, no_ray_file):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{server.getsockname()[1]}")
        ray_executor.check_cluster_answers()
    monkeypatch.setenv("RAY_ADDRESS", "local")          # ray.init starts a cluster of its own
    ray_executor.check_cluster_answers()
    monkeypatch.delenv("RAY_ADDRESS")                   # no file either: the same
    ray_executor.check_cluster_answers()
