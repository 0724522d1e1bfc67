"""Engines come and go cleanly: several LLMs with different layouts one after another in one
process (shutdown(), `del` and `with` each free the process group, the workers and the
ports; the driver's weights and KV pool are freed by shutdown() and by dropping the LLM,
without waiting for a garbage-collector pass); a worker or engine core that fails at start-up fails the start in seconds naming its
rank and error; a script without a `__main__` guard fails at once naming the guard. The
multi-process executors live in deepserve/engine, and deepserve/distributed imports nothing
from there."""
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch.distributed as dist

from deepserve import LLM, SamplingParams
from deepserve.engine import engine_core, executor
from deepserve.engine.executor import WorkerProcs
from deepserve.engine.step_channel import PeerLost
from tests.conftest import DEMO_MODEL, REPO
from tests.engine.test_dp_multinode import free_ports
from tests.engine.test_piecewise_graphs import TINY_V3

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1, 40, 41, 26, 7]}, {"prompt_token_ids": [1]}]
ENGINE = dict(block_size=4, max_model_len=64)


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def tiny_mtp(tmp_path_factory):
    """A DeepSeek-V3 MoE config with an MTP layer (random weights: load_format dummy)."""
    path = tmp_path_factory.mktemp("v3_mtp")
    (path / "config.json").write_text(json.dumps({**TINY_V3, "num_nextn_predict_layers": 1}))
    return str(path)


MTP = dict(load_format="dummy", speculative_config={"method": "mtp", "num_speculative_tokens": 2})


