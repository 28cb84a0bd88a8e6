"""Progress bars that show on a terminal and stay quiet in pipes, logs and CI."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(
    total: int | None, desc: str, unit: str = "file", enabled: bool | None = None, **kwargs: Any
) -> tqdm:
    """A tqdm bar on stderr, disabled unless stderr is a terminal (or `enabled` says so)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )
