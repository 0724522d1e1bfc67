"""The environment every Ray actor gets from the driver (engine/ray_executor.rank_env): the
variables each rank reads itself, unset ones as "" so a node's own exports cannot differ."""
from __future__ import annotations

from deepserve.engine import ray_executor


def test_actors_get_the_drivers_rank_variables(monkeypatch):
    for name in ray_executor.RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEEPSERVE_LOG_LEVEL", "debug")
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,2")
    env = ray_executor.rank_env()
    assert env["DEEPSERVE_LOG_LEVEL"] == "debug" and env["VLLM_PP_LAYER_PARTITION"] == "1,2"
    assert env["DEEPSERVE_OPS_COUNT"] == "" and set(env) == set(ray_executor.RANK_ENV)
