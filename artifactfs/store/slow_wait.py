"""Saying so when a store write waits long for another process's."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

NOTICE_AFTER = 3.0  # seconds a write may wait for the store's lock before the user is told


@contextmanager
def said_if_slow(message: str, after: float = NOTICE_AFTER) -> Iterator[None]:
    """Logs `message` as a warning if the block is still running `after` seconds in: SQLite
    waits up to two minutes for another writer's lock, and a `track` that waited said
    nothing until it failed or went on."""
    timer = threading.Timer(after, log.warning, (message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
