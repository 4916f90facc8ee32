"""Shared test fixtures: the reference fixtures root and small model builders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Root of the reference fixtures: $FIXTURES_DIR, default ../shared/fixtures beside the repository."""
    root = Path(os.environ.get("FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))
    if not root.is_dir():
        pytest.fail(f"reference fixtures not found at {root}; set FIXTURES_DIR to the fixtures root")
    return root


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when other processes share the 2 cores.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
