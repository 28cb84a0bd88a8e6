"""Whole-file checks of large remote files, fed in chunk order as their chunks arrive.

A file too large to be checked before serving (see `reader`) is checked once all of it has come
in: its chunks are hashed in order against the tracked hash, and the file is dropped from the
cache if it does not match. Hashing them only once the file was complete on disk (as this
project did first) read every chunk back from disk after its fetch, sometimes twice over (each
fetch that found the file complete started a pass of its own); and a file larger than the
cache was never complete on disk, so never checked.

Here each fetched chunk moves the file's check on: one thread takes the chunks from the check's
cursor onward, from the reader's memory (a sequential reader's chunks are still there) or else
from the disk cache, until one is missing; a later fetch moves it on again. A file is checked
once, each chunk read for it once, as long as each chunk is still cached when the cursor
reaches it.

The check so runs while the file is read rather than after: on a machine short of CPU, the
read pays for the hash then (a cold 1 GiB read on two cores shared with a local S3 server went
from ~450 to ~360 MB/s, the daemon's CPU over the read and the seconds after it from ~4.5-8 s
to ~3.1 s). The thread keeps normal priority: at a low one (SCHED_IDLE, nice 19) it kept the
read's speed here, but a thread that the kernel leaves waiting while it holds the GIL stalls
every thread of the daemon, and a training job's data workers keep all cores busy.

A chunk fetched again after the cursor passed it (evicted, then read again) starts the file's
check over: the bytes now served are not the ones hashed. To tell that from the late notice of
a fetch the cursor already covered, fetches and hashing steps take numbers from one counter:
a fetch when it starts (the chunk is then in neither memory nor the cache, so whatever is found
of it later is that fetch's bytes), a hashing step before it reads the chunk. A chunk hashed
under a higher number than its fetch's was hashed from that fetch's bytes.
"""

from __future__ import annotations

import itertools
import logging
import threading
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachetools import LRUCache

from artifactfs.entries import ArtifactFileData
from artifactfs.verification import ContentCheck

log = logging.getLogger(__name__)

# Chunks remembered over all files' checks (8 bytes each): checks of files that fall out of
# this start over on their next fetch.
REMEMBERED_CHUNKS = 65_536


@dataclass
class _Progress:
    check: ContentCheck
    # For each chunk hashed so far (the cursor is its length): the number taken before it was read.
    hashed_at: array[int] = field(default_factory=lambda: array("Q"))
    finished: bool = False


class OrderedChecks:
    """Checks large files whole as their chunks come in, on one low-priority thread.

    `chunk_count(entry)` says how many chunks the file has; `chunk_bytes(entry, index)` gives a
    chunk from memory or the disk cache, or None if it is in neither; `reject(entry, problem)`
    drops a file that failed its check (and reports it)."""

    def __init__(
        self,
        chunk_count: Callable[[ArtifactFileData], int],
        chunk_bytes: Callable[[ArtifactFileData, int], bytes | None],
        reject: Callable[[ArtifactFileData, str], None],
    ) -> None:
        self._chunk_count = chunk_count
        self._chunk_bytes = chunk_bytes
        self._reject = reject
        self._numbers = itertools.count()
        self._numbers_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="artifactfs-check")
        # Only the check thread touches this.
        self._progress: LRUCache[tuple[str, str, int], _Progress] = LRUCache(
            maxsize=REMEMBERED_CHUNKS, getsizeof=lambda progress: max(1, len(progress.hashed_at))
        )

    def fetch_starting(self) -> int:
        """The number of a chunk fetch that starts now, while the chunk is in neither memory
        nor the cache: give it to `chunk_cached` once the fetch has kept its bytes."""
        return self._number()

    def chunk_cached(self, entry: ArtifactFileData, index: int, fetch: int) -> None:
        """Chunk `index` of the file was fetched (`fetch` from `fetch_starting`) and kept, in
        memory, the disk cache or both: move the file's check on, in the background."""
        self._pool.submit(self._advance, entry, index, fetch)

    def settled(self, timeout: float) -> bool:
        """Wait until the checks asked for so far have run; False if `timeout` seconds passed
        first."""
        try:
            self._pool.submit(lambda: None).result(timeout)  # one thread: in order
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _number(self) -> int:
        with self._numbers_lock:
            return next(self._numbers)

    def _advance(self, entry: ArtifactFileData, index: int, fetch: int) -> None:
        file_id = (entry.type, entry.file_hash, entry.size or 0)
        progress = self._progress.get(file_id)
        if progress is not None and index < len(progress.hashed_at):
            if fetch < progress.hashed_at[index]:
                return  # hashed from this fetch's bytes already
            progress = None  # fetched again after it was hashed: start over
        if progress is None:
            progress = _Progress(ContentCheck(entry))
            if not progress.check.checks_hash:
                return  # no hash of the whole content to check (a multipart ETag)
        count = self._chunk_count(entry)
        if progress.finished or count > REMEMBERED_CHUNKS:
            return  # done; or too large to remember its progress (over 512 GiB in 8 MiB chunks)
        while len(progress.hashed_at) < count:
            number = self._number()
            data = self._chunk_bytes(entry, len(progress.hashed_at))
            if data is None:
                break  # not here (yet): its fetch moves the check on
            progress.check.update(data)
            progress.hashed_at.append(number)
        progress.finished = len(progress.hashed_at) == count
        self._progress[file_id] = progress  # stored again: its size in the LRU has grown
        if progress.finished:
            problem = progress.check.problem()
            if problem is not None:
                del self._progress[file_id]
                self._reject(entry, problem)
