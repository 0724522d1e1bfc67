"""Shared fixtures: paths to ../shared assets, the demo model, and gpu skipping."""
from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path

# Tiny models: extra threads only add contention (and CI has 2 cores shared with the servers
# and worker processes the tests start, which inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One fork server for all the multi-process engines a test process starts one after another
# (each would otherwise begin a new one, importing torch again): tests/engine/test_fork_server.py
# unsets it to check that the last engine's shutdown stops it.
os.environ.setdefault("DEEPSERVE_KEEP_FORK_SERVER", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels can only run interpreted here; the interpreter is chosen when a kernel is
    # decorated, so set it before any test imports deepserve.ops.triton
    os.environ["TRITON_INTERPRET"] = "1"


if os.environ.get("TRITON_INTERPRET") == "1":
    from tests.triton_interpreter import speed_up
    speed_up()

# The garbage collector's full collections walk every object the process holds; collecting the
# suite imports torch, transformers and every test module, and walking them took 40% of the
# collection's CPU. Frozen objects (gc.freeze, which costs nothing) are left out of every later
# collection: what exists now, then what each test module's import made (pytest_collectreport).
# Only while collecting: objects that the tests create stay collectable (test_fork_server.py
# collects the engines of the tests before it).
gc.freeze()

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZERS = SHARED / "tokenizers"
DEMO_MODEL = REPO / "deepserve" / "assets" / "stories260k"


# The longest test files (servers, engine processes, local Ray clusters, the Triton interpreter),
# the costliest first by wall measured on 2 shared cores: collected before the others, so that
# under xdist (`-n 2 --dist loadfile`: each worker takes two files, then the next file whenever
# it finishes one) the long ones start at once and the two workers end together. The local-Ray
# tests take a lock (below), so the files holding them are spaced out: the guides' runs early in
# the first file; test_ray.py, the longest, comes seventh, which a worker reaches only after
# finishing two of the files before it (by then the guides' Ray test is over); test_cluster's
# comes after test_ray.py has ended.
PROCESS_FILES = (
    "tests/cli/test_guides_e2e.py", "tests/server/test_server_deploy.py", "tests/engine/test_triton_backend.py",
    "tests/cli/test_guides_e2e_ascend.py", "tests/ops/test_fused_moe_shared.py", "tests/engine/test_validate.py",
    "tests/distributed/test_ray.py", "tests/engine/test_engine_core.py", "tests/engine/test_async_scheduling.py",
    "tests/server/test_server_tools.py", "tests/ops/test_triton_attention.py", "tests/server/test_server_r1.py",
    "tests/ops/test_triton_moe.py", "tests/evals/test_eval_run.py", "tests/server/test_server_openai_features.py",
    "tests/server/test_api_servers.py", "tests/distributed/test_plan.py", "tests/distributed/test_parallel_engine.py",
    "tests/distributed/test_cluster.py", "tests/ops/test_profile.py", "tests/quant/test_convert_int4.py",
    "tests/distributed/test_dp_attention.py", "tests/distributed/test_pipeline_micro_batches.py",
    "tests/engine/test_llm_engine.py", "tests/ops/test_triton_fused_moe_small.py", "tests/ops/test_triton_int4.py",
    "tests/bench/test_bench_deepserve.py", "tests/engine/test_executor.py", "tests/engine/test_spec_decode.py",
    "tests/engine/test_spec_decode_dp.py", "tests/engine/test_dp_multinode.py", "tests/distributed/test_qa14_dist.py", "tests/test_platform_pkg.py",
)


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        # xdist would reorder the files by their number of tests; keep the order set below
        config.option.loadscopereorder = False


def _repo_path(item) -> str:
    return Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()


def pytest_collectreport(report):
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    order = {path: n for n, path in enumerate(PROCESS_FILES)}
    items.sort(key=lambda item: order.get(_repo_path(item), len(order)))    # stable: files stay whole
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Tests that start a real local Ray cluster. ClusterLauncher's `ray stop` ends every Ray process
# of the machine, so under xdist they take a lock in the run's temporary folder, one at a time
# (test_ray.py's tests share one cluster, whose fixture holds the lock).
LOCAL_RAY_TESTS = {"test_real_local_ray_start_wait_stop", "test_mindspore_tp_pp_uneven_fp16_over_local_ray"}


@contextlib.contextmanager
def local_ray_lock(tmp_path_factory):
    """Held while a test (or a module's fixture) has a local Ray cluster running."""
    import fcntl
    with open(tmp_path_factory.getbasetemp().parent / "local-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _one_local_ray_cluster_at_a_time(request, tmp_path_factory):
    if request.node.originalname not in LOCAL_RAY_TESTS:
        yield
        return
    with local_ray_lock(tmp_path_factory):
        yield


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found (CI clones the repo beside shared/)")
    return SHARED
