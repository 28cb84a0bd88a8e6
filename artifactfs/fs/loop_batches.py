"""The reader's prefetch batches, read by tasks of the mount's trio loop.

Why on the loop: fetch threads contend with the loop for the GIL, and on a small machine the
hand-offs, not the work, bounded a program reading a directory of small files
(`sources/s3_loop.py` has the figures). `Source.read_many_on_loop` sends and reads a batch's
GETs as tasks of the loop; what comes back is checked and cached on the loop too (a hash and
a file write of a few KiB to 1 MiB each), and the readers waiting for those files are woken.
A source that cannot (None) has the batch read on a thread as before, and so does a batch
that fails here. At most BATCHES_AT_ONCE batches are under way, as the reader's batch threads
were.

The batches run in a nursery that the unmount does not cancel: each ends by itself within
its time limit (seconds), and its readers are told, whatever happens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from artifactfs.entries import ArtifactFileData
from artifactfs.reader import BATCH_THREADS, BatchBodies
from artifactfs.sources import source_for_entry

log = logging.getLogger(__name__)

BATCHES_AT_ONCE = BATCH_THREADS  # as many GETs at once as the batch threads sent


class LoopBatches:
    """A `Reader.batch_starter` that reads on the trio loop owning `nursery`; callable from
    any thread."""

    def __init__(self, nursery: trio.Nursery, token: trio.lowlevel.TrioToken) -> None:
        self._nursery = nursery
        self._token = token
        self._limiter = trio.CapacityLimiter(BATCHES_AT_ONCE)

    def __call__(
        self,
        entries: list[ArtifactFileData],
        seconds: float,
        done: Callable[[BatchBodies], None],
    ) -> bool:
        def start() -> None:  # on the loop; must not raise (trio would crash)
            try:
                self._nursery.start_soon(self._read, entries, seconds, done)
            except RuntimeError:  # the mount is ending: its nursery takes no new task
                _tell(done, None, entries)

        try:
            self._token.run_sync_soon(start)
        except trio.RunFinishedError:
            return False
        return True

    async def _read(
        self, entries: list[ArtifactFileData], seconds: float, done: Callable[[BatchBodies], None]
    ) -> None:
        bodies: BatchBodies = None
        try:
            async with self._limiter:
                bodies = await source_for_entry(entries[0]).read_many_on_loop(entries, seconds)
        except Exception as exc:  # read on a thread instead, which says why if it fails too
            log.info("%s: prefetch batch failed on the loop: %s", entries[0].source_url, exc)
        _tell(done, bodies, entries)


def _tell(
    done: Callable[[BatchBodies], None], bodies: BatchBodies, entries: list[ArtifactFileData]
) -> None:
    try:
        done(bodies)
    except Exception as exc:  # a bug there must not end the mount
        log.error(
            "%s: prefetch batch not settled: %s: %s", entries[0].source_url, type(exc).__name__, exc
        )
