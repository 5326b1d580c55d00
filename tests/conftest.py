"""Shared pytest fixtures: the real data in ../shared/data and real servers on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (real imagery and STAC items); skips when absent (a bare clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (clone with ../shared beside it)")
    return SHARED_DATA
