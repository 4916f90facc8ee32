"""Shared test fixtures: the reference fixtures root and small model builders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Root of the reference fixtures: $FIXTURES_DIR, default ../shared/fixtures beside the repository."""
    root = Path(os.environ.get("FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))
    if not root.is_dir():
        pytest.fail(f"reference fixtures not found at {root}; set FIXTURES_DIR to the fixtures root")
    return root
