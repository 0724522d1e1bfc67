"""Executors: where the model runs. `UniExecutor` is one process; `MultiprocExecutor`
starts and supervises one worker process per extra rank on this node.

The driver (rank 0, inside the engine's process) schedules and samples; every step it
broadcasts the step's host inputs (plain lists) over a gloo group, and each rank runs the
same forward on its shard (TP collectives inside the model, PP send/recv between stages).
A monitor thread watches the workers: one that exits makes `failure` name its rank, host
and exit code. Collectives carry a timeout (`DEEPSERVE_DIST_TIMEOUT`, seconds), so a stuck
peer becomes an error instead of a silent hang.

With data_parallel_size > 1 (DP attention, rank layout in parallel_state.rank_layout) the
driver is also DP rank 0; it schedules every DP rank's batch and publishes them together.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

import torch.distributed as dist
import torch.multiprocessing as mp

from deepserve.config import EngineConfig
from deepserve.distributed.parallel_state import control_group, destroy_distributed, init_distributed
from deepserve.platforms import Platform, get_platform

logger = logging.getLogger("deepserve")


def dist_timeout_s() -> float:
    return float(os.environ.get("DEEPSERVE_DIST_TIMEOUT", "300"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies, however the parent ends (even
    SIGKILL), so a lost driver never leaves orphan workers holding GPUs."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # no glibc: workers still exit on the driver's stop message or a broken collective


class UniExecutor:
    def __init__(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
        from deepserve.engine.model_runner import ModelRunner
        self.runner = ModelRunner(config, platform, eos_token_ids=eos_token_ids)
        self.failure: Optional[str] = None

    def explain(self, exc: BaseException) -> str:
        return str(exc)

    def shutdown(self) -> None:
        pass


def _worker_main(rank: int, config: EngineConfig, platform_name: str, init_method: str,
                 timeout_s: float, local_rank: Optional[int] = None) -> None:
    """A worker rank: join the group, load its shard, then run every step the driver sends."""
    _die_with_parent()
    from deepserve.engine.model_runner import ModelRunner
    platform = get_platform(platform_name)
    par = config.parallel
    local_rank = rank if local_rank is None else local_rank
    pctx = init_distributed(rank, par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
                            platform.dist_backend, init_method, timeout_s, par.enable_expert_parallel,
                            local_rank, par.data_parallel_size, par.all2all_backend)
    runner = ModelRunner(config, platform, pctx, local_rank=local_rank)
    group = control_group()
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] is None:
            break
        runner.run_published(box[0])
    destroy_distributed()


class DriverExecutor:
    """What every multi-rank executor shares: the driver's own rank (rank 0, in this process),
    the per-step broadcast of host inputs, and naming the worker behind a broken collective.
    Subclasses start the workers and set `failure` when one dies."""

    failure: Optional[str] = None
    _closing = False

    def _start_driver(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int],
                      init_method: str, timeout: float) -> None:
        from deepserve.engine.model_runner import ModelRunner
        par = config.parallel
        pctx = init_distributed(0, par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
                                platform.dist_backend, init_method, timeout, par.enable_expert_parallel,
                                dp_size=par.data_parallel_size, all2all_backend=par.all2all_backend)
        self.runner = ModelRunner(config, platform, pctx, local_rank=0, eos_token_ids=eos_token_ids)
        self.group = control_group()
        self.runner.publish = self._publish

    def _publish(self, host: dict) -> None:
        if self.failure:
            raise RuntimeError(self.failure)
        dist.broadcast_object_list([host], src=0, group=self.group)

    def _tell_workers_to_stop(self) -> bool:
        """Send the stop message (unless a worker already died); False if it could not be sent."""
        if self.failure is not None:
            return False
        try:
            dist.broadcast_object_list([None], src=0, group=self.group)
            return True
        except RuntimeError as exc:
            logger.warning("could not tell workers to stop: %s", exc)
            return False

    def explain(self, exc: BaseException) -> str:
        """The reason behind a failed collective: a dead worker when there is one (the
        monitor may notice a moment after the collective broke)."""
        deadline = time.monotonic() + 3.0
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return f"{self.failure} ({exc})" if self.failure else str(exc)


class MultiprocExecutor(DriverExecutor):
    def __init__(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
        self.world_size = config.parallel.world_size
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        timeout = dist_timeout_s()
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, name=f"deepserve-rank{r}", daemon=True,
                                  args=(r, config, platform.name, init_method, timeout))
                      for r in range(1, self.world_size)]
        for p in self.procs:
            p.start()
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="deepserve-worker-monitor")
        self._monitor.start()
        self._start_driver(config, platform, eos_token_ids, init_method, timeout)

    def _watch(self) -> None:
        host = socket.gethostname()
        while not self._closing:
            for rank, p in enumerate(self.procs, start=1):
                p.join(timeout=0.2)
                if p.exitcode is not None and not self._closing and self.failure is None:
                    self.failure = (f"worker rank {rank} (pid {p.pid}) on host {host} exited with code "
                                    f"{p.exitcode}")
                    logger.error(self.failure)

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        stopped = self._tell_workers_to_stop()
        # tear down together with the workers (NCCL's teardown may wait on its peers), and
        # only then wait for them to exit
        if stopped:
            destroy_distributed()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        if not stopped:
            destroy_distributed(timeout_s=5.0)


def make_executor(config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
    par = config.parallel
    if par.world_size == 1:
        return UniExecutor(config, platform, eos_token_ids)
    if par.distributed_executor_backend == "ray":
        from deepserve.distributed.ray_executor import RayExecutor
        return RayExecutor(config, platform, eos_token_ids)
    return MultiprocExecutor(config, platform, eos_token_ids)
