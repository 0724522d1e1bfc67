"""Executors: where the model runs. `UniExecutor` is one process; `MultiprocExecutor`
starts and supervises one worker process per extra rank on this node.

The driver (rank 0, inside the engine's process) schedules and samples; every step it
sends the step's inputs (a typed `StepMessage`, engine/step_inputs.py) to every other rank
over a gloo group without waiting for them (engine/step_channel.py), and each rank runs the
same forward on its shard (TP collectives inside the model, PP send/recv between stages).
Collectives carry a timeout (`DEEPSERVE_DIST_TIMEOUT`, seconds), so a stuck peer becomes an
error instead of a silent hang.

Workers start from a fork server (`fork_server.process_context`): a fresh interpreter that imports torch
and the engine modules once, then forks each worker, so a worker does not pay the seconds of
that import again (`deepserve serve` starts it before its own imports, engine/fork_server.py,
so that the two run side by side); the engine's own process is never forked (a CPU parent
that already ran OpenMP kernels hangs a forked child's first parallel op). The fork server lives while an
engine of the process has workers: the last one's `shutdown()` stops it (`stop_fork_server`;
DEEPSERVE_KEEP_FORK_SERVER=1 keeps it for the next engine). Each worker takes the environment
the engine's process has when it starts the worker, and, as with spawn, re-imports the main
module. `WorkerProcs` supervises them: each reports over a pipe when it
is about to join the process group and any start-up error, and a monitor thread turns an
exit or an error into `failure`, naming the rank. The driver joins the group only once
every worker has reported, so a worker that dies at start-up (including one that re-ran an
unguarded script's main module) fails the start in seconds instead of at the rendezvous
timeout. `shutdown()` (also run when the engine is garbage-collected) stops the workers and
tears the process group down, so another engine can start in the same process.
"""
from __future__ import annotations

import logging
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
import weakref
from typing import Callable, Optional

import torch.distributed as dist
import torch.multiprocessing as mp

from deepserve.config import EngineConfig
from deepserve.distributed.parallel_state import control_group, destroy_distributed, init_distributed
from deepserve.engine.fork_server import process_context
from deepserve.engine.profiler import run_worker_steps
from deepserve.engine.step_channel import PeerLost, StepChannel, lost_a_peer
from deepserve.engine.step_inputs import STOP
from deepserve.platforms import Platform, get_platform

logger = logging.getLogger("deepserve")

GUARD_HINT = ('a script that starts a multi-process engine must guard its entry point with '
              '`if __name__ == "__main__":` (every worker process re-imports the main module)')


# `WorkerProcs` of this process not stopped yet; the lock also orders their starts against
# stopping the fork server (a start in flight would hand it a closed keep-alive pipe end)
_fork_server_users = [0]
_fork_server_lock = threading.RLock()
# every `WorkerProcs` of this process, for `kill_workers`
_all_worker_procs: "weakref.WeakSet[WorkerProcs]" = weakref.WeakSet()


def keep_fork_server() -> bool:
    """DEEPSERVE_KEEP_FORK_SERVER=1: leave the fork server running when the last engine stops,
    for the next engine of this process (which then skips its torch import)."""
    return os.environ.get("DEEPSERVE_KEEP_FORK_SERVER", "0") == "1"


