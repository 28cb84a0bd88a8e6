"""The default store as tests look at it: row counts, and a store with something in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artifactfs.store import Store
from tests.conftest import make_tree


def store_counts() -> dict[str, int]:
    """Rows per table of the default store: equal before and after = nothing recorded."""
    store = Store()
    try:
        return store.counts()
    finally:
        store.close()


def make_local_store(cli: Any, tmp_path: Path) -> None:
    """Create the default store with one local run, so 'store unchanged' means something."""
    local = make_tree(tmp_path / "seed-data", {"seed.txt": b"seed"})
    result = cli("--project", "seed", "track", "seed", str(local))
    assert result.returncode == 0, result.stderr
