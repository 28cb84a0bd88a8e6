"""Holding back a log line repeated many times a second (a program retrying a file that fails):
the daemon's log grew by ~4,000 identical EIO lines a second, megabytes a minute, outside the
cache's limit. As syslog and the kernel's printk rate limit do: the first line is written, its
repeats in the next `window` seconds are counted, and the next one after that says how many;
so does `report_held_back`, for the lines held back when the daemon ends."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 10.0  # seconds during which a line's repeats are only counted
MAX_LINES = 10_000  # distinct lines remembered; the oldest windows are let go beyond that
_DECIDED = "artifactfs_repeat_kept"  # a record's attribute: this filter's answer for it


@dataclass
class _Window:
    began: float
    logger: str
    held: int = 0


def _counted(message: str, held: int) -> str:
    return f"{message} (and {held} more times since it was last written)"


class RepeatFilter(logging.Filter):
    """A handler filter that lets a line through at most once a `window` seconds, and says
    then how many times it was held back meanwhile. One instance serves every handler: a
    record gets one answer, however many handlers ask."""

    def __init__(self, window: float = WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[int, str], _Window] = {}  # by (level, message)

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, _DECIDED, None)
        if decided is not None:  # asked already, for another handler
            return bool(decided)
        kept = self._decide(record)
        setattr(record, _DECIDED, kept)
        return kept

    def _decide(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        key = (record.levelno, message)
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.began < self.window:
                window.held += 1
                return False
            held = window.held if window is not None else 0
            self._windows.pop(key, None)  # re-added last: the dict stays in window order
            self._windows[key] = _Window(now, record.name)
            if len(self._windows) > MAX_LINES:
                del self._windows[next(iter(self._windows))]
        if held:
            record.msg, record.args = _counted(message, held), None
        return True

    def held_back(self) -> list[tuple[str, int, str]]:
        """(logger, level, line with its count) for every line held back since it was last
        written; every window is let go."""
        with self._lock:
            windows, self._windows = self._windows, {}
        return [
            (window.logger, level, _counted(message, window.held))
            for (level, message), window in windows.items()
            if window.held
        ]


def report_held_back(repeats: RepeatFilter) -> None:
    """Write the counts of the lines held back (the daemon's end: no later line would)."""
    for logger, level, line in repeats.held_back():
        logging.getLogger(logger).log(level, "%s", line)
