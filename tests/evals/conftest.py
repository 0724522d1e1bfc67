"""Fixtures for the eval tests: the shared datasets folder beside the checkout."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    path = SHARED / "datasets"
    if not path.is_dir():
        raise FileNotFoundError(f"shared datasets not found at {path} (clone beside shared/)")
    return path
