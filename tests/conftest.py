"""Shared fixtures: paths to ../shared assets, the demo model, and gpu skipping."""
from __future__ import annotations

import os
from pathlib import Path

# Tiny models: extra threads only add contention (and CI has 2 cores shared with the servers
# and worker processes the tests start, which inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
if not torch.cuda.is_available():
    # Triton kernels can only run interpreted here; the interpreter is chosen when a kernel is
    # decorated, so set it before any test imports deepserve.ops.triton
    os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZERS = SHARED / "tokenizers"
DEMO_MODEL = REPO / "deepserve" / "assets" / "stories260k"


# Test files that start servers or several engine processes per test: marked `slow` and left
# out of the default run (pyproject addopts), so `python -m pytest -q` stays within minutes on a
# 2-core machine; `python -m pytest -q -m slow` runs them.
SLOW_FILES = {
    "tests/cli/test_guides_e2e.py", "tests/engine/test_executor.py", "tests/engine/test_dp_multinode.py",
    "tests/engine/test_engine_core.py", "tests/engine/test_async_scheduling.py", "tests/engine/test_spec_decode_dp.py",
    "tests/distributed/test_dp_attention.py", "tests/server/test_server_openai_features.py",
    "tests/server/test_server_tools.py", "tests/test_platform_pkg.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().relative_to(REPO).as_posix() in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not found (CI clones the repo beside shared/)")
    return SHARED
