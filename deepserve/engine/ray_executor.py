"""Ray: ranks as actors that Ray places (one GPU each on GPU clusters), for deployments
across nodes (`--distributed-executor-backend ray`).

`RayExecutor` (one DP rank): the driver (rank 0, in the engine's process) schedules and
samples; every other rank is a worker actor running the multi-process executor's loop
(`_worker_main`, engine/executor.py), the process group meeting at the driver's node IP.
`RayRanks` (data parallel, vLLM's Ray DP backend): every rank is an actor; each DP rank's
first actor runs its engine core (engine/engine_core.run_rank) and its TP/PP peers run the
steps it publishes, all of a DP rank's actors packed on one node by a placement group; the
front end (engine/dp_engine.py) talks to the cores over ZeroMQ on tcp ports of its node.

The driver joins an existing Ray cluster (`ray start --head` / `ray start --address`, or
RAY_ADDRESS), refused at once when it does not answer (`check_cluster_answers`); without one it
starts a local Ray instance. An actor that dies makes `failure`
name its rank and node; a cluster with fewer CPUs (GPUs) in all than the actors take fails the
start at once, and actors Ray cannot place otherwise (no node with room for a DP rank's group)
after DEEPSERVE_WORKER_START_TIMEOUT, naming the cluster's resources.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Optional

from deepserve.config import EngineArgs, EngineConfig
from deepserve.engine.executor import (DriverExecutor, _worker_main, check_no_live_group, dist_timeout_s, free_port,
                                       start_timeout_s)
from deepserve.distributed.cluster import ray_token_auth_as_started
from deepserve.distributed.parallel_state import destroy_distributed
from deepserve.platforms import Platform, get_platform

logger = logging.getLogger("deepserve")

# read by every rank itself (the pipeline split, the Triton launch toggle, op counting,
# counting the bytes a rank sends, the log level): the Ray actors get the driver's
# values, unset ones as "" (the default), so every rank agrees with the driver whatever the
# nodes exported before `ray start` (vLLM copies its environment to them too)
RANK_ENV = ("VLLM_PP_LAYER_PARTITION", "DEEPSERVE_PDL", "DEEPSERVE_OPS_COUNT",
            "DEEPSERVE_COUNT_STEP_BYTES", "DEEPSERVE_LOG_LEVEL")


def rank_env() -> dict[str, str]:
    return {name: os.environ.get(name, "") for name in RANK_ENV}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--distributed-executor-backend ray needs Ray: pip install 'deepserve[ray]'") from None
    return ray


def _cluster_to_join() -> Optional[tuple[str, str]]:
    """(host:port, where it came from) of the Ray cluster ray.init will join: RAY_ADDRESS, or
    with none (or "auto") the one `ray start` last left in Ray's address file on this machine;
    None where ray.init starts a cluster of its own."""
    address = os.environ.get("RAY_ADDRESS") or "auto"
    if address == "local":
        return None
    if address != "auto":
        return address.split("://", 1)[-1], "RAY_ADDRESS"
    try:
        from ray._private.utils import get_ray_address_file, read_ray_address
        address, where = read_ray_address(), get_ray_address_file(None)
    except (ImportError, AttributeError):      # another Ray layout: leave it to ray.init
        return None
    return (address, f"{where}, left by `ray start`") if address else None


def check_cluster_answers(timeout_s: float = 5.0) -> None:
    """A Ray cluster that ray.init would join but that does not answer (its head stopped without
    `ray stop`, or RAY_ADDRESS names a wrong port) is one line; ray.init would retry its GCS
    without end."""
    found = _cluster_to_join()
    if found is None:
        return
    address, where = found
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RuntimeError(f"the Ray cluster at {address} ({where}) does not answer ({exc.strerror or exc}): "
                           "start it (`ray start --head`), clear a stale one (`ray stop`), or set RAY_ADDRESS "
                           "to a running cluster") from None


def _join_ray():
    ray = _import_ray()
    if not ray.is_initialized():
        check_cluster_answers()
        ray_token_auth_as_started(os.environ.get("RAY_ADDRESS"))
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    return ray


def node_ip(ray) -> str:
    """The address this process's node joined the cluster with (not a guessed interface)."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


def check_room(ray, actors: int, gpu: bool) -> None:
    """Fail at once (as vLLM does) when the whole cluster has fewer CPUs, or GPUs, than the
    actors take: waiting start_timeout_s for room that no node offers only delays the error."""
    total = ray.cluster_resources()
    short = [f"{int(total.get(kind, 0))} {kind}" for kind in (("CPU", "GPU") if gpu else ("CPU",))
             if total.get(kind, 0) < actors]
    if short:
        more = ("add nodes (`ray start --address HEAD:PORT` on each)" if gpu else
                "start Ray with more logical CPUs (`ray start --head --num-cpus N`: a CPU rank needs no core of "
                "its own)")
        raise RuntimeError(f"{actors} Ray actors take 1 CPU{' and 1 GPU' if gpu else ''} each, and the Ray cluster "
                           f"has {' and '.join(short)} in all: {more}, or run fewer ranks")


def _unplaced(ray, what: str, gpu: bool) -> RuntimeError:
    need = f"1 CPU{' and 1 GPU' if gpu else ''} each"
    return RuntimeError(f"Ray placed fewer than {what} ({need}) within {start_timeout_s():.0f} s; "
                        f"the cluster has {ray.cluster_resources()}")


