"""The chunk files a cache directory holds on disk, as tests count them."""

from __future__ import annotations

import contextlib
from pathlib import Path


def chunk_files(cache_dir: Path) -> list[Path]:
    chunks = cache_dir / "data" / "chunks"
    if not chunks.is_dir():
        return []
    return [p for p in chunks.glob("*/*") if p.is_file()]


def chunk_bytes(cache_dir: Path) -> int:
    """Bytes of chunk files on disk now. The files are listed first, then measured: a
    lazy walk that measured as it went could count a file evicted behind it and its
    replacement published ahead of it, more than the cache ever held at once. A file
    evicted between listing and stat is gone."""
    total = 0
    for path in chunk_files(cache_dir):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total
