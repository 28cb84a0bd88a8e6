"""Progress bars that show on a terminal and stay quiet in pipes, logs and CI."""

from __future__ import annotations

import sys
import threading
from typing import Any

from tqdm import tqdm


class _Bar(tqdm):
    """tqdm with a lock for threads only. tqdm's default lock also makes a multiprocessing
    lock, which fixes the process's start method: a training script that tracks its data and
    then calls `multiprocessing.set_start_method("spawn")` failed ("context has already been
    set"), and a process killed after it leaked a semaphore.

    And no monitor thread: tqdm starts one with its first bar, shown or not, and keeps it for
    good, a thread in every training process that tracked (forked DataLoader workers copy a
    multi-threaded process). It only corrects `miniters` for bars updated less often than
    that; these are updated once per file."""

    monitor_interval = 0


_Bar.set_lock(threading.RLock())


def progress_bar(
    total: int | None, desc: str, unit: str = "file", enabled: bool | None = None, **kwargs: Any
) -> tqdm:
    """A tqdm bar on stderr, disabled unless stderr is a terminal (or `enabled` says so)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return _Bar(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        **kwargs,
    )
