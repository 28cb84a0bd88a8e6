"""Saying so when a store write waits long for another process's."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

NOTICE_AFTER = 3.0  # seconds a write may wait for the store's lock before the user is told
IDLE_EXIT = 5.0  # seconds the watchdog thread waits with nothing to watch before it ends


class _Watchdog:
    """One thread that logs the notices of blocks still running at their deadline. A
    `threading.Timer` per block started a thread for every SQLite write transaction: 0.3 to
    0.6 ms, a tenth or more of a small write's time. The thread sleeps until the earliest
    deadline, and is woken only when a block's deadline comes before that (or it waits with
    none). It ends after `IDLE_EXIT` s with nothing to watch, the next write starting another:
    a training script that tracked, then forks its DataLoader workers, is single-threaded
    again by then."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._pending: dict[int, tuple[float, str]] = {}  # token -> (deadline, message)
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._wakes_at: float | None = None  # None: the thread waits for a new deadline

    def watch(self, message: str, after: float) -> int:
        deadline = time.monotonic() + after
        with self._changed:
            token = next(self._tokens)
            self._pending[token] = (deadline, message)
            if self._thread is None or not self._thread.is_alive():
                # Kept only once started: a thread that could not start (no threads left) is
                # tried again by the next write; this one goes on without its notice.
                thread = threading.Thread(
                    target=self._run, name="artifactfs-slow-wait", daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:
                    del self._pending[token]
                    return token
                self._thread = thread
            elif self._wakes_at is None or deadline < self._wakes_at:
                self._changed.notify()
        return token

    def forget(self, token: int) -> None:
        with self._changed:
            self._pending.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._changed:
                now = time.monotonic()
                due = [t for t, (deadline, _) in self._pending.items() if deadline <= now]
                messages = [self._pending.pop(t)[1] for t in due]
                if not messages:
                    self._wakes_at = min((d for d, _ in self._pending.values()), default=None)
                    if self._wakes_at is not None:
                        self._changed.wait(self._wakes_at - now)
                    elif not self._changed.wait(IDLE_EXIT) and not self._pending:
                        self._thread = None  # under the lock: the next `watch` starts one
                        return
                    continue
            for message in messages:  # not under the lock: a slow log handler holds no write up
                with contextlib.suppress(Exception):  # a failing handler must not end the thread
                    log.warning(message)


_watchdog = _Watchdog()


def _new_watchdog_in_child() -> None:
    # A forked child has no watchdog thread, and the lock may have been held at the fork.
    global _watchdog
    _watchdog = _Watchdog()


os.register_at_fork(after_in_child=_new_watchdog_in_child)


@contextmanager
def said_if_slow(message: str, after: float = NOTICE_AFTER) -> Iterator[None]:
    """Logs `message` as a warning if the block is still running `after` seconds in: SQLite
    waits up to two minutes for another writer's lock, and a `track` that waited said
    nothing until it failed or went on."""
    watchdog = _watchdog
    token = watchdog.watch(message, after)
    try:
        yield
    finally:
        # Not in a child forked meanwhile: that watchdog's lock may have been held at the fork.
        if watchdog is _watchdog:
            watchdog.forget(token)
