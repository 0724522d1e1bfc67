"""Engines come and go cleanly: several LLMs with different layouts one after another in one
process (shutdown(), `del` and `with` each free the process group and the workers); a worker
that fails at start-up fails the start in seconds naming its rank and error; a script
without a `__main__` guard fails at once naming the guard."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from deepserve import LLM, SamplingParams
from deepserve.engine.executor import WorkerProcs
from tests.conftest import DEMO_MODEL, REPO

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [1, 40, 41, 26, 7]}, {"prompt_token_ids": [1]}]
ENGINE = dict(block_size=4, max_model_len=64)


def _tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("layout", [{}, {"tensor_parallel_size": 2}])
def test_shutdown_frees_weights_and_kv_while_the_llm_is_still_held(layout):
    """shutdown() (and leaving `with LLM(...) as llm:`) frees the driver's weights, KV pool and
    graphs although `llm` still names the engine (on a GPU the next LLM's memory profile would
    otherwise count them as its own); a request after it is a clear error."""
    import gc
    import weakref
    with LLM(str(DEMO_MODEL), **ENGINE, **layout) as llm:
        runner = llm.engine.runner
        held = [weakref.ref(next(runner.model.parameters())), weakref.ref(runner.kv_layers[0].kv_cache[0])]
        assert _tokens(llm)
    gc.collect()
    assert [r() for r in held] == [None, None]
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(PROMPTS, GREEDY)


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
    assert _tokens(LLM(str(DEMO_MODEL), **ENGINE)) == reference


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