def _device_memory(runner) -> list:
    """A weak reference to the memory of each weight, buffer and KV pool tensor of `runner`:
    expired once nothing holds that memory (any tensor viewing it, from Python or C++)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    tensors = [*runner.model.parameters(), *runner.model.buffers(), *(t for m in runner.kv_layers for t in m.kv_cache)]
    return [StorageWeakRef(t.untyped_storage()) for t in tensors]


def _held(memory: list) -> int:
    return sum(not ref.expired() for ref in memory)


@pytest.mark.parametrize("model,layout", [("demo", {}), ("demo", {"tensor_parallel_size": 2}), ("mtp", MTP)],
                         ids=["one-process", "tp2", "moe-mtp"])
def test_shutdown_frees_weights_and_kv_while_the_llm_is_still_held(tiny_mtp, model, layout):
    """shutdown() (and leaving `with LLM(...) as llm:`) frees the driver's weights, KV pool and
    graphs although `llm` still names the engine (on a GPU the next LLM's memory profile would
    otherwise count them as its own), the MTP module's too; a request after it is a clear
    error."""
    with LLM(tiny_mtp if model == "mtp" else str(DEMO_MODEL), **ENGINE, **layout) as llm:
        memory = _device_memory(llm.engine.runner)
        assert _tokens(llm)
    gc.collect()
    assert len(memory) > 20 and _held(memory) == 0
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS, GREEDY)


@pytest.mark.parametrize("model,layout", [
    ("demo", {"async_scheduling": False}), ("demo", {"async_scheduling": True}),
    ("mtp", {**MTP, "async_scheduling": True}),
    ("demo", {"tensor_parallel_size": 2}), ("demo", {"pipeline_parallel_size": 2})],
    ids=["sync", "async", "moe-mtp-async", "tp2", "pp2"])
def test_dropping_the_llm_frees_weights_and_kv_at_once(tiny_mtp, model, layout):
    """`del llm` without shutdown() frees the driver's weights and KV pool at once, not at the
    garbage collector's next pass, which in a long-running process may come after the next
    engine ran out of device memory: nothing of the engine is in a reference cycle (a weight
    loader bound to its layer, the runner and its CUDA graphs, pipeline stage or executor)."""
    llm = LLM(tiny_mtp if model == "mtp" else str(DEMO_MODEL), **ENGINE, **layout)
    memory = _device_memory(llm.engine.runner)
    assert _tokens(llm)
    gc.collect()
    gc.disable()
    try:
        del llm
        held = _held(memory)
    finally:
        gc.enable()
    assert len(memory) > 20 and held == 0


def test_engines_one_after_another_in_one_process():
    reference = _tokens(LLM(str(DEMO_MODEL), **ENGINE))
    tp = LLM(str(DEMO_MODEL), tensor_parallel_size=2, **ENGINE)
    assert _tokens(tp) == reference
    workers = list(tp.engine.executor.procs)
    tp.shutdown()
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers)

    pp = LLM(str(DEMO_MODEL), pipeline_parallel_size=2, **ENGINE)
    assert _tokens(pp) == reference
    workers = list(pp.engine.executor.procs)
    del pp  # no shutdown(): dropping the LLM frees it
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers)

    with LLM(str(DEMO_MODEL), data_parallel_size=2, **ENGINE) as dp:
        assert _tokens(dp) == reference
    assert not dist.is_initialized()

    tp_pp = LLM(str(DEMO_MODEL), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    assert _tokens(tp_pp) == reference
    workers = list(tp_pp.engine.executor.procs)
    assert len(workers) == 3
    tp_pp.shutdown()
    assert not dist.is_initialized() and not any(p.is_alive() for p in workers)
    assert _tokens(LLM(str(DEMO_MODEL), **ENGINE)) == reference


def _listening(port: int) -> bool:
    """Whether some socket still listens on 127.0.0.1:`port` (connections closed on our side,
    in TIME_WAIT, do not count: a new server binds with SO_REUSEADDR as these do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_shutdown_and_del_free_the_ports(monkeypatch):
    """The ports an engine listens on (the process group's store; a DP front end's ZeroMQ
    sockets, ipc:// files on one node, tcp:// at --data-parallel-rpc-port) are free once it
    is shut down or dropped, even by the garbage collector (an LLM in a reference cycle): a
    second engine on the same fixed ports starts and serves."""
    picked = []

    def recording_free_port(host="127.0.0.1"):
        picked.append(executor.free_ports(1, host)[0])
        return picked[-1]
    monkeypatch.setattr(executor, "free_port", recording_free_port)
    monkeypatch.setattr(engine_core, "free_port", recording_free_port)
    reference = _tokens(LLM(str(DEMO_MODEL), **ENGINE))

    tp = LLM(str(DEMO_MODEL), tensor_parallel_size=2, **ENGINE)
    assert _tokens(tp) == reference and len(picked) == 1 and _listening(picked[0])
    tp.shutdown()             # `tp` still names the engine
    assert not _listening(picked[0])

    dp = LLM(str(DEMO_MODEL), data_parallel_size=2, **ENGINE)
    run_dir = dp.engine.layout.run_dir
    assert _tokens(dp) == reference and len(picked) == 2 and _listening(picked[1]) and os.listdir(run_dir)
    del dp
    assert not _listening(picked[1]) and not os.path.exists(run_dir)

    port = free_ports(4)      # rpc port + 1: the process group; the others: the front end's sockets
    nodes = dict(data_parallel_size=2, data_parallel_address="127.0.0.1", data_parallel_rpc_port=port)
    with LLM(str(DEMO_MODEL), **nodes, **ENGINE) as dp:
        assert dp.engine.layout.init_method == f"tcp://127.0.0.1:{port + 1}"
        assert _tokens(dp) == reference
    assert not any(_listening(p) for p in range(port, port + 4))
    dp = LLM(str(DEMO_MODEL), **nodes, **ENGINE)
    assert _tokens(dp) == reference
    dp.cycle = dp
    del dp
    collect = threading.Thread(target=gc.collect, daemon=True)
    collect.start()
    collect.join(30)
    assert not collect.is_alive(), "collecting a dropped DP engine hangs"
    assert not any(_listening(p) for p in range(port, port + 4))


def _fails_after_joining(rank, status):
    status.send(("joining",))
    from deepserve.engine.executor import report_errors

    def load():
        raise OSError(f"shard model-0000{rank}.safetensors is truncated")
    report_errors(status, rank, load)


def test_worker_start_failure_names_rank_and_error():
    start = time.monotonic()
    workers = WorkerProcs(_fails_after_joining, lambda r: (r,), [1])
    try:
        with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) on host .* failed: "
                                               r"OSError: shard model-00001\.safetensors is truncated"):
            while True:
                workers.wait_joining(30)
                if workers.failure:
                    raise RuntimeError(workers.failure)
                time.sleep(0.05)
    finally:
        workers.stop(graceful_s=0)
    assert time.monotonic() - start < 30


