"""Where caches live, and how big they may grow."""

from __future__ import annotations

import os
import re
from pathlib import Path

from artifactfs.errors import ArtifactfsError

DEFAULT_CACHE_SIZE = "10G"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?[bB])?\s*$")


def default_cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(cache_home) / "artifactfs"


def chunk_directory(cache_dir: Path | None = None) -> Path:
    """The chunk cache inside a cache directory (beside logs and the local hash cache)."""
    return (cache_dir or default_cache_dir()) / "data"


def parse_size(text: str) -> int:
    """`10G`, `512M`, `1.5GiB`, `4096`: bytes (powers of 1024)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ArtifactfsError(f"invalid size {text!r}: expected a number with K, M, G or T")
    factor = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    value = int(float(match.group(1)) * factor)
    if value <= 0:
        raise ArtifactfsError(f"invalid size {text!r}: must be positive")
    return value
