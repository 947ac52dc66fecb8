"""Shared fixtures: where the real data lives, and skips where a piece is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def real_dir() -> Path:
    """../shared/real beside the checkout (SEGSAFE_REAL_DIR overrides)."""
    return Path(os.environ.get("SEGSAFE_REAL_DIR", REPO.parent / "shared" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    path = real_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set SEGSAFE_REAL_DIR)")
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests run on 2 cores; several torch threads per test only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)