def _joins_then_waits(status):
    status.send(("joining",))
    time.sleep(60)


def test_workers_leave_the_fork_server_to_the_engines_process():
    """Workers are forked from a fork server that ends when the engine's process has gone (its
    keep-alive pipe closes), and the workers die with it: so no worker may hold a copy of the
    engine process's end of that pipe (one would keep the fork server, and every worker, alive
    after the engine's process is killed)."""
    from multiprocessing import forkserver
    workers = WorkerProcs(_joins_then_waits, lambda r: (), [1, 2])
    try:
        workers.wait_joining(60)
        ours = os.fstat(forkserver._forkserver._forkserver_alive_fd)
        held = [os.stat(f"/proc/{p.pid}/fd/{fd}") for p in workers.procs for fd in os.listdir(f"/proc/{p.pid}/fd")]
        assert len(held) > 3 and (ours.st_dev, ours.st_ino) not in {(s.st_dev, s.st_ino) for s in held}
    finally:
        workers.stop(graceful_s=0)


def test_core_failing_at_start_fails_the_start_naming_rank_and_error(tmp_path):
    """A checkpoint that lacks a tensor: the DP engine cores fail loading it, and the start
    fails in seconds with a rank's error (not after the ready timeout)."""
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    shutil.copytree(DEMO_MODEL, broken)
    weights = load_file(DEMO_MODEL / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^rank [01] \(pid \d+\) on host .* failed: ValueError: checkpoint "
                                           r".* lacks tensor\(s\) for: model\.layers\.3\.mlp\.down_proj\.weight$"):
        LLM(str(broken), data_parallel_size=2, **ENGINE)
    assert time.monotonic() - start < 30
    assert not dist.is_initialized()


UNGUARDED = textwrap.dedent("""
    from deepserve import LLM
    llm = LLM({model!r}, tensor_parallel_size=2, block_size=4, max_model_len=64)
    print("started")
""")


def test_unguarded_script_fails_at_once_naming_the_guard(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(model=str(DEMO_MODEL)))
    env = dict(os.environ, PYTHONPATH=str(REPO), DEEPSERVE_DIST_TIMEOUT="300")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "started" not in proc.stdout
    assert 'if __name__ == "__main__":' in proc.stderr.splitlines()[-1]
    assert "worker rank 1" in proc.stderr.splitlines()[-1]
    assert time.monotonic() - start < 60


# what distributed/ may import (DESIGN.md's layers: only those below it); the plan's arithmetic
# is given the quantized checkpoint's unquantized modules by its callers
DISTRIBUTED_IMPORTS = ("deepserve.distributed", "deepserve.platforms", "deepserve.config", "deepserve.log")


def _imported(node) -> list[str]:
    """The deepserve modules an import statement of a module in deepserve/<package>/ names."""
    import ast
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom) or node.level == 1:
        return []
    # `from deepserve import log`, `from .. import engine`: the names are modules
    module = "deepserve" + (f".{node.module}" if node.level == 2 and node.module else "")
    if node.level == 0:
        module = node.module or ""
    return [f"{module}.{a.name}" for a in node.names] if module == "deepserve" else [module]