def stop_fork_server(wait_s: float = 5.0) -> bool:
    """Stop the fork server this process started (multiprocessing's, one per process; the next
    `process_context` start begins a new one); False where there is none or it is not as
    expected. Python has no public call for it: this does what its own `ForkServer._stop` does
    (close the keep-alive pipe end, whose EOF ends the server, and forget it) through the
    same private fields, but waits at most `wait_s` for the exit, since a process forked from
    the server that kept a copy of that pipe end would keep it running."""
    from multiprocessing import forkserver, util
    server = getattr(forkserver, "_forkserver", None)
    fields = ("_lock", "_forkserver_pid", "_forkserver_alive_fd", "_forkserver_address")
    if not all(hasattr(server, f) for f in fields):
        return False
    with server._lock:
        pid, fd, address = server._forkserver_pid, server._forkserver_alive_fd, server._forkserver_address
        if pid is None or fd is None:
            return False
        os.close(fd)
        server._forkserver_pid = server._forkserver_alive_fd = server._forkserver_address = None
        if hasattr(server, "_forkserver_authkey"):   # (Pythons whose server checks a key: a new one gets its own)
            server._forkserver_authkey = None
    if isinstance(address, str) and not getattr(util, "is_abstract_socket_namespace", lambda a: True)(address):
        try:
            os.unlink(address)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:   # reaped elsewhere
            return True
        if time.monotonic() > deadline:
            logger.warning("the fork server (pid %d) did not exit within %.0f s of the last engine's shutdown; "
                           "it ends with this process", pid, wait_s)
            return False
        time.sleep(0.01)


def _release_fork_server() -> None:
    """In a process forked from the fork server: close the copy of the starting process's
    keep-alive pipe end that multiprocessing hands every such process. The fork server exits
    when the last copy closes, and this process (its child) dies with it (die_with_parent), so
    the starting process's end must be the only one: with copies held here, a starting process
    that is killed would leave the fork server and every process forked from it behind."""
    from multiprocessing import forkserver
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and getattr(server, "_forkserver_pid", None) is None:   # inherited, not our own server's
        os.close(fd)
        server._forkserver_alive_fd = None


def _in_environment(environ: dict, target: Callable, *args) -> None:
    """A started process: let go of the fork server, take `environ` (the starting process's
    environment, where the fork server holds its own from when it started), then run `target`."""
    _release_fork_server()
    os.environ.clear()
    os.environ.update(environ)
    from deepserve.log import configure_from_env
    configure_from_env()
    target(*args)


def dist_timeout_s() -> float:
    return float(os.environ.get("DEEPSERVE_DIST_TIMEOUT", "300"))


def start_timeout_s() -> float:
    """How long a worker may take to report that it is joining the process group."""
    return float(os.environ.get("DEEPSERVE_WORKER_START_TIMEOUT", "300"))


