"""Ray executor: one worker actor per extra rank, placed by Ray (one GPU each on GPU
clusters), for deployments across nodes (`--distributed-executor-backend ray`).

The driver joins an existing Ray cluster (`ray start --head` / `ray start --address`, or
RAY_ADDRESS); without one it starts a local Ray instance. Workers run the same loop as the
multi-process executor (`_worker_main`, engine/executor.py); the process group meets at the
driver's node IP.
A worker actor that dies makes `failure` name its rank and node.
"""
from __future__ import annotations

import logging
import os
import threading

from deepserve.config import EngineConfig
from deepserve.engine.executor import (DriverExecutor, _worker_main, check_no_live_group, dist_timeout_s, free_port,
                                       start_timeout_s)
from deepserve.distributed.parallel_state import destroy_distributed
from deepserve.platforms import Platform

logger = logging.getLogger("deepserve")

# read by every rank itself (the pipeline split, the Triton launch toggles): the Ray workers get
# the driver's values, unset ones as "" (the default), so every rank agrees with the driver
# whatever the nodes exported before `ray start` (vLLM copies its environment to them too)
RANK_ENV = ("VLLM_PP_LAYER_PARTITION", "DEEPSERVE_PDL", "DEEPSERVE_PDL_TRIGGER_FIRST", "DEEPSERVE_PREFETCH")


def rank_env() -> dict[str, str]:
    return {name: os.environ.get(name, "") for name in RANK_ENV}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--distributed-executor-backend ray needs Ray: pip install 'deepserve[ray]'") from None
    return ray


class RayExecutor(DriverExecutor):
    def __init__(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
        ray = _import_ray()
        check_no_live_group()
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                     log_to_driver=False, ignore_reinit_error=True)
        self.world_size = config.parallel.world_size
        # where the process group meets: this node's cluster address (DEEPSERVE_HOST_IP overrides)
        node_id = ray.get_runtime_context().get_node_id()
        ip = os.environ.get("DEEPSERVE_HOST_IP") or next(
            n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        init_method = f"tcp://{ip}:{free_port()}"
        timeout = dist_timeout_s()
        gpu = platform.device_type == "cuda"

        @ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)
        class Worker:
            def node(self) -> str:
                # the address this node joined the cluster with (not a guessed interface)
                node_id = ray.get_runtime_context().get_node_id()
                return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)

            def run(self, rank, cfg, platform_name, init, timeout_s):
                # Ray shows each actor only its own GPU: it is device 0 here
                _worker_main(rank, cfg, platform_name, init, timeout_s, local_rank=0)

        env = {"env_vars": rank_env()}
        self.actors = [Worker.options(name=None, runtime_env=env).remote() for _ in range(1, self.world_size)]
        try:
            self.nodes = ray.get([a.node.remote() for a in self.actors], timeout=start_timeout_s())
        except ray.exceptions.GetTimeoutError:
            for actor in self.actors:
                ray.kill(actor)
            need = f"1 CPU{' and 1 GPU' if gpu else ''} each"
            raise RuntimeError(f"Ray placed fewer than {len(self.actors)} worker actors ({need}) within "
                               f"{start_timeout_s():.0f} s; the cluster has {ray.cluster_resources()}") from None
        self.runs = [a.run.remote(r, config, platform.name, init_method, timeout)
                     for r, a in enumerate(self.actors, start=1)]
        self._ray = ray
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="deepserve-ray-monitor")
        self._monitor.start()
        self._start_driver(config, platform, eos_token_ids, init_method, timeout)

    def _watch(self) -> None:
        while not self._closing:
            done, _ = self._ray.wait(self.runs, num_returns=1, timeout=0.5)
            if done and not self._closing and self.failure is None:
                rank = self.runs.index(done[0]) + 1
                try:
                    self._ray.get(done[0])
                    why = "returned early"
                except Exception as exc:  # noqa: BLE001 - any actor death is reported, not raised here
                    why = f"died: {type(exc).__name__}"
                self.failure = f"worker rank {rank} on node {self.nodes[rank - 1]} {why}"
                logger.error(self.failure)
                return

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        stopped = self._tell_workers_to_stop()
        destroy_distributed(timeout_s=20.0 if stopped else 5.0)  # together with the workers' own
        if stopped:
            try:
                self._ray.get(self.runs, timeout=30)
            except Exception as exc:  # noqa: BLE001 - shutting down: log and kill
                logger.warning("ray workers did not stop cleanly: %s", exc)
        for actor in self.actors:
            self._ray.kill(actor)
