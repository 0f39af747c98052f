"""Where the real data sets live for the tests: ``../shared/data`` seen from the repository root."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(*parts: str) -> Path:
    """A file in the shared real-data directory; skip only if the whole directory is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data directory {SHARED_DATA} does not exist on this machine")
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing although {SHARED_DATA} exists; restore it (see its README.md)")
    return path
