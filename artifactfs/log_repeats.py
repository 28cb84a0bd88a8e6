"""Holding back a log line repeated many times a second (a program retrying a file that fails):
the daemon's log grew by ~4,000 identical EIO lines a second, megabytes a minute, outside the
cache's limit. As syslog and the kernel's printk rate limit do: the first line is written, its
repeats in the next `window` seconds are counted, and the next one after that says how many."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

WINDOW = 10.0  # seconds during which a line's repeats are only counted
MAX_LINES = 10_000  # distinct lines remembered; the oldest windows are let go beyond that


class RepeatFilter(logging.Filter):
    """A handler filter that lets a line through at most once a `window` seconds, and says
    then how many times it was held back meanwhile."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        # (level, message) -> [when its window began, repeats held back in it]
        self._windows: dict[tuple[int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        key = (record.levelno, message)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window[0] < self.window:
                window[1] += 1
                return False
            held = int(window[1]) if window is not None else 0
            self._windows.pop(key, None)  # re-added last: the dict stays in window order
            self._windows[key] = [now, 0]
            if len(self._windows) > MAX_LINES:
                del self._windows[next(iter(self._windows))]
        if held:
            record.msg = f"{message} (and {held} more times in the {self.window:.0f} s before)"
            record.args = None
        return True