class RayExecutor(DriverExecutor):
    def __init__(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
        check_no_live_group()
        ray = _join_ray()
        self.world_size = config.parallel.world_size
        gpu = platform.device_type == "cuda"
        check_room(ray, self.world_size - 1, gpu)    # rank 0 is this process
        # where the process group meets: this node's cluster address (DEEPSERVE_HOST_IP overrides)
        ip = os.environ.get("DEEPSERVE_HOST_IP") or node_ip(ray)
        init_method = f"tcp://{ip}:{free_port()}"
        timeout = dist_timeout_s()

        @ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)
        class Worker:
            def node(self) -> str:
                return node_ip(ray)

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
            raise _unplaced(ray, f"{len(self.actors)} worker actors", gpu) from None
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
                if self.log_failure:
                    logger.error(self.failure)
                return

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        stopped = self._tell_workers_to_stop()
        destroy_distributed(timeout_s=20.0 if stopped else 5.0)  # together with the workers' own
        self.channel = None   # its group holds the rendezvous store, which listens while referenced
        if stopped:
            try:
                self._ray.get(self.runs, timeout=30)
            except Exception as exc:  # noqa: BLE001 - shutting down: log and kill
                logger.warning("ray workers did not stop cleanly: %s", exc)
        for actor in self.actors:
            self._ray.kill(actor)


class RayRanks:
    """Every rank of a data-parallel engine as a Ray actor (see the module docstring). For the
    front end it stands where `WorkerProcs` stands for spawned ranks: `failure`, `closing`,
    `wait_joining`, `started`, `stop`. Placed at construction (`front_end_ip` and `init_method` are then
    known, for the front end's DPLayout); `start(layout)` runs them."""

    label = "rank"
    log_failure = True

    def __init__(self, args: EngineArgs):
        check_no_live_group()
        ray = self._ray = _join_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        self._remove_group = remove_placement_group
        self.failure: Optional[str] = None
        self.closing = False
        self.starting = True      # as WorkerProcs': the front end raises a failure at start, logged after it
        self.runs: list = []
        dp = args.data_parallel_size
        span = self.span = args.tensor_parallel_size * args.pipeline_parallel_size
        gpu = get_platform(args.device).device_type == "cuda"
        check_room(ray, dp * span, gpu)
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        # a DP rank's TP/PP ranks on one node (their collectives are the per-layer ones)
        self.groups = [placement_group([bundle] * span, strategy="STRICT_PACK") for _ in range(dp)]
        self.actors = []
        try:
            ready, _ = ray.wait([g.ready() for g in self.groups], num_returns=dp, timeout=start_timeout_s())
            if len(ready) < dp:
                raise _unplaced(ray, f"{dp} DP ranks of {span} actors", gpu)
            actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_RankActor)
            env = {"env_vars": rank_env()}
            self.actors = [actor.options(runtime_env=env, scheduling_strategy=PlacementGroupSchedulingStrategy(
                g, placement_group_bundle_index=i)).remote() for g in self.groups for i in range(span)]
            self.nodes = ray.get([a.node.remote() for a in self.actors], timeout=start_timeout_s())
            # the process group meets where rank 0 (DP rank 0's core) runs
            self.init_method = f"tcp://{self.nodes[0]}:{ray.get(self.actors[0].free_port.remote())}"
        except BaseException:
            self.stop(graceful_s=0.0)
            raise
        # where the front end listens for the cores (DEEPSERVE_HOST_IP overrides)
        self.front_end_ip = os.environ.get("DEEPSERVE_HOST_IP") or node_ip(ray)

    def start(self, args: EngineArgs, layout) -> "RayRanks":
        addresses = (layout.inboxes, layout.outboxes)
        # Ray shows each actor only its own GPU: it is device 0 there
        self.runs = [a.run.remote(r, 0, args, layout.init_method, dist_timeout_s(), addresses)
                     for r, a in enumerate(self.actors)]
        threading.Thread(target=self._watch, daemon=True, name="deepserve-ray-ranks").start()
        return self

    def _watch(self) -> None:
        while not self.closing and self.failure is None:
            done, _ = self._ray.wait(self.runs, num_returns=1, timeout=0.5)
            if done and not self.closing:
                rank = self.runs.index(done[0])
                try:
                    self._ray.get(done[0])
                    why = "returned early"
                except Exception as exc:  # noqa: BLE001 - any actor death is reported, not raised here
                    # an error the rank raised (Ray wraps it, `cause`), else the actor's process died
                    cause = getattr(exc, "cause", None)
                    why = (f"failed: {type(cause).__name__}: {cause}" if isinstance(cause, Exception)
                           else f"died: {type(exc).__name__}")
                self.failure = (f"{self.label} {rank} (DP rank {rank // self.span}, a Ray actor on node "
                                f"{self.nodes[rank]}) {why}")
                if not self.starting and self.log_failure:
                    logger.error(self.failure)

    def started(self) -> None:
        self.starting = False

    def wait_joining(self, timeout_s: float) -> None:
        """Placed at construction: only a failure since then to report."""
        if self.failure:
            raise RuntimeError(self.failure)

    def stop(self, graceful_s: float = 10.0) -> None:
        """Wait up to `graceful_s` for the ranks to leave (the front end told the cores to
        stop), then end their actors and free their placement groups."""
        self.closing = True
        if self.runs and graceful_s > 0:
            self._ray.wait(self.runs, num_returns=len(self.runs), timeout=graceful_s)
        for actor in self.actors:
            self._ray.kill(actor)
        for group in self.groups:
            self._remove_group(group)


class _RankActor:
    """One rank of a data-parallel engine (made a Ray actor class by `RayRanks`)."""

    def node(self) -> str:
        import ray
        return node_ip(ray)

    def free_port(self) -> int:
        return free_port("")

    def run(self, rank: int, local_rank: int, args: EngineArgs, init_method: str, timeout_s: float,
            addresses) -> None:
        from deepserve.engine.engine_core import run_rank
        run_rank(rank, local_rank, args, init_method, timeout_s, addresses)
