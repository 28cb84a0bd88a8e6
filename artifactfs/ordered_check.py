"""Whole-file checks of large remote files, fed in chunk order as their chunks arrive.

A file too large to be checked before serving (see `reader`) is checked once all of it has come
in: its chunks are hashed in order against the tracked hash, and the file is dropped from the
cache if it does not match. Hashing them only once the file was complete on disk (as this
project did first) read every chunk back from disk after its fetch, sometimes twice over (each
fetch that found the file complete started a pass of its own); and a file larger than the
cache was never complete on disk, so never checked.

Here each fetched chunk moves the file's check on: one thread takes the chunks from the check's
cursor onward, from the reader's memory (where a sequential reader's latest chunks are) or else
from the disk cache, until one is missing; a later fetch moves it on again. A file is checked
once, each chunk read for it once, as long as each chunk is still cached when the cursor
reaches it. On two cores shared with a local S3 server the check falls behind a cold read, and
about half the chunks of a 1 GiB file come back from the disk cache (counted ad hoc); handing
the chunks to the check with their notices instead, so that none is read back, made the read
slower (310-412 against 376-443 MB/s).

The check so runs while the file is read rather than after it: on a machine short of CPU, the
read pays for the hash (MD5, ~13 ms per 8 MiB chunk) then. Measured on two cores shared with a
local S3 server, a cold 1 GiB read went from ~440 to ~345 MB/s (medians of six), and the
daemon's CPU over the read and the 4 s after it from 4.4-6.5 s to 3.4-4.3 s. The thread keeps
normal priority: under SCHED_IDLE the read kept its speed here (nice 19 did not help), but a
thread the kernel leaves waiting while it holds the GIL stalls every thread of the daemon, and
a training job's data workers keep all cores busy.

Which bytes were hashed: every fetch tells the check the CRC32C of the bytes it brought, and
the check takes the CRC32C of every chunk it hashes. A chunk the cursor passed that is fetched
again with the same bytes (evicted, then read again) needs nothing more; with other bytes, or
found by the cursor with other bytes than its fetch brought (an older copy put back), the
server has answered two contents under one tracked identity: the file is dropped at once, as
for a wrong hash. A file dropped by the reader (its check before serving, or this one) starts
a new generation: what the check had of it, and the notices of fetches from before, are
thrown away.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import crc32c
from cachetools import LRUCache

from artifactfs.entries import ArtifactFileData
from artifactfs.identity import FileId, file_identity
from artifactfs.verification import ContentCheck

log = logging.getLogger(__name__)

# Memory for the checks' progress, in approximate bytes: each file's state, plus 4 bytes per
# chunk hashed. A file whose progress falls out is checked from its start on its next fetch.
PROGRESS_BYTES = 4 * 1024 * 1024
_STATE_BYTES = 1024
GENERATIONS_KEPT = 4096  # files dropped recently, by generation


@dataclass
class _Progress:
    check: ContentCheck
    generation: int  # of the file when this check started
    # The CRC32C of each chunk hashed so far, in order: the cursor is its length.
    hashed: array[int] = field(default_factory=lambda: array("I"))
    # The CRC32C of chunks fetched ahead of the cursor (the latest fetch of each).
    fetched_ahead: dict[int, int] = field(default_factory=dict)


def _progress_size(progress: _Progress) -> int:
    return _STATE_BYTES + 4 * len(progress.hashed) + 64 * len(progress.fetched_ahead)


class OrderedChecks:
    """Checks large files whole as their chunks come in, on one thread.

    `chunk_count(entry)` says how many chunks the file has; `chunk_bytes(entry, index)` gives a
    chunk from memory or the disk cache, or None if it is in neither; `reject(entry, problem)`
    drops a file that failed its check (and reports it; the reader then calls `dropped`)."""

    def __init__(
        self,
        chunk_count: Callable[[ArtifactFileData], int],
        chunk_bytes: Callable[[ArtifactFileData, int], bytes | None],
        reject: Callable[[ArtifactFileData, str], None],
    ) -> None:
        self._chunk_count = chunk_count
        self._chunk_bytes = chunk_bytes
        self._reject = reject
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="artifactfs-check")
        self._closed = False
        self._lock = threading.Lock()
        self._generations: LRUCache[FileId, int] = LRUCache(maxsize=GENERATIONS_KEPT)
        # Only the check thread touches this.
        self._progress: LRUCache[FileId, _Progress] = LRUCache(
            maxsize=PROGRESS_BYTES, getsizeof=_progress_size
        )

    def chunk_cached(self, entry: ArtifactFileData, index: int, data: bytes) -> None:
        """Chunk `index` of the file was fetched as `data` and kept (in memory, the disk cache
        or both): move the file's check on, in the background."""
        notice = (index, crc32c.crc32c(data), self._generation(entry))
        with contextlib.suppress(RuntimeError):  # closed: the mount is going away
            self._pool.submit(self._advance_safely, entry, *notice)

    def dropped(self, entry: ArtifactFileData) -> None:
        """The file's chunks were all dropped (it failed a check): forget its check so far."""
        with self._lock:
            file_id = file_identity(entry)
            self._generations[file_id] = self._generations.get(file_id, 0) + 1

    def settled(self, timeout: float) -> bool:
        """Wait until the checks asked for so far have run; False if `timeout` seconds passed
        first."""
        try:
            self._pool.submit(lambda: None).result(timeout)  # one thread: in order
        except concurrent.futures.TimeoutError:  # not the built-in one before Python 3.11
            return False
        return True

    def close(self) -> None:
        self._closed = True  # a check under way stops at its next chunk
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _generation(self, entry: ArtifactFileData) -> int:
        with self._lock:
            return self._generations.get(file_identity(entry), 0)

    def _advance_safely(self, entry: ArtifactFileData, index: int, crc: int, gen: int) -> None:
        try:
            self._advance(entry, index, crc, gen)
        except Exception:  # a bug here must not go unseen, nor stop the later checks
            log.exception("%s: whole-file check stopped", entry.source_url)

    def _advance(self, entry: ArtifactFileData, index: int, crc: int, generation: int) -> None:
        file_id = file_identity(entry)
        if self._closed or generation != self._generation(entry):
            return  # fetched before the file was dropped: those bytes are gone
        count = self._chunk_count(entry)
        if _STATE_BYTES + 4 * count > PROGRESS_BYTES:
            return  # too many chunks to remember (over 8 TiB in 8 MiB chunks): not checked
        progress = self._progress.get(file_id)
        if progress is None or progress.generation != generation:
            progress = _Progress(ContentCheck(entry), generation)
            if not progress.check.checks_hash:
                return  # no hash of the whole content to check (a multipart ETag)
        hashed_already = index < len(progress.hashed)
        before = progress.hashed[index] if hashed_already else progress.fetched_ahead.get(index)
        if before is not None and before != crc:
            return self._fail(entry, file_id, f"chunk {index} came with other bytes than before")
        if hashed_already:
            return  # fetched again with the bytes hashed already
        progress.fetched_ahead[index] = crc
        while len(progress.hashed) < count:
            if self._closed or self._generation(entry) != generation:
                return
            cursor = len(progress.hashed)
            data = self._chunk_bytes(entry, cursor)
            if data is None:
                break  # not here (yet): its fetch moves the check on
            found = crc32c.crc32c(data)
            if progress.fetched_ahead.pop(cursor, found) != found:
                return self._fail(entry, file_id, f"chunk {cursor} is cached with other bytes")
            progress.check.update(data)
            progress.hashed.append(found)
        self._progress[file_id] = progress  # stored again: its size has grown
        if len(progress.hashed) == count and self._generation(entry) == generation:
            problem = progress.check.problem()
            if problem is not None:
                self._fail(entry, file_id, problem)

    def _fail(self, entry: ArtifactFileData, file_id: FileId, problem: str) -> None:
        self._progress.pop(file_id, None)
        self._reject(entry, problem)