def ready_timeout_s() -> float:
    """How long an engine core may take from joining to ready: loading the weights, the
    profile run, CUDA-graph capture and the warm-up (vLLM's engine-ready wait is 600 s too).
    A rank that dies meanwhile fails the start at once; this bounds a silent hang."""
    return float(os.environ.get("DEEPSERVE_ENGINE_READY_TIMEOUT", "600"))


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux's ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free on `host` now (held open together, so that they differ). They
    are drawn below the kernel's ephemeral range, so the outgoing connections of other processes
    cannot take one between now and its listener's bind (a port the kernel picks with bind(0)
    comes from that range); where none is free there, the kernel's pick."""
    import random

    low, socks = _ephemeral_low(), []
    try:
        for attempt in range(64 * n + 8):
            if len(socks) == n:
                break
            s = socket.socket()
            try:
                s.bind((host, random.randrange(10000, low) if low > 11000 and attempt < 64 * n else 0))
            except OSError:
                s.close()
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(f"no {n} free ports on {host}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def check_no_live_group() -> None:
    """A process holds one default process group: refuse to start while another engine of
    this process still holds it (after collecting engines nobody references any more)."""
    if dist.is_initialized():
        import gc
        gc.collect()  # runs the shutdown of engines that were dropped without one
    if dist.is_initialized():
        raise RuntimeError("another multi-process engine in this process still holds the process group: "
                           "call .shutdown() on it (or delete it) before starting a new one")


def _running(proc) -> bool:
    try:
        return proc.exitcode is None
    except ValueError:   # closed
        return False


def kill_workers() -> None:
    """SIGKILL every worker process this process started that still runs, and the fork server
    they came from (both ignore SIGTERM): for a signal during start-up, where the graceful
    stop has nothing to drain, and the fork server's own exit (the one that ends the workers
    through their parent-death signal) takes seconds on a busy host. Safe in a signal handler:
    no lock is taken."""
    from multiprocessing import forkserver
    pids = [p.pid for procs in list(_all_worker_procs) if not procs.closing for p in list(procs.procs)
            if p.pid is not None and _running(p)]
    server_pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    for pid in pids + ([server_pid] if server_pid else []):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:   # gone already
            pass


def die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies, however the parent ends (even
    SIGKILL), so a lost driver never leaves orphan workers holding GPUs."""
    if sys.platform != "linux":
        return
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # no glibc: workers still exit on the driver's stop message or a broken collective


def report_errors(status, rank: int, body: Callable[[], None]) -> None:
    """Run a worker's `body`; an exception goes to the parent over `status` before the exit. A
    ValueError (bad input: a checkpoint or a flag, named in its message) is that one line, which
    the parent prints, and so is the loss of another rank (PeerLost: the parent names the rank that
    died); anything else also prints its traceback here."""
    try:
        body()
    except BaseException as exc:
        lost = lost_a_peer(exc)
        if status is not None:
            try:
                status.send(("error", f"{PeerLost.__name__ if lost else type(exc).__name__}: {exc}"))
            except OSError:
                pass
        if not (isinstance(exc, ValueError) or lost) or status is None:
            traceback.print_exc()
        sys.exit(1)


class UniExecutor:
    def __init__(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
        from deepserve.engine.driver_runner import DriverRunner
        self.runner = DriverRunner(config, platform, eos_token_ids=eos_token_ids)
        self.failure: Optional[str] = None

    def explain(self, exc: BaseException) -> str:
        return str(exc)

    def shutdown(self) -> None:
        pass


def _worker_main(rank: int, config: EngineConfig, platform_name: str, init_method: str,
                 timeout_s: float, local_rank: Optional[int] = None, status=None) -> None:
    """A worker rank: join the group, load its shard, then run every step the driver sends."""
    die_with_parent()

    def body():
        from deepserve.engine.model_runner import WorkerRunner
        platform = get_platform(platform_name)
        par = config.parallel
        lr = rank if local_rank is None else local_rank
        if status is not None:
            status.send(("joining",))
        pctx = init_distributed(rank, par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
                                platform.dist_backend, init_method, timeout_s, par.enable_expert_parallel,
                                lr, par.data_parallel_size, par.all2all_backend)
        runner = WorkerRunner(config, platform, pctx, local_rank=lr)
        run_worker_steps(runner, StepChannel(control_group(), 0), config.profiler)
        runner.finish_sends()
        destroy_distributed()

    report_errors(status, rank, body)


class WorkerProcs:
    """Worker processes (from `process_context`), each with a status pipe, and a monitor thread that sets
    `failure` (naming the rank, its pid and its error or exit code) when one ends early. It logs the
    failure only once the owner has called `started()`: until then the owner waits for the workers and
    raises the failure itself (`deepserve serve` prints it once, as its one-line error). An owner that
    names a later failure itself too (the API server) sets `log_failure` False."""

    log_failure = True

    def __init__(self, target, args_of: Callable[[int], tuple], ranks: list[int], label: str = "worker rank"):
        ctx = process_context()
        self.label = label
        self.ranks = ranks
        self.failure: Optional[str] = None
        self.closing = False
        self.starting = True
        self.procs, self.pipes, self.errors, self.joining = [], [], {}, set()
        _all_worker_procs.add(self)
        with _fork_server_lock:
            _fork_server_users[0] += 1
            self._uses_fork_server = True
            try:
                for r in ranks:
                    here, there = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=_in_environment, name=f"deepserve-rank{r}", daemon=True,
                                    args=(dict(os.environ), target, *args_of(r), there))
                    p.start()
                    there.close()
                    self.procs.append(p)
                    self.pipes.append(here)
            except BaseException:
                self.stop(graceful_s=0.0)
                raise
        self._host = socket.gethostname()
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="deepserve-worker-monitor")
        self._monitor.start()

    def _read(self, i: int) -> None:
        try:
            while self.pipes[i].poll():
                msg = self.pipes[i].recv()
                if msg[0] == "joining":
                    self.joining.add(self.ranks[i])
                elif msg[0] == "error":
                    self.errors[self.ranks[i]] = msg[1]
        except (EOFError, OSError):
            pass

    def _watch(self) -> None:
        while not self.closing and self.failure is None:
            multiprocessing.connection.wait(self.pipes + [p.sentinel for p in self.procs], timeout=0.2)
            ended = [i for i, p in enumerate(self.procs) if p.exitcode is not None]
            for i in range(len(self.procs)):
                self._read(i)   # after the exit codes: an ended rank's last message is in
            if ended and not self.closing and self.failure is None:
                i = self._first_failed(ended)
                self.failure = self._describe(self.ranks[i], self.procs[i])
                if not self.starting and self.log_failure:
                    logger.error(self.failure)

    def _first_failed(self, ended: list[int]) -> int:
        """Of the ranks that ended (indices), the one to name: the first that did not only lose
        another rank (PeerLost, raised once the rank that died is gone)."""
        return min(ended, key=lambda i: self.errors.get(self.ranks[i], "").startswith(PeerLost.__name__ + ":"))

    def started(self) -> None:
        """The workers are up: a failure from now on is logged when the monitor sees it."""
        self.starting = False

    def _describe(self, rank: int, p) -> str:
        where = f"{self.label} {rank} (pid {p.pid}) on host {self._host}"
        if rank in self.errors:
            return f"{where} failed: {self.errors[rank]}"
        if rank not in self.joining:
            return f"{where} exited with code {p.exitcode} before it started; {GUARD_HINT}"
        return f"{where} exited with code {p.exitcode}"

    def wait_joining(self, timeout_s: float) -> None:
        """Wait until every worker is about to join the process group; raise on a failure."""
        deadline = time.monotonic() + timeout_s
        while len(self.joining) < len(self.ranks):
            if self.failure:
                raise RuntimeError(self.failure)
            if time.monotonic() > deadline:
                missing = sorted(set(self.ranks) - self.joining)
                raise RuntimeError(f"{self.label}s {missing} did not start within {timeout_s:.0f} s")
            time.sleep(0.02)

    def stop(self, graceful_s: float = 10.0) -> None:
        """End the workers (killed after `graceful_s`); the last `WorkerProcs` of the process
        to stop also stops the fork server, where this process has no other child process
        left (one started from it would lose its exit status) and DEEPSERVE_KEEP_FORK_SERVER
        is not set."""
        self.closing = True
        deadline = time.monotonic() + graceful_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()
        with _fork_server_lock:
            if not self._uses_fork_server:
                return
            self._uses_fork_server = False
            _fork_server_users[0] -= 1
            if _fork_server_users[0] == 0 and not keep_fork_server() and not mp.active_children():
                stop_fork_server()


def run_watched(start: Callable[[], None], failed: Callable[[], Optional[str]],
                on_failure: Callable[[], None]) -> None:
    """Run the driver's own start-up (`start`) in a thread while watching the workers: a
    worker failure raises at once instead of waiting for a collective to time out
    (`on_failure` stops the workers first, which breaks the driver's pending collective)."""
    error: list[BaseException] = []

    def body():
        try:
            start()
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=body, daemon=True, name="deepserve-driver-start")
    thread.start()
    while thread.is_alive():
        thread.join(0.05)
        if failed() and thread.is_alive():
            on_failure()
            thread.join(10.0)
            raise RuntimeError(failed())
    if error:
        why = failed()
        raise RuntimeError(f"{why} ({error[0]})") if why else error[0]


class DriverExecutor:
    """What every multi-rank executor shares: the driver's own rank (rank 0, in this process),
    the per-step broadcast of step inputs, and naming the worker behind a broken collective.
    Subclasses start the workers and set `failure` when one dies."""

    _closing = False
    failure: Optional[str] = None
    log_failure = True     # as WorkerProcs'

    def _start_driver(self, config: EngineConfig, platform: Platform, eos_token_ids: set[int],
                      init_method: str, timeout: float) -> None:
        from deepserve.engine.driver_runner import DriverRunner
        par = config.parallel
        pctx = init_distributed(0, par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
                                platform.dist_backend, init_method, timeout, par.enable_expert_parallel,
                                dp_size=par.data_parallel_size, all2all_backend=par.all2all_backend)
        self.channel = StepChannel(control_group(), 0)
        # the runner publishes through this executor, which holds the runner: a weak method, so
        # that the pair is no reference cycle (it would keep the driver's weights and KV pool after
        # the engine is dropped until a garbage-collector pass)
        publish = weakref.WeakMethod(self._publish)
        self.runner = DriverRunner(config, platform, pctx, local_rank=0, eos_token_ids=eos_token_ids,
                                   publish=lambda msg: publish()(msg))

    def _publish(self, msg) -> None:
        if self.failure:
            raise RuntimeError(self.failure)
        self.channel.send(msg)

    def _tell_workers_to_stop(self) -> bool:
        """Send the stop message (unless a worker already died); False if it could not be sent."""
        if self.failure is not None or getattr(self, "runner", None) is None:
            return False
        try:
            self.runner.finish_sends()   # the pipeline's last logits in, then every worker gets the stop
            self.channel.send(STOP)
            self.channel.flush()
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
        check_no_live_group()
        self.world_size = config.parallel.world_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        timeout = dist_timeout_s()
        self.workers = WorkerProcs(_worker_main, lambda r: (r, config, platform.name, init_method, timeout, None),
                                   list(range(1, self.world_size)))
        self.procs = self.workers.procs
        try:
            self.workers.wait_joining(start_timeout_s())
            run_watched(lambda: self._start_driver(config, platform, eos_token_ids, init_method, timeout),
                        lambda: self.failure, lambda: self.workers.stop(graceful_s=0.0))
        except BaseException:
            self._abort_start()
            raise
        self.workers.started()

    @property
    def failure(self) -> Optional[str]:
        return self.workers.failure

    @property
    def log_failure(self) -> bool:
        return self.workers.log_failure

    @log_failure.setter
    def log_failure(self, value: bool) -> None:
        self.workers.log_failure = value

    def _abort_start(self) -> None:
        self._closing = True
        self.workers.stop(graceful_s=0.0)
        destroy_distributed(timeout_s=5.0)

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        stopped = self._tell_workers_to_stop()
        self.workers.closing = True
        # tear down together with the workers (NCCL's teardown may wait on its peers), and
        # only then wait for them to exit
        if stopped:
            destroy_distributed()
        self.workers.stop()
        if not stopped:
            destroy_distributed(timeout_s=5.0)
        self.channel = None   # its group holds the rendezvous store, which listens while referenced


def make_executor(config: EngineConfig, platform: Platform, eos_token_ids: set[int]):
    """The executor of one DP rank's ranks (data parallel runs one engine core per DP rank,
    each with an executor of its own: engine/dp_engine.py)."""
    par = config.parallel
    if par.data_parallel_size > 1:
        raise ValueError(f"data_parallel_size {par.data_parallel_size}: data parallel runs one engine core per DP "
                         "rank behind engine/dp_engine.DataParallelEngine, not one executor")
    if par.world_size == 1:
        return UniExecutor(config, platform, eos_token_ids)
    if par.distributed_executor_backend == "ray":
        from deepserve.engine.ray_executor import RayExecutor
        return RayExecutor(config, platform, eos_token_ids)
    return MultiprocExecutor(config, platform, eos_token_ids)
