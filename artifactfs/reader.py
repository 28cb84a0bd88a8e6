"""Entry + offset + length -> the tracked bytes, or ReadError (the mount turns it into EIO).

Local entries are read in place, after checking that the file still is what was tracked: its
size, and its SHA-1 (from the hash cache when size and mtime are unchanged, else re-hashed).

Remote entries are cut into fixed-size chunks. Each chunk comes from the disk cache or from one
ranged, conditional GET (the source checks the identity of every response); concurrent readers
of a chunk wait for the same fetch. A reader that continues where its last read ended is
sequential: the next chunks are fetched ahead on the bounded pool.

No byte is served before the whole-file hash vouched for it, wherever a file is small enough:

- a file that fits in one chunk is checked against its whole-file hash before it is cached;
- a file of several chunks, up to `VERIFY_BEFORE_SERVING_BYTES`, is fetched whole on its first
  read (every missing chunk at once, on the pool) and checked before any of it is served, as
  CernVM-FS does for whole files. A file that passed is remembered with the SHA-256 of each of
  its chunks, so a chunk fetched again later (after eviction) is checked against that; after a
  restart the check runs again, over the chunks in the disk cache;
- a larger file is checked as its chunks come in, in order, in the background
  (`ordered_check`), and dropped from the cache if the hash does not match; until the check
  has seen all of it, its chunks are guarded by the conditional requests and the identity in
  each response only.

A file that fails its check is dropped from the cache and served again only once all of it has
been fetched anew and checked. Transient failures are retried with back-off within a deadline,
and the requests of one chunk fetch are cut off when it passes (`RequestDeadline`): a stalled
or trickling server gives EIO after about the deadline, never later.

Chunks just fetched also stay in memory (a small LRU of checked bytes), for the readers right
behind the fetch. A random read of a chunk found on disk reads and checks only the 1 MiB
blocks of it that it returns (the kernel asks for at most 1 MiB at a time); a sequential
reader gets whole chunks loaded into memory, ahead of it. `prefetch()` warms the cache with
whole small files a program is about to open (its neighbours in a directory), on pools of
their own so they never delay a demand read: files up to 1 MiB of a source that can read
several at once in batches (`Source.read_many`, one thread per batch, or wherever
`batch_starter` says: the mount reads them on its trio loop), the others one by one. A read
may wait for a fetch under way without a thread (`fetch_under_way`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NoReturn, TypeVar

from cachetools import LRUCache, TTLCache

from artifactfs.cache import ChunkCache, chunk_key
from artifactfs.connect_breaker import ConnectBreaker, breaker_key
from artifactfs.entries import TYPE_LOCAL, ArtifactFileData
from artifactfs.errors import (
    ArtifactfsError,
    CheckFailedError,
    ConnectFailedError,
    TransientSourceError,
)
from artifactfs.identity import FileId, content_identity, file_identity
from artifactfs.ordered_check import OrderedChecks
from artifactfs.sources import content_problem, source_for_entry
from artifactfs.sources.base import RequestDeadline
from artifactfs.sources.local import (
    LocalSource,
    NotARegularFileError,
    local_path_of,
    open_regular,
)
from artifactfs.verification import ContentCheck

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
DEFAULT_READAHEAD_CHUNKS = 4
DEFAULT_WORKERS = 8
DEFAULT_DEADLINE = 30.0  # seconds one read may spend on retries before it fails
DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024
MAX_PENDING_PREFETCHES = 64
PREFETCH_BATCH = 8  # small files one prefetch thread fetches together (`Source.read_many`)
BATCH_THREADS = 2  # threads of batches: two keep a server busy, more only contend
BATCH_FILE_BYTES = 1024 * 1024  # files up to this size are prefetched in batches
BATCH_DEADLINE = 5.0  # seconds a batch may take; what it did not bring is fetched alone
FAILURE_MEMORY = 5.0  # seconds a failed chunk fetch or file check answers EIO without a retry
RETRY_BASE_DELAY = 0.2
# A fetch ends within the deadline (its requests are cut off then): a reader waiting for one
# gives up this much later, in case the fetch was queued behind others.
FETCH_WAIT_MARGIN = 5.0
# Files of several chunks up to this size are fetched whole and checked before any byte of
# them is served. Above it, a read of a few bytes must not fetch the whole file.
VERIFY_BEFORE_SERVING_BYTES = 64 * 1024 * 1024
# Chunk digests kept for the files that passed that check (32 bytes each; about 5 MiB with
# Python's overhead).
VERIFIED_CHUNK_DIGESTS = 65_536

# The bodies of a batch's entries (None: not read), or None: the batch was not read at all.
BatchBodies = list[bytes | None] | None
# Reads a batch of small files elsewhere (the mount's trio loop) within the seconds given,
# then calls back with what it read; False when it does not take the batch.
BatchStarter = Callable[[list[ArtifactFileData], float, Callable[[BatchBodies], None]], bool]


class ReadError(CheckFailedError):
    """The tracked bytes cannot be served; the message names the file and the reason."""


@dataclass(frozen=True)
class _Prefetch:
    entry: ArtifactFileData
    key: bytes
    future: Future[bytes]  # in `_inflight` until done


@dataclass
class _Sequence:
    next_offset: int = 0
    streak: int = 0  # contiguous reads so far: the read-ahead window grows with it


def _file_state(info: os.stat_result) -> tuple[int, int, int, int, int]:
    """Which file, and as it is now: a file replaced, or changed in place, has another."""
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class Reader:
    def __init__(
        self,
        cache: ChunkCache,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        workers: int = DEFAULT_WORKERS,
        readahead_chunks: int = DEFAULT_READAHEAD_CHUNKS,
        deadline: float = DEFAULT_DEADLINE,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        verify_before_serving_bytes: int = VERIFY_BEFORE_SERVING_BYTES,
        direct_reads: bool = True,
        failure_memory: float = FAILURE_MEMORY,
    ) -> None:
        self.cache = cache
        self.chunk_size = chunk_size
        self.readahead_chunks = readahead_chunks
        self.deadline = deadline
        self.verify_before_serving_bytes = verify_before_serving_bytes
        self.direct_reads = direct_reads
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="artifactfs-fetch")
        self._prefetch_pool = ThreadPoolExecutor(workers, thread_name_prefix="artifactfs-prefetch")
        self._batch_pool = ThreadPoolExecutor(BATCH_THREADS, thread_name_prefix="artifactfs-batch")
        self._pending_prefetches = 0
        self.batch_starter: BatchStarter | None = None
        self._lock = threading.Lock()
        self._memory: LRUCache[bytes, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        # Files whose whole-file check failed (served again only once checked anew), those
        # that failed it or the learning of their size lately, and chunks that just failed to
        # fetch: the kernel retries a failed read at once, and it should get its EIO at once
        # too, not a new fetch of all of a large file (or a new ask of its size) each time.
        self._failed_files: dict[FileId, str] = {}
        self._failed_lately: TTLCache[FileId, str] = TTLCache(maxsize=4096, ttl=failure_memory)
        # Files a read is fetching anew and hashing (`_reverify`), by how many reads: that read
        # reports a failure itself, so the ordered check, fed by the same fetches, does not.
        self._reverifying: dict[FileId, int] = {}
        self._failed_chunks: TTLCache[bytes, str] = TTLCache(maxsize=4096, ttl=failure_memory)
        self._inflight: dict[bytes, Future[bytes]] = {}
        # Files checked whole before serving: their chunks' SHA-256, in order. The outcome of
        # a check under way, for the readers that wait for it (one check per file at a time).
        self._verified: LRUCache[FileId, tuple[bytes, ...]] = LRUCache(
            maxsize=VERIFIED_CHUNK_DIGESTS, getsizeof=len
        )
        self._verifying: dict[FileId, Future[None]] = {}
        self._sequences: dict[FileId, _Sequence] = {}
        self._ordered_checks = OrderedChecks(
            lambda entry: self._chunk_count(entry.size or 0),
            self._chunk_for_check,
            self._reject_checked_file,
        )
        # Local files checked: (path, their `_file_state`, tracked hash).
        self._verified_local: set[tuple[str, int, int, int, int, int, str]] = set()
        # Sizes learned for entries tracked without one (a few ints each).
        self._learned_sizes: LRUCache[FileId, int] = LRUCache(maxsize=65_536)
        # Endpoints that kept refusing connections: their fetches are not retried meanwhile.
        self._breaker = ConnectBreaker()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
        self._batch_pool.shutdown(wait=False, cancel_futures=True)
        self._ordered_checks.close()

    def prefetch(self, entries: Sequence[ArtifactFileData]) -> int:
        """Start fetching these small remote files (one chunk each) into the cache, unless
        cached or under way, on pools of their own, so that a demand read never queues behind
        them. Files up to BATCH_FILE_BYTES of a source that reads several at once
        (`Source.reads_many`) go PREFETCH_BATCH at a time, each batch read together by one
        thread; the others one by one. Returns how many of `entries` were dealt with, in
        order: fewer when too many prefetches are pending (ask again later for the rest)."""
        wanted: list[_Prefetch] = []
        taken = 0
        for entry in entries:
            # (A file tracked without a size is not: its size is learned when it is read.)
            small = entry.size is not None and self._chunk_count(entry.size) == 1
            if entry.type != TYPE_LOCAL and small:
                key = self._key(entry, 0)
                if not self.cache.contains(key):
                    with self._lock:
                        if self._running_fetch(key) is None and key not in self._memory:
                            if self._pending_prefetches >= MAX_PENDING_PREFETCHES:
                                break
                            self._pending_prefetches += 1
                            future: Future[bytes] = Future()
                            self._inflight[key] = future  # a demand read waits for it
                            wanted.append(_Prefetch(entry, key, future))
            taken += 1
        batches: dict[str, list[_Prefetch]] = {}
        for item in wanted:
            item.future.add_done_callback(self._forget_inflight)
            item.future.add_done_callback(self._prefetch_done)
            if (item.entry.size or 0) <= BATCH_FILE_BYTES and source_for_entry(
                item.entry
            ).reads_many:
                batches.setdefault(item.entry.type, []).append(item)
            else:
                self._submit(self._prefetch_pool, self._fetch_single, [item])
        for items in batches.values():
            for start in range(0, len(items), PREFETCH_BATCH):
                self._start_batch(items[start : start + PREFETCH_BATCH])
        return taken

    def _start_batch(self, batch: list[_Prefetch]) -> None:
        """Have `batch_starter` read the batch (the mount: on its trio loop), else a thread."""
        starter = self.batch_starter
        entries = [item.entry for item in batch]
        if starter is None or not starter(
            entries, self._batch_seconds(), lambda bodies: self._batch_read(batch, bodies)
        ):
            self._submit(self._batch_pool, self._fetch_batch, batch)

    def _batch_read(self, batch: list[_Prefetch], bodies: BatchBodies) -> None:
        """What `batch_starter` read of a batch: checked and cached here, on its thread."""
        if bodies is None:  # not read there after all
            self._submit(self._batch_pool, self._fetch_batch, batch)
        else:
            self._settle_batch(batch, bodies)

    @staticmethod
    def _submit(
        pool: ThreadPoolExecutor, job: Callable[[list[_Prefetch]], None], items: list[_Prefetch]
    ) -> None:
        try:
            pool.submit(job, items)
        except RuntimeError:  # the reader is closed: nobody will fetch them
            for item in items:
                item.future.set_exception(ReadError("the reader is closed"))

    def _prefetch_done(self, done: Future[bytes]) -> None:
        with self._lock:
            self._pending_prefetches -= 1
        if not done.cancelled() and done.exception() is not None:
            # A prefetch that fails is only a lost hint; a read of that file will say why.
            log.info("prefetch failed: %s", done.exception())

    def _fetch_single(self, items: list[_Prefetch]) -> None:
        for item in items:
            self._settle(item)

    def _settle(self, item: _Prefetch, fetched: bytes | None = None) -> None:
        """Fetch (unless `fetched` brings the bytes), check and cache one prefetched file, and
        tell its waiters the outcome."""
        try:
            result = self._fetch_chunk(item.entry, 0, item.key, fetched)
        except BaseException as exc:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)

    def _fetch_batch(self, batch: list[_Prefetch]) -> None:
        """Fetch small files together (`Source.read_many`), within BATCH_DEADLINE: a file
        whose answer stalls is given up then, not waited for as long as a demand read would
        be. Any the batch did not bring is fetched on its own, as a demand read would be
        (retries, errors told, failures remembered)."""
        entries = [item.entry for item in batch]
        try:
            with RequestDeadline(self._batch_seconds(), entries[0].source_url):
                bodies = source_for_entry(entries[0]).read_many(entries)
        except Exception as exc:  # each file is then fetched on its own, which says why
            log.info("%s: prefetch batch failed: %s", entries[0].source_url, exc)
            bodies = [None] * len(batch)
        self._settle_batch(batch, bodies)

    def _batch_seconds(self) -> float:
        """How long a batch may take, wherever it is read."""
        return min(self.deadline, BATCH_DEADLINE)

    def _settle_batch(self, batch: list[_Prefetch], bodies: list[bytes | None]) -> None:
        """Check and cache what a batch brought; fetch the rest one by one on a thread."""
        for item, data in zip(batch, bodies, strict=True):
            if data is None:
                self._submit(self._prefetch_pool, self._fetch_single, [item])
            else:
                self._breaker.reset(breaker_key(item.entry.source_url))  # its server answered
                self._settle(item, data)

    def iter_file(self, entry: ArtifactFileData) -> Iterator[bytes]:
        """Every byte of the entry, chunk by chunk, through the cache (with read-ahead)."""
        try:
            entry = self.sized(entry)
        except ArtifactfsError as exc:
            raise ReadError(str(exc)) from None
        size = entry.size or 0
        for offset in range(0, size, self.chunk_size):
            yield self.read(entry, offset, self.chunk_size)

    # -- public -----------------------------------------------------------------------------

    def read(self, entry: ArtifactFileData, offset: int, length: int) -> bytes:
        try:
            entry = self.sized(entry)
            size = entry.size or 0
            if offset >= size or length <= 0:
                return b""
            length = min(length, size - offset)
            if file_identity(entry) in self._failed_files:
                self._reverify_unless_failed_lately(entry)
            if entry.type == TYPE_LOCAL:
                return self._read_local(entry, offset, length)
            return self._read_remote(entry, offset, length)
        except ReadError:
            self.cache.record_error()
            raise
        except ArtifactfsError as exc:
            self.cache.record_error()
            raise ReadError(_naming_the_file(entry, exc)) from None

    def sized(self, entry: ArtifactFileData) -> ArtifactFileData:
        """The entry with its size: as tracked, else (an imported entry may have none) as its
        source says, asked once, by the check that its bytes are still the tracked ones.
        Chunks, caching and checks all go by the size."""
        if entry.size is not None:
            return entry
        size = self.known_size(entry)
        if size is None:
            file_id = file_identity(entry)
            with self._lock:
                failed = self._failed_lately.get(file_id)
            if failed is not None:  # each stat of it asks: not the source each time
                raise ReadError(failed)
            source = source_for_entry(entry)
            try:
                size = _with_retries(
                    lambda: source.check(entry), self.deadline, entry.source_url, self._breaker
                )
            except ArtifactfsError as exc:
                with self._lock:
                    self._failed_lately[file_id] = _naming_the_file(entry, exc)
                raise
            with self._lock:
                self._learned_sizes[file_id] = size
        return entry.with_size(size)

    def known_size(self, entry: ArtifactFileData) -> int | None:
        """The entry's size if it is tracked or was learned (no I/O), else None."""
        if entry.size is not None:
            return entry.size
        with self._lock:
            return self._learned_sizes.get(file_identity(entry))

    def read_if_ready(self, entry: ArtifactFileData, offset: int, length: int) -> memoryview | None:
        """The bytes of `read`, if they can be answered without any I/O or wait: a read within
        one chunk that is in memory, of a file whose bytes may be served now (not failed, and
        checked whole if it must be). None means: call `read` (on a worker thread). The bytes
        are a view of the chunk in memory: no copy of up to 1 MiB per read."""
        index = self._single_chunk(entry, offset, length)
        if index is None:
            return None
        length = min(length, (entry.size or 0) - offset)
        key = self._key(entry, index)
        must_be_checked = self._checked_before_serving(entry)
        with self._lock:
            data = self._memory.get(key)
            if data is None or file_identity(entry) in self._failed_files:
                return None
            if must_be_checked and file_identity(entry) not in self._verified:
                return None
        if not self.cache.touch(key):
            return None  # evicted from disk: `read` puts it back (disk I/O)
        self.cache.record_hit()
        self._maybe_read_ahead(entry, offset, length, index)  # only starts fetches
        start = offset - index * self.chunk_size
        return memoryview(data)[start : start + length]

    def fetch_under_way(
        self, entry: ArtifactFileData, offset: int, length: int
    ) -> Future[bytes] | None:
        """The fetch in flight of the one chunk a read of [offset, offset+length) needs, if
        there is one: the caller may wait for it without a thread of its own, then try
        `read_if_ready` again (and `read` if that still says None)."""
        index = self._single_chunk(entry, offset, length)
        if index is None:
            return None
        key = self._key(entry, index)
        with self._lock:
            if key in self._failed_chunks:
                return None  # `read` answers at once with the failure
            return self._running_fetch(key)

    def _single_chunk(self, entry: ArtifactFileData, offset: int, length: int) -> int | None:
        """The index of the one chunk a read of [offset, offset+length) of a remote entry
        needs (clipped at the end of the file); None for a local entry, a read at or past
        the end or of nothing, and one that spans chunks."""
        size = entry.size or 0
        if entry.type == TYPE_LOCAL or offset >= size or length <= 0:
            return None
        index = offset // self.chunk_size
        if (min(offset + length, size) - 1) // self.chunk_size != index:
            return None
        return index

    def give_up_waiting(self, entry: ArtifactFileData, offset: int) -> NoReturn:
        """For a caller whose wait for `fetch_under_way` timed out: fail as a read that waited
        that long for its fetch does (and its retries at once, for a while)."""
        key = self._key(entry, offset // self.chunk_size)
        message = f"{entry.source_url}: fetch timed out"
        with self._lock:
            self._failed_chunks[key] = message
        self.cache.record_error()
        raise ReadError(message)

    def checks_settled(self, timeout: float) -> bool:
        """Wait until the background whole-file checks of the chunks fetched so far have run
        (`ordered_check`); False if `timeout` seconds passed first."""
        return self._ordered_checks.settled(timeout)

    def cached_bytes(self, entry: ArtifactFileData) -> int:
        """How many of the entry's bytes are in the cache now. A local file is read in place:
        all of it while it is there at its tracked size, none once it is gone or resized."""
        size = entry.size or 0
        if entry.type == TYPE_LOCAL:
            try:
                info = os.stat(local_path_of(entry.source_url))
            except (OSError, ArtifactfsError):  # gone, or a source URL that names no file
                return 0
            if not stat.S_ISREG(info.st_mode):
                return 0
            if entry.size is None:  # imported without a size: the file's, as a read finds it
                return info.st_size
            return size if info.st_size == size else 0
        total = 0
        # The tree shows no entry over 5 TiB: at most 655,360 chunks of 8 MiB to look up.
        for index in range(self._chunk_count(size)):
            if self.cache.contains(self._key(entry, index)):
                total += min(self.chunk_size, size - index * self.chunk_size)
        return total

    # -- local ------------------------------------------------------------------------------

    def _read_local(self, entry: ArtifactFileData, offset: int, length: int) -> bytes:
        path = local_path_of(entry.source_url)
        try:
            fd, info = open_regular(path)
        except NotARegularFileError as exc:
            raise ReadError(f"{entry.source_url}: {exc.strerror}") from None
        except OSError as exc:
            raise ReadError(f"{entry.source_url}: cannot open: {exc.strerror}") from None
        try:
            if entry.size is not None and info.st_size != entry.size:
                raise ReadError(
                    f"{entry.source_url}: size is {info.st_size} bytes, tracked {entry.size}"
                )
            identity = (path, *_file_state(info), entry.file_hash)
            if identity not in self._verified_local:
                # Checks size, then the SHA-1 (hash cache or a fresh read): a changed file fails.
                local = source_for_entry(entry)
                assert isinstance(local, LocalSource)
                local.check(entry)
                # The check read the path; the bytes come from the file opened before it. If
                # the path now names another file, or this one changed, the check vouched for
                # other bytes than these (a file replaced by a rename meanwhile).
                try:
                    now = os.stat(path)
                except OSError as exc:
                    raise ReadError(f"{entry.source_url}: cannot stat: {exc.strerror}") from None
                if _file_state(now) != _file_state(info):
                    raise ReadError(f"{entry.source_url}: changed while it was being checked")
                with self._lock:
                    self._verified_local.add(identity)
            data = os.pread(fd, length, offset)
            # A write in place that landed since the open (a pipeline rewriting its dataset)
            # may be in these bytes: they are served only if the file is still as checked.
            if _file_state(os.fstat(fd)) != _file_state(info):
                raise ReadError(f"{entry.source_url}: changed while it was being read")
            return data
        finally:
            os.close(fd)

    # -- remote -----------------------------------------------------------------------------

    def _chunk_count(self, size: int) -> int:
        return max(1, -(-size // self.chunk_size))

    def _key(self, entry: ArtifactFileData, index: int) -> bytes:
        return chunk_key(entry.type, content_identity(entry), entry.size, self.chunk_size, index)

    def _keys(self, entry: ArtifactFileData) -> list[bytes]:
        """The keys of all the entry's chunks, in order."""
        return [self._key(entry, index) for index in range(self._chunk_count(entry.size or 0))]

    def _read_remote(self, entry: ArtifactFileData, offset: int, length: int) -> bytes:
        if self._checked_before_serving(entry):
            self._ensure_verified(entry)
        first = offset // self.chunk_size
        last = (offset + length - 1) // self.chunk_size
        key = self._key(entry, first)
        starts_fetch = False
        if not self._in_memory(key) and not self.cache.contains(key):
            with self._lock:
                starts_fetch = self._running_fetch(key) is None
            self._start_fetch(entry, first)  # the chunk asked for goes before any read-ahead
        streak = self._maybe_read_ahead(entry, offset, length, last)
        # A read that had to start its chunk's fetch, and is not part of a sequential run,
        # gets its own bytes by a small request (readers that come later wait for the chunk).
        if starts_fetch and streak == 0 and first == last and self._may_read_directly(entry):
            direct = self._read_directly(entry, key, offset, length)
            if direct is not None:
                return direct
        pieces = []
        for index in range(first, last + 1):
            chunk_start = index * self.chunk_size
            start = max(offset - chunk_start, 0)
            end = min(offset + length - chunk_start, self.chunk_size)
            pieces.append(self._piece(entry, index, start, end, sequential=streak > 0))
        return b"".join(pieces)

    def _piece(
        self, entry: ArtifactFileData, index: int, start: int, end: int, *, sequential: bool
    ) -> bytes:
        """Bytes [start, end) of one chunk for a reader: from memory, else from the disk cache
        (a random reader: only the blocks that hold them, each checked; a sequential one: the
        whole chunk, kept in memory, so that its next reads need no disk read or worker
        thread), else from a fetch."""
        key = self._key(entry, index)
        with self._lock:
            data = self._memory.get(key)
        if data is not None:
            self.cache.record_hit()
            if not self.cache.touch(key):
                # Evicted from disk while kept in memory: a read makes it recent again, on
                # disk too, so that what was read last survives a remount.
                self.cache.put(key, data)
            return data[start:end]
        if self.cache.contains(key) and not sequential:
            piece = self.cache.read(key, start, end - start)
            if piece is not None:
                return piece
        return self._chunk(entry, index)[start:end]

    def _may_read_directly(self, entry: ArtifactFileData) -> bool:
        """Whether a read may be served from its own ranged request, before its chunk: only
        where chunks are not checked before serving anyway (a file of one chunk, or of several
        up to `verify_before_serving_bytes`), since such a read is guarded by the same
        conditional request and response identity as a chunk of the file would be."""
        return (
            self.direct_reads
            and self._chunk_count(entry.size or 0) > 1
            and not self._checked_before_serving(entry)
        )

    def _read_directly(
        self, entry: ArtifactFileData, key: bytes, offset: int, length: int
    ) -> bytes | None:
        """The bytes a first or random read asks for, by a ranged request of just them.

        Its chunk is being fetched meanwhile, for the reads that follow; the reader waiting
        for all 8 MiB of it would wait several times longer (first byte of a large file,
        scattered 4 KiB reads). None, to wait for the chunk after all, if this fails."""
        self._raise_if_failed_recently(entry, key)
        source = source_for_entry(entry)
        try:
            with RequestDeadline(self.deadline, entry.source_url):
                data = source.read_range(entry, offset, length)
        except Exception as exc:  # the chunk's fetch retries, and decides on EIO
            log.info("%s: direct read failed, waiting for its chunk: %s", entry.source_url, exc)
            return None
        self.cache.record_fetch(len(data))
        return data if len(data) == length else None

    def _in_memory(self, key: bytes) -> bool:
        with self._lock:
            return key in self._memory

    def _maybe_read_ahead(
        self, entry: ArtifactFileData, offset: int, length: int, last_index: int
    ) -> int:
        """Start fetching the chunks after this read if the reader is sequential; returns
        how many contiguous reads it made so far (0: a first or a random read)."""
        key = file_identity(entry)
        with self._lock:
            sequence = self._sequences.setdefault(key, _Sequence())
            contiguous = offset == sequence.next_offset and offset > 0
            sequence.streak = sequence.streak + 1 if contiguous else 0
            sequence.next_offset = offset + length
            streak = sequence.streak
            if len(self._sequences) > 10_000:
                self._sequences.clear()
        if offset != 0 and streak == 0:
            return streak  # a random reader: no read-ahead
        # A first read at 0 gets one chunk ahead; a reader that keeps going, the full window.
        window = self.readahead_chunks if streak > 0 else min(1, self.readahead_chunks)
        count = self._chunk_count(entry.size or 0)
        for index in range(last_index + 1, min(count, last_index + 1 + window)):
            ahead = self._key(entry, index)
            if self._in_memory(ahead):
                continue
            # A chunk in the disk cache is loaded into memory ahead too (the fetch finds it),
            # if memory can keep it.
            if self.chunk_size > self._memory.maxsize and self.cache.contains(ahead):
                continue
            self._start_fetch(entry, index)
        return streak

    def _cached(self, key: bytes, counted: bool = True) -> bytes | None:
        """A verified chunk from memory, else from the disk cache (then kept in memory).
        Not `counted` as a hit or miss: a second look for the read that counted its miss."""
        with self._lock:
            data = self._memory.get(key)
        if data is not None:
            if counted:
                self.cache.record_hit()
            return data
        if not self.cache.contains(key):
            if counted:
                self.cache.record_miss()  # known absent: no need to try opening its file
            return None
        data = self.cache.get(key)
        if data is not None:
            self._remember(key, data)
        return data

    def _remember(self, key: bytes, data: bytes) -> None:
        if len(data) <= self._memory.maxsize:
            with self._lock:
                self._memory[key] = data

    def _forget(self, key: bytes) -> None:
        with self._lock:
            self._memory.pop(key, None)
        self.cache.drop(key)

    def _chunk(self, entry: ArtifactFileData, index: int) -> bytes:
        key = self._key(entry, index)
        cached = self._cached(key)
        if cached is not None:
            return cached
        self._raise_if_failed_recently(entry, key)
        return self._wait(entry, key, self._start_fetch(entry, index))

    def _raise_if_failed_recently(self, entry: ArtifactFileData, key: bytes) -> None:
        """A chunk is cached by its content: a file with the same content from another source
        shares its failure, said as this file's, naming the source that failed."""
        with self._lock:
            failed = self._failed_chunks.get(key)
        if failed is not None:
            raise ReadError(_starting_with(entry.source_url, failed))

    def _wait(self, entry: ArtifactFileData, key: bytes, future: Future[bytes]) -> bytes:
        try:
            return future.result(timeout=self.deadline + FETCH_WAIT_MARGIN)
        except concurrent.futures.TimeoutError:  # not the built-in one before Python 3.11
            message = f"{entry.source_url}: fetch timed out"
            with self._lock:
                self._failed_chunks[key] = message
            raise ReadError(message) from None

    def _start_fetch(self, entry: ArtifactFileData, index: int) -> Future[bytes]:
        """The in-flight fetch of this chunk, started if there is none (one fetch per chunk)."""
        key = self._key(entry, index)
        with self._lock:
            running = self._running_fetch(key)
            if running is not None:
                return running
            future = self._pool.submit(self._fetch_chunk, entry, index, key)
            self._inflight[key] = future
        # Outside the lock: a callback on a finished future runs at once, in this thread.
        future.add_done_callback(self._forget_inflight)
        return future

    def _running_fetch(self, key: bytes) -> Future[bytes] | None:
        """The fetch of this chunk under way, if any (under `_lock`). A finished one stays in
        `_inflight` until its callback runs, after its waiters went on: its chunk may have
        been dropped since (evicted, or failing a check), so it counts as none, and the chunk
        is fetched again rather than served from that old result."""
        running = self._inflight.get(key)
        return running if running is not None and not running.done() else None

    def _forget_inflight(self, done: Future[bytes]) -> None:
        with self._lock:
            for key, future in list(self._inflight.items()):
                if future is done:
                    del self._inflight[key]

    def _fetch_chunk(
        self, entry: ArtifactFileData, index: int, key: bytes, fetched: bytes | None = None
    ) -> bytes:
        try:
            return self._fetch_and_cache(entry, index, key, fetched)
        except ArtifactfsError as exc:
            # Remembered here, where every fetch ends (read-ahead too, which nobody waits
            # for): the kernel retries a failed read at once, and the retry gets EIO at once.
            with self._lock:
                self._failed_chunks[key] = _naming_the_file(entry, exc)
            raise

    def _fetch_and_cache(
        self, entry: ArtifactFileData, index: int, key: bytes, fetched: bytes | None = None
    ) -> bytes:
        """The chunk, fetched (unless `fetched` brings its bytes already), checked as far as
        it can be, cached and kept in memory."""
        size = entry.size or 0
        offset = index * self.chunk_size
        length = min(self.chunk_size, size - offset)
        if fetched is not None:
            data = fetched
        else:
            # Another reader may have fetched it meanwhile (a read-ahead has no read of its own
            # that counted a miss; the read that waits for one counts its hit on the chunk).
            cached = self._cached(key, counted=False)
            if cached is not None:
                return cached
            source = source_for_entry(entry)
            data = _with_retries(
                lambda: source.read_range(entry, offset, length),
                self.deadline,
                entry.source_url,
                self._breaker,
            )
        self.cache.record_fetch(len(data))
        if len(data) != length:
            raise ReadError(
                f"{entry.source_url}: chunk {index} has {len(data)} bytes, expected {length}"
            )
        self._check_fetched(entry, index, data)
        # A chunk of a file still to be checked whole is cached too (the check reads it from
        # here; every read of such a file waits for the check, which drops it if it fails).
        self.cache.put(key, data)
        self._remember(key, data)
        if self._chunk_count(size) > 1 and not self._checked_before_serving(entry):
            self._ordered_checks.chunk_cached(entry, index, data)  # checked off the read path
        return data

    def _check_fetched(self, entry: ArtifactFileData, index: int, data: bytes) -> None:
        """What can be checked of one chunk as it arrives: a file of one chunk against its
        whole-file hash; a chunk of a file that passed its whole-file check in this process
        (and was evicted since) against the SHA-256 it had then."""
        if self._chunk_count(entry.size or 0) == 1:
            check = ContentCheck(entry)
            check.update(data)
            problem = check.problem()
            if problem is not None:
                raise ReadError(f"{entry.source_url}: {problem}")
            return
        with self._lock:
            digests = self._verified.get(file_identity(entry))
        if digests is not None and hashlib.sha256(data).digest() != digests[index]:
            raise ReadError(
                f"{entry.source_url}: chunk {index} is not the one its whole-file check passed"
            )

    # -- whole-file check before serving ------------------------------------------------------

    def _checked_before_serving(self, entry: ArtifactFileData) -> bool:
        """A remote file of several chunks, small enough to fetch whole, with a hash that
        covers all of it: none of its bytes is served before all of them passed the check."""
        size = entry.size or 0
        return (
            self._chunk_count(size) > 1
            and size <= self.verify_before_serving_bytes
            and ContentCheck(entry).checks_hash
        )

    def _ensure_verified(self, entry: ArtifactFileData) -> None:
        """Return once the whole file passed its check in this process, else raise ReadError.
        The first reader runs the check; readers that come meanwhile wait for its outcome."""
        file_id = file_identity(entry)
        with self._lock:
            if file_id in self._verified:
                return
            pending = self._verifying.get(file_id)
            running = pending is not None
            if pending is None:
                pending = self._verifying[file_id] = Future()
        if running:
            self._wait_for_verification(entry, pending)
            return
        try:
            digests = self._verify_whole_file(entry)
        except BaseException as exc:
            with self._lock:
                del self._verifying[file_id]
            pending.set_exception(exc)
            raise
        with self._lock:
            if len(digests) <= self._verified.maxsize:  # else: checked again on each read
                self._verified[file_id] = digests
            del self._verifying[file_id]
        pending.set_result(None)

    def _wait_for_verification(self, entry: ArtifactFileData, pending: Future[None]) -> None:
        # The check's fetches run at once and end within the deadline, unless queued behind
        # other fetches: twice the deadline leaves room for that.
        wait = 2 * self.deadline + FETCH_WAIT_MARGIN
        try:
            pending.result(timeout=wait)
        except concurrent.futures.TimeoutError:  # not the built-in one before Python 3.11
            raise ReadError(
                f"{entry.source_url}: its whole-file check took longer than {wait:.0f}s"
            ) from None

    def _verify_whole_file(self, entry: ArtifactFileData) -> tuple[bytes, ...]:
        """Fetch every chunk not cached (all at once, one fetch each), hash them all in order,
        and return each chunk's SHA-256; if the file is not the tracked one, drop its chunks,
        remember it as failed and raise ReadError."""
        keys = self._keys(entry)
        for key in keys:
            self._raise_if_failed_recently(entry, key)
        fetches = {
            index: self._start_fetch(entry, index)
            for index, key in enumerate(keys)
            if not self.cache.contains(key)
        }
        check = ContentCheck(entry)
        digests = []
        for index, key in enumerate(keys):
            # Taken from the fetch itself when there is one: whatever the cache kept of it.
            fetch = fetches.pop(index, None)
            chunk = (
                self._wait(entry, key, fetch) if fetch is not None else self._chunk(entry, index)
            )
            check.update(chunk)
            digests.append(hashlib.sha256(chunk).digest())
        problem = content_problem(check)  # from the cache alone (a remount), SSE-KMS asks
        if problem is not None:
            self._reject_whole_file(entry, keys, problem, hold_off=True)
        return tuple(digests)

    def _reject_whole_file(
        self, entry: ArtifactFileData, keys: list[bytes], problem: str, *, hold_off: bool = False
    ) -> NoReturn:
        """Drop every chunk of a file that failed its whole-file check; raise ReadError.

        Reads of the file then answer EIO for `failure_memory` seconds without a new fetch: the
        kernel retries a failed read at once, and fetching all of the file again for that (a
        read checks it anew, see `_reverify`) is no use. With `hold_off`, so do its chunks
        (fetched by a check before serving, which `read` does not always go through)."""
        message = f"{entry.source_url}: whole-file check failed, dropped from the cache: {problem}"
        self._ordered_checks.dropped(entry)  # first: a check under way stops at its next chunk
        with self._lock:
            self._failed_files[file_identity(entry)] = message
            self._failed_lately[file_identity(entry)] = message
            if hold_off:
                for key in keys:
                    self._failed_chunks[key] = message
        for key in keys:
            self._forget(key)
        raise ReadError(message)

    def _reverify_unless_failed_lately(self, entry: ArtifactFileData) -> None:
        with self._lock:
            message = self._failed_lately.get(file_identity(entry))
        if message is not None:
            raise ReadError(message)
        self._reverify(entry)

    def _reverify(self, entry: ArtifactFileData) -> None:
        """A file whose whole-file check failed is served again only once all of it has been
        fetched anew and checked whole; until then every read of it fails."""
        if self._checked_before_serving(entry):
            self._ensure_verified(entry)  # its chunks were dropped: fetched anew, then checked
        else:
            # Hashed as the chunks come, whatever the size of the cache.
            keys = self._keys(entry)
            check = ContentCheck(entry)
            file_id = file_identity(entry)
            with self._lock:
                self._reverifying[file_id] = self._reverifying.get(file_id, 0) + 1
            try:
                for index in range(len(keys)):
                    check.update(self._chunk(entry, index))
                problem = check.problem()
                if problem is not None:
                    self._reject_whole_file(entry, keys, problem)
            finally:
                with self._lock:
                    left = self._reverifying.pop(file_id) - 1
                    if left:
                        self._reverifying[file_id] = left
        with self._lock:
            self._failed_files.pop(file_identity(entry), None)

    def _chunk_for_check(self, entry: ArtifactFileData, index: int) -> bytes | None:
        """A chunk for the ordered whole-file check: from memory, else from the disk cache
        (not kept in memory: a check must not push out the chunks readers want)."""
        key = self._key(entry, index)
        with self._lock:
            data = self._memory.get(key)
        if data is None and self.cache.contains(key):
            data = self.cache.get(key)
        return data

    def _reject_checked_file(self, entry: ArtifactFileData, problem: str) -> None:
        """For the ordered whole-file check: drop a file that failed it, count and log it
        (unless a read is checking it anew: that read's error says it)."""
        keys = self._keys(entry)
        with self._lock:
            reported_by_a_read = file_identity(entry) in self._reverifying
        try:
            self._reject_whole_file(entry, keys, problem)
        except ReadError as exc:
            if not reported_by_a_read:
                self.cache.record_error()
                log.error("%s", exc)


T = TypeVar("T")

# How a fetch refused at once by an open breaker ends its message (after the endpoint).
NOT_RETRIED = "keeps failing to take connections: not retried until a read from it succeeds"


def _naming_the_file(entry: ArtifactFileData, exc: ArtifactfsError) -> str:
    """The message of a failed read, starting with the file's source: the mount logs it as the
    reason for EIO, also when a remembered failure answers the kernel's retry (missing
    credentials, for one, say which variable to set but not for what)."""
    return _starting_with(entry.source_url, str(exc))


def _starting_with(source_url: str, message: str) -> str:
    return message if message.startswith(source_url) else f"{source_url}: {message}"


def _with_retries(
    fetch: Callable[[], T], deadline: float, url: str, breaker: ConnectBreaker | None = None
) -> T:
    """Retry transient failures with exponential back-off until `deadline` seconds pass.

    All attempts run in one `RequestDeadline`: a request still under way when it passes is cut
    off (a stalled or trickling server never trips a socket timeout), so this returns or
    raises little more than `deadline` seconds after it started.

    With a `breaker`: a fetch that gives up having failed only to connect (its last attempt,
    cut short by the deadline, aside: a connect timeout clipped to the time left ends as a
    cut-off) opens it for the URL's bucket; while it is open, an attempt that cannot connect
    is not retried; a fetch that succeeds closes it (`connect_breaker`)."""
    key = breaker_key(url)
    attempt = 0
    unreached: ConnectFailedError | None = None  # the latest failure to connect
    answered = False  # whether some attempt failed otherwise, before the deadline
    with RequestDeadline(deadline, url) as scope:
        while True:
            try:
                result = fetch()
            except ConnectFailedError as exc:
                if breaker is not None and breaker.is_open(key):
                    raise ReadError(f"{exc} ({exc.endpoint} {NOT_RETRIED})") from None
                problem, unreached = str(exc), exc
            except TransientSourceError as exc:
                problem, answered = str(exc), answered or not scope.expired
            except ArtifactfsError:
                raise
            except Exception as exc:
                if not scope.expired:
                    raise
                # An HTTP client's own error, from a connection cut off at the deadline.
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if breaker is not None:
                    breaker.reset(key)
                return result
            attempt += 1
            delay = min(RETRY_BASE_DELAY * 2**attempt, 5.0)
            if scope.expired or delay >= scope.remaining():
                if breaker is not None and unreached is not None and not answered:
                    breaker.trip(key, unreached.endpoint)
                if scope.expired:
                    raise ReadError(
                        f"{scope.message()}, after {attempt} attempt(s); last: {problem}"
                    ) from None
                raise ReadError(f"{url}: giving up after {attempt} attempt(s): {problem}") from None
            log.info("%s: attempt %d failed, retrying in %.1fs: %s", url, attempt, delay, problem)
            time.sleep(delay)