def test_distributed_imports_only_the_layers_below_it():
    import ast
    found = []
    for path in sorted((REPO / "deepserve" / "distributed").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            found += [f"{path.name}:{node.lineno} {n}" for n in _imported(node)
                      if n.startswith("deepserve.") and not any(n == m or n.startswith(m + ".")
                                                                 for m in DISTRIBUTED_IMPORTS)]
    assert found == []
    assert all((REPO / "deepserve" / "engine" / f).exists() for f in ("executor.py", "ray_executor.py", "engine_core.py"))


@pytest.mark.gpu
def test_gpu_engines_in_a_row_give_their_device_memory_back():
    """On a CUDA device, as served (whole decode graphs, piecewise graphs, the warm-up, async
    scheduling): an 8B-wide Llama cut (2 layers) at gpu_memory_utilization 0.85 takes most of
    the device and, dropped by `del` with no garbage-collector pass, gives it all back; then a
    V2-Lite cut (MLA, MoE) at 0.85 starts, serves and gives its memory back at shutdown() while
    still named. Left behind: under 256 MiB (cuBLAS workspaces), against GiBs of weights and
    tens of GiB of KV pool."""
    import torch

    def allocated() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    torch.cuda.empty_cache()
    base, total = allocated(), torch.cuda.get_device_properties(0).total_memory
    prompts = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (5, 300)]   # a decode graph, a piecewise step
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine = dict(hf_overrides={"num_hidden_layers": 2}, max_num_seqs=256, max_num_batched_tokens=2048,
                  gpu_memory_utilization=0.85)

    llm = LLM("r1-distill-llama-8b", max_model_len=131072, **engine)
    runner = llm.engine.runner
    assert llm.engine.async_scheduling and runner.graphs.enabled and runner.piecewise is not None
    del runner
    assert allocated() - base > total / 2
    assert [len(o.outputs[0].token_ids) for o in llm.generate(prompts, params)] == [16, 16]
    gc.collect()
    gc.disable()
    try:
        del llm
        left = allocated() - base
    finally:
        gc.enable()
    assert left < 256 * 2**20, f"{left / 2**30:.2f} GiB still allocated after the LLM was dropped"

    with LLM("deepseek-v2-lite", max_model_len=163840, **engine) as llm:
        assert allocated() - base > total / 2
        assert [len(o.outputs[0].token_ids) for o in llm.generate(prompts, params)] == [16, 16]
    left = allocated() - base
    assert left < 256 * 2**20, f"{left / 2**30:.2f} GiB still allocated after shutdown()"


class _Status:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


@pytest.mark.parametrize("exc, traceback_printed", [(ValueError("checkpoint x lacks tensor y"), False),
                                                    (OSError("shard truncated"), True),
                                                    (PeerLost("no step from rank 0: closed by peer"), False),
                                                    (RuntimeError("[pair.cc:553] Connection closed by peer"), False)])
def test_a_worker_prints_a_traceback_for_a_fault_not_for_bad_input(capsys, exc, traceback_printed):
    """A rank's ValueError (a bad checkpoint or flag, e.g. a quantized layer split by its ignore
    list) reaches `deepserve serve` as its one error line, without the worker's traceback above
    it, and so does a rank's loss of another (which the server names: a killed rank printed its
    error, then its peers' tracebacks); other failures keep theirs."""
    from deepserve.engine.executor import report_errors

    def body():
        raise exc
    status = _Status()
    with pytest.raises(SystemExit):
        report_errors(status, 0, body)
    name = "PeerLost" if "peer" in str(exc) else type(exc).__name__   # gloo's words for a dead peer
    assert status.sent == [("error", f"{name}: {exc}")]
    assert ("Traceback" in capsys.readouterr().err) == traceback_printed


def test_the_monitor_names_the_rank_that_died_not_one_that_lost_it():
    """DP cores under expert parallel (or a core's TP peers) fail their collective once a rank
    is killed, and exit too: the one named is the killed rank, whatever the ranks' order."""
    procs = WorkerProcs.__new__(WorkerProcs)
    procs.ranks = [0, 1]
    procs.errors = {0: "PeerLost: the DP cores' per-step agreement failed: closed by peer"}
    assert procs._first_failed([0, 1]) == 1
    procs.errors = {1: "PeerLost: no step from rank 0, which drives this rank"}
    assert procs._first_failed([0, 1]) == 0
    procs.errors = {0: "PeerLost: x", 1: "PeerLost: y"}   # only losers seen: the first of them
    assert procs._first_failed([0, 1]) == 0


def test_free_ports_come_from_below_the_ephemeral_range():
    """The rendezvous ports are drawn below the kernel's range for outgoing connections, so
    another process's client socket cannot take one before its listener binds (the EADDRINUSE
    a DP test met once under CI's parallel workers); distinct and free when returned."""
    low = executor._ephemeral_low()
    ports = executor.free_ports(6)
    assert len(set(ports)) == 6
    if low > 11000:
        assert all(10000 <= p < low for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
