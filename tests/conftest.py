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


def pytest_collection_modifyitems(config, items):
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
