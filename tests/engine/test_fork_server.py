"""The fork server that engine workers start from (engine/fork_server.py process_context): the
last engine's shutdown stops it, leaving no child process behind, and a later engine starts
a new one; and what it imports before forking initialises no CUDA (a process forked after
CUDA is initialised cannot use it)."""
import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest

from deepserve import LLM, SamplingParams
from deepserve.engine import executor
from tests.conftest import DEMO_MODEL, REPO

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1, 40, 41, 26, 7]}, {"prompt_token_ids": [1]}]
ENGINE = dict(block_size=4, max_model_len=64, tensor_parallel_size=2)


def _children() -> dict[int, str]:
    """This process's child processes (every thread's) -> their command lines."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids = f.read().split()
        except FileNotFoundError:   # the thread ended meanwhile
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    out[int(pid)] = c.read().replace(b"\0", b" ").decode(errors="replace")
            except FileNotFoundError:
                pass
    return out


def _left_behind(before: dict[int, str]) -> dict[int, str]:
    """Children that were not there `before` (the session's servers and helpers that earlier
    tests of this worker process started are), the resource tracker left out."""
    return {pid: cmd for pid, cmd in _not_resource_tracker(_children()).items() if pid not in before}


def _not_resource_tracker(children: dict[int, str]) -> dict[int, str]:
    """multiprocessing's resource tracker (a plain interpreter that any spawn or fork-server
    start begins, and that lives as long as the process) left out."""
    return {pid: cmd for pid, cmd in children.items() if "multiprocessing.resource_tracker" not in cmd}


def _joins(status):
    status.send(("joining",))
    time.sleep(60)


def test_keep_fork_server_leaves_it_for_the_next_engine(monkeypatch):
    """DEEPSERVE_KEEP_FORK_SERVER=1 (the test suite's setting): the fork server outlives the
    workers, and the next workers fork from the same one (left running for the test below)."""
    from multiprocessing import forkserver
    monkeypatch.setenv("DEEPSERVE_KEEP_FORK_SERVER", "1")
    first = executor.WorkerProcs(_joins, lambda r: (), [1])
    first.wait_joining(60)
    server = forkserver._forkserver._forkserver_pid
    first.stop(graceful_s=0)
    assert server is not None and os.path.exists(f"/proc/{server}")
    second = executor.WorkerProcs(_joins, lambda r: (), [1])
    second.wait_joining(60)
    assert forkserver._forkserver._forkserver_pid == server
    second.stop(graceful_s=0)
    assert forkserver._forkserver._forkserver_pid == server and os.path.exists(f"/proc/{server}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_last_engine_shutdown_stops_the_fork_server(monkeypatch):
    from multiprocessing import forkserver
    monkeypatch.delenv("DEEPSERVE_KEEP_FORK_SERVER", raising=False)
    gc.collect()   # engines of earlier tests that nobody holds any more
    assert executor._fork_server_users[0] == 0, "an engine of an earlier test is still live"
    kept = forkserver._forkserver._forkserver_pid    # an earlier test's, if it kept one
    before = {pid: cmd for pid, cmd in _children().items() if pid != kept}
    llm = LLM(str(DEMO_MODEL), **ENGINE)
    server = forkserver._forkserver._forkserver_pid
    assert "multiprocessing.forkserver" in _children()[server]
    tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    llm.shutdown()
    assert _left_behind(before) == {}
    assert not os.path.exists(f"/proc/{server}")

    with LLM(str(DEMO_MODEL), **ENGINE) as again:     # a new fork server
        assert forkserver._forkserver._forkserver_pid not in (None, server)
        assert [o.outputs[0].token_ids for o in again.generate(PROMPTS, GREEDY)] == tokens
    assert _left_behind(before) == {}


# Every torch.cuda call that initialises CUDA or its driver (is_available and device_count
# call cudaGetDeviceCount unless PYTORCH_NVML_BASED_CUDA_CHECK=1), trapped before the fork
# server's preload is imported.
NO_CUDA_AT_IMPORT = textwrap.dedent("""
    import torch
    from deepserve.engine.fork_server import FORK_SERVER_PRELOAD

    def trap(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.cuda.{name} called while importing the fork server's preload")
        return call

    for name in ("_lazy_init", "init", "is_available", "device_count", "current_device", "set_device",
                 "get_device_properties", "get_device_capability", "get_device_name", "mem_get_info",
                 "synchronize", "memory_allocated", "memory_reserved", "empty_cache", "get_arch_list"):
        setattr(torch.cuda, name, trap(name))
    for name in ("_cuda_init", "_cuda_getDeviceCount"):
        if hasattr(torch._C, name):
            setattr(torch._C, name, trap(name))
    import importlib
    for module in FORK_SERVER_PRELOAD:
        importlib.import_module(module)
    print("imported", FORK_SERVER_PRELOAD)
""")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_fork_server_preload_calls_no_cuda_at_import(tmp_path):
    """The modules the fork server imports call no torch.cuda function at import (a trap on
    each raises): what runs on any machine of the GPU check below. The trap works: a module
    that asks for the device count at import, imported after them, trips it."""
    (tmp_path / "cuda_at_import.py").write_text("import torch\nDEVICES = torch.cuda.device_count()\n")
    code = NO_CUDA_AT_IMPORT + "import cuda_at_import\n"
    proc = _run(code, PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    assert "'deepserve.engine.model_runner', 'deepserve.engine.fork_server_frozen']" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "AssertionError: torch.cuda.device_count called while importing the fork server's preload")


@pytest.mark.gpu
def test_gpu_fork_server_preload_leaves_cuda_to_forked_processes():
    """On a CUDA machine: importing the preload does not initialise CUDA, and a process forked
    after it (as the fork server forks workers) allocates on the device."""
    code = textwrap.dedent("""
        import importlib, os, torch
        from deepserve.engine.fork_server import FORK_SERVER_PRELOAD
        for module in FORK_SERVER_PRELOAD:
            importlib.import_module(module)
        assert not torch.cuda.is_initialized(), "CUDA initialised by the fork server's preload"
        pid = os.fork()
        if pid == 0:
            x = torch.ones(4, device="cuda")
            torch.cuda.synchronize()
            os._exit(0 if float(x.sum()) == 4.0 else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a forked process could not use CUDA"
        print("forked child used CUDA")
    """)
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "forked child used CUDA" in proc.stdout


def test_serve_starts_the_fork_server_early_only_where_it_will_use_it(monkeypatch):
    """`deepserve serve` starts the fork server before its own imports where an engine core or
    worker of this node will fork from it, and the environment it imports under is final."""
    from deepserve.config import EngineArgs
    from deepserve.engine.fork_server import starts_early
    monkeypatch.delenv("DEEPSERVE_ENGINE_CORE_PROCESS", raising=False)
    assert starts_early(EngineArgs())                                        # the core apart: serve's default
    assert starts_early(EngineArgs(data_parallel_size=2))
    assert not starts_early(EngineArgs(distributed_executor_backend="ray", tensor_parallel_size=2))
    assert not starts_early(EngineArgs(api_server_count=2))                  # its launcher sets the env first
    monkeypatch.setenv("DEEPSERVE_ENGINE_CORE_PROCESS", "0")
    assert not starts_early(EngineArgs())                                    # one process: nothing to fork
    assert starts_early(EngineArgs(tensor_parallel_size=2))                  # its workers


# run by `exec` in a process forked from the fork server (a function of this module would import
# tests/conftest.py there first, which freezes the heap itself)
TRACKED_COUNTS = "import gc; conn.send((gc.get_freeze_count(), len(gc.get_objects()))); conn.close()"


def test_processes_forked_from_the_fork_server_start_with_its_heap_frozen():
    """The fork server freezes what its preload made (torch, the engine's modules) before it
    forks (fork_server.freeze_heap): the engine cores and workers forked from it start with
    nearly every object in the collector's permanent generation, which their collections and
    their exits then skip."""
    from deepserve.engine.fork_server import process_context
    ctx = process_context()
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=exec, args=(TRACKED_COUNTS, {"conn": send}))
    child.start()
    send.close()
    frozen, collectable = recv.recv()
    child.join(60)
    assert child.exitcode == 0
    assert frozen > 10 * collectable, (frozen, collectable)
