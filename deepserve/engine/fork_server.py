"""The fork server that engine-core, worker and API server processes start from (see
engine/executor.py `process_context`): what it imports, and `start_early`, which starts it
before the caller's own imports. Imports nothing beyond the standard library, so that a
command can start it before it imports torch."""
from __future__ import annotations

import gc
import multiprocessing
from multiprocessing import forkserver

from deepserve.config import EngineArgs, engine_core_apart

# What the fork server imports before it forks workers: its SIGTERM disposition
# (engine/fork_server_signals.py), then what every worker imports, nothing that touches a GPU
# at import (a process forked after CUDA is initialised cannot use it), then
# engine/fork_server_frozen.py, which freezes the heap those imports made (freeze_heap).
FORK_SERVER_PRELOAD = ["deepserve.engine.fork_server_signals", "deepserve.engine.engine_core",
                       "deepserve.engine.model_runner", "deepserve.engine.fork_server_frozen"]


def freeze_heap() -> None:
    """Move every object the garbage collector tracks into its permanent generation (gc.freeze,
    as vLLM does once its API server and engine core have started). Later collections no longer
    walk torch's and the engine's objects: full collections during the steps get shorter, and
    so does the process's exit (the interpreter's last collection over a heap holding torch
    takes most of a CPU-second). No collection first: the imports leave no garbage to free (a
    full one then finds none, in a sixth of a second). Done in the fork server before it forks,
    the processes forked from it inherit the frozen heap, and their collections neither walk it
    nor write to (and so copy) its pages (the gc module's advice for servers that fork)."""
    gc.freeze()


def process_context():
    """The multiprocessing context that engine worker, engine-core and API server processes
    start from (torch.multiprocessing's is this same context, with tensor sharing registered
    once torch.multiprocessing is imported, as executor.py does)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)  # read when this process starts its fork server
    return ctx


def start_early() -> None:
    """Start this process's fork server now, without waiting for it: its imports (torch and the
    engine modules, seconds of CPU) then run beside this process's own until the first engine
    process is started from it. Call it once the environment that engine processes inherit at
    import is final (their start re-applies the rest, see executor._in_environment)."""
    process_context()
    forkserver.ensure_running()


def starts_early(args: EngineArgs) -> bool:
    """Whether `deepserve serve` with `args` may start the fork server before its own imports:
    it will start processes of this node from it (an engine core apart, its default, or TP / PP
    workers; not where Ray places them), and the environment is final already (not with several
    API servers: their launcher sets PROMETHEUS_MULTIPROC_DIR, which prometheus_client reads at
    import, before it starts them)."""
    if args.distributed_executor_backend == "ray" or args.api_server_count > 1:
        return False
    return engine_core_apart(args, default=True) or args.tensor_parallel_size * args.pipeline_parallel_size > 1
