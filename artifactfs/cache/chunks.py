"""The on-disk chunk cache: content-addressed chunk files under a hard byte limit, LRU evicted.

Layout of a cache directory (format version in `FORMAT`):

    FORMAT                   "artifactfs-cache 2"
    LOCK                     held (flock) by the one process using the cache; holds its pid
    chunks/ab/abcdef...      one file per chunk, named by a SHA-256 of its content identity
    tmp/                     chunks being written; published by os.replace, never read

A chunk's identity is (entry type, tracked file hash, size, chunk size, chunk index): the same
file in two runs is cached once, and a chunk of other bytes can never be found under it.

Each chunk file (format 2) is a header followed by the payload:

    magic "AFSCHUNK", version 2, payload length, block size, key    (">8sIQI32s", 56 bytes)
    one CRC32C per BLOCK (1 MiB) of the payload, the last one short  (4 bytes each)
    a CRC32C of all the header bytes before it                       (4 bytes)
    the payload

The header's length follows from the payload length (`header_size`). Every read checks the
header (its own CRC32C, magic, version, key, and that the file is exactly as long as it says),
then only the blocks it returns: `read(key, offset, length)` of 4 KiB touches one 1 MiB block,
not the whole chunk. Format 1 stored one SHA-256 of the whole payload, so every read from disk
read and hashed the whole chunk (8 MiB by default) whatever the kernel asked for; that capped
re-reads after a remount and made random small reads slow. CRC32C (hardware-assisted through
`crc32c`) detects torn, truncated and bit-flipped files, which is all a cache needs: the
bytes were verified against the source when fetched, and a chunk that fails a check is dropped
and fetched again rather than served. A format 1 directory is upgraded by clearing its chunks
(a cache is disposable); any other format is refused.

Chunks of DIRECT_WRITE_BYTES and more are written with O_DIRECT, from a few reused aligned
buffers: a buffered write would put every fetched byte into the page cache a second time (the
mount's own page cache already holds them for readers), and new page-cache memory is costly
where freed memory goes back to a VM's host: measured there, a buffered write of 1 GiB into a
fresh page cache ran at ~310 MB/s, a direct one at ~1,100, and a cold 1 GiB read through the
mount went from ~370 to ~490 MB/s with the daemon's CPU from ~3.0 to ~1.6 s. Smaller chunks
(small files) stay buffered, and so does everything on a file system without O_DIRECT (tmpfs
before Linux 6.6).

The LRU index (cachetools) is rebuilt from the directory on start, oldest-used first by mtime,
which a hit refreshes; chunks beyond the byte limit (a cache reopened smaller) are evicted then.

One process uses a cache directory at a time: each keeps its index in memory, so two (a mount
and a download, two mounts, both on the default directory) would each keep within the limit
while the directory held their sum, and each start empties tmp/ under the other's writes. A
`ChunkCache` holds an exclusive `flock` on LOCK until `close()` (or its process ends, whatever
the way); a second one fails with `CacheBusyError`, naming the holder's pid. `cache_usage`
reads a directory's size without taking it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
from cachetools import LRUCache

from artifactfs.errors import ArtifactfsError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
FORMAT_TEXT = f"artifactfs-cache {FORMAT_VERSION}\n"
# Directories in these formats are emptied and reused; any other format is refused.
UPGRADABLE_FORMATS = ("artifactfs-cache 1",)
MAGIC = b"AFSCHUNK"
BLOCK = 1024 * 1024  # bytes covered by one CRC32C: the least a read from disk checks
# magic, format version, payload length, block size, key; then the block CRCs and header CRC
_PREFIX = struct.Struct(">8sIQI32s")
_CRC = struct.Struct(">I")
# One pread gets the whole header of any chunk up to ~1,000 blocks (1 GiB).
_HEADER_READ = 4096
DEFAULT_FREE_FLOOR = 256 * 1024 * 1024
# Chunks this large are written with O_DIRECT (see the module docstring), from up to
# DIRECT_BUFFERS reused aligned buffers; a write that finds them all lent is buffered.
DIRECT_WRITE_BYTES = 1024 * 1024
DIRECT_BUFFERS = 4
DIRECT_ALIGN = 4096  # what O_DIRECT asks of buffers, offsets and lengths on common disks
LOCK_NAME = "LOCK"
CLOSE_WAIT = 30.0  # seconds `close` waits for writes under way (a stuck disk: let go anyway)


class CacheUnusableError(ArtifactfsError):
    """The cache directory cannot be used by this process; `reason` says why, without the
    advice (which names mount's options)."""

    def __init__(self, directory: Path, reason: str, advice: str) -> None:
        super().__init__(f"{reason}: {advice}")
        self.directory = directory
        self.reason = reason


class CacheBusyError(CacheUnusableError):
    """Another process uses the cache directory."""

    def __init__(self, directory: Path, holder: str, advice: str) -> None:
        super().__init__(
            directory,
            f"cache {directory} is in use by another artifactfs process (pid {holder})",
            advice,
        )
        self.holder = holder


class CacheFormatError(CacheUnusableError):
    """The cache directory holds a cache of a format this artifactfs does not know (a newer
    one's): left as it is."""

    def __init__(self, directory: Path, found: str) -> None:
        super().__init__(
            directory,
            f"cache {directory} has format {found!r}, which this artifactfs cannot use",
            f"it uses {FORMAT_TEXT.strip()!r}; remove that directory or pick another --cache-dir",
        )
        self.found = found


def block_count(length: int) -> int:
    """How many BLOCKs (the last one short) a payload of `length` bytes has."""
    return -(-length // BLOCK)


def header_size(length: int) -> int:
    """The header's size in bytes, for a payload of `length` bytes."""
    return _PREFIX.size + _CRC.size * block_count(length) + _CRC.size


def pack_header(key: bytes, payload: bytes | memoryview) -> bytes:
    """The format 2 header of a chunk file holding `payload` under `key`."""
    view = memoryview(payload)  # each block checked in place, not copied out
    crcs = [crc32c.crc32c(view[offset : offset + BLOCK]) for offset in range(0, len(view), BLOCK)]
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(payload), BLOCK, key)
    head += struct.pack(f">{len(crcs)}I", *crcs)
    return head + _CRC.pack(crc32c.crc32c(head))


def unpack_chunk(raw: bytes, key: bytes) -> bytes | None:
    """The payload of a whole chunk file's bytes, every block checked; None if damaged.

    For tools and tests that inspect a cache directory; the cache itself reads by blocks.
    """
    try:
        return _read_checked(lambda size, offset: raw[offset : offset + size], len(raw), key, 0)
    except _Damaged:
        return None


def chunk_key(
    entry_type: str, file_hash: str, size: int | None, chunk_size: int, index: int
) -> bytes:
    """The content identity of one chunk, as 32 bytes."""
    identity = f"{entry_type}\0{file_hash}\0{size}\0{chunk_size}\0{index}"
    return hashlib.sha256(identity.encode("utf-8")).digest()


@dataclass
class CacheStats:
    cache_bytes: int = 0
    cache_limit: int = 0
    chunks: int = 0
    hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0
    errors: int = 0


class _EvictingLRU(LRUCache[bytes, int]):
    """key -> bytes on disk; evicting an item deletes its file."""

    def __init__(self, limit: int, cache: ChunkCache) -> None:
        super().__init__(maxsize=limit, getsizeof=lambda size: size)
        self._owner = cache

    def popitem(self) -> tuple[bytes, int]:
        key, size = super().popitem()
        self._owner._remove_file(key)
        return key, size


class ChunkCache:
    def __init__(
        self, directory: Path, limit_bytes: int, free_floor_bytes: int = DEFAULT_FREE_FLOOR
    ) -> None:
        if limit_bytes <= 0:
            raise ArtifactfsError("the cache size must be positive")
        self.directory = directory
        self.limit = limit_bytes
        self.free_floor = free_floor_bytes
        self.stats = CacheStats(cache_limit=limit_bytes)
        self._lock = threading.Lock()
        self._reserved = 0  # bytes of chunks being written, counted against the limit
        self._no_writes = threading.Condition(self._lock)  # notified as writes end
        self._closed = False
        self._chunks_dir = str(directory / "chunks")
        self._tmp_dir = str(directory / "tmp")
        self._temp_names = itertools.count()
        self._direct_ok = True  # until the file system refuses O_DIRECT
        self._direct_buffers = _DirectBuffers(DIRECT_BUFFERS)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = _take_directory(directory)
        except OSError as exc:
            raise _unusable(directory, exc) from exc
        # Released by close(), when this object is collected, or when the process ends.
        self._release = weakref.finalize(self, os.close, lock)
        try:
            self._prepare_directory()
            self._index = _EvictingLRU(limit_bytes, self)
            self._rebuild_index()
        except OSError as exc:
            self.close()
            raise _unusable(directory, exc) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let another process use the directory. Writes under way end first (each is one
        local file: quick), so that no chunk appears in it after; later ones are refused,
        and reads find nothing (threads of a closed reader may still be at work)."""
        with self._lock:
            self._closed = True
            self._no_writes.wait_for(lambda: self._reserved == 0, timeout=CLOSE_WAIT)
        self._release()

    # -- layout -----------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        format_file = self.directory / "FORMAT"
        found = format_file.read_text().strip() if format_file.exists() else None
        if found in UPGRADABLE_FORMATS:
            # A cache is disposable: empty it rather than convert it. FORMAT changes last, so
            # a crash half-way clears again on the next start.
            log.warning(
                "cache %s has format %r: clearing its chunks to use %r",
                self.directory,
                found,
                FORMAT_TEXT.strip(),
            )
            shutil.rmtree(self.directory / "chunks", ignore_errors=True)
        elif found is not None and found != FORMAT_TEXT.strip():
            raise CacheFormatError(self.directory, found)
        chunks = self.directory / "chunks"
        chunks.mkdir(exist_ok=True, mode=0o700)
        # All 256 fan-out directories up front: a put then never needs a mkdir.
        for prefix in range(256):
            (chunks / f"{prefix:02x}").mkdir(exist_ok=True, mode=0o700)
        tmp = self.directory / "tmp"
        # Whatever is in tmp/ was being written when a process died: never complete.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        if found != FORMAT_TEXT.strip():
            fd, temp = tempfile.mkstemp(dir=tmp)
            with os.fdopen(fd, "w") as out:
                out.write(FORMAT_TEXT)
            os.replace(temp, format_file)

    def _path(self, key: bytes) -> str:
        # A string, not a Path: this runs for every chunk read and written.
        name = key.hex()
        return f"{self._chunks_dir}/{name[:2]}/{name}"

    def _iter_files(self) -> Iterator[Path]:
        chunks = self.directory / "chunks"
        for sub in chunks.iterdir():
            if sub.is_dir():
                yield from sub.iterdir()

    def _rebuild_index(self) -> None:
        found = []
        for path in self._iter_files():
            try:
                info = path.stat()
                key = bytes.fromhex(path.name)
            except (OSError, ValueError):
                continue
            found.append((info.st_mtime_ns, key, info.st_size))
        found.sort()  # least recently used first, so they are evicted first
        with self._lock:
            for _mtime, key, size in found:
                if size > self.limit:  # the cache was reopened smaller than this chunk
                    self._remove_file(key)
                    continue
                self._index[key] = size  # evicts (deletes) the oldest beyond the limit
            self._refresh_stats()

    def _refresh_stats(self) -> None:
        self.stats.cache_bytes = int(self._index.currsize)
        self.stats.chunks = len(self._index)

    def _remove_file(self, key: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    # -- reading and writing ----------------------------------------------------------------

    def read(self, key: bytes, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) of the chunk's payload, clipped to its end; None if
        the chunk is absent or damaged (then it is dropped).

        Only the header and the BLOCKs that cover the range are read and checked.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        return self._read(key, offset, offset + length)

    def get(self, key: bytes) -> bytes | None:
        """The chunk's whole payload, every block checked; None if absent or damaged (then it
        is dropped)."""
        return self._read(key, 0, None)

    def _read(self, key: bytes, start: int, end: int | None) -> bytes | None:
        if self._closed:
            return None
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                # A put may have published it since: only forget a file that is still missing
                # (puts publish before they index, and index under this lock).
                if not os.path.exists(path):
                    self._index.pop(key, None)
                self.stats.misses += 1
                self._refresh_stats()
            return None
        damage = ""
        try:
            file_size = os.fstat(fd).st_size
            try:
                data = _read_checked(
                    lambda size, at: _pread_full(fd, size, at), file_size, key, start, end
                )
            except _Damaged as exc:
                data, damage = None, str(exc)
            with self._lock:
                if data is None:
                    self.stats.errors += 1
                    self.stats.misses += 1
                    self._index.pop(key, None)
                    self._remove_file(key)  # under the lock: see drop()
                    self._refresh_stats()
                else:
                    self.stats.hits += 1
                    if key in self._index:
                        self._index[key] = file_size  # marks it most recently used
                    # else: evicted while we read it; its file is gone, so do not count it again
            if data is not None:
                with contextlib.suppress(OSError):
                    os.utime(fd)  # keeps LRU order across restarts
        finally:
            os.close(fd)
        if data is None:
            log.error("cache chunk %s is damaged (%s): dropped, will fetch again", path, damage)
        return data

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def touch(self, key: bytes) -> bool:
        """Mark a chunk most recently used (a hit served from memory); False if not on disk."""
        with self._lock:
            size = self._index.get(key)  # a get moves it to the recent end of the LRU
            return size is not None

    def put(self, key: bytes, payload: bytes) -> bool:
        """Store a chunk atomically; False when it cannot be kept (too big, disk too full)."""
        size = header_size(len(payload)) + len(payload)
        if size > self.limit:
            return False
        with self._lock:
            if self._closed:
                return False
            if key in self._index:
                return True  # content-addressed: the same key holds the same bytes
            # Reserve the bytes before writing, evicting to make room, so that the directory
            # (temporary files included) never holds more than the limit, whatever the threads.
            while self._index and self._index.currsize + self._reserved + size > self.limit:
                self._index.popitem()
            if self._index.currsize + self._reserved + size > self.limit:
                return False  # the budget is held by writes in flight
            self._reserved += size
            self._refresh_stats()
        written = False
        try:
            written = self._room_on_disk() and self._write(key, payload)
        finally:
            # One locked step from "reserved" to "indexed": never a moment uncounted.
            with self._lock:
                self._reserved -= size
                self._no_writes.notify_all()
                if written:
                    self._index[key] = size
                    while self._index.currsize + self._reserved > self.limit:
                        self._index.popitem()
                self._refresh_stats()
        return written

    def _write(self, key: bytes, payload: bytes) -> bool:
        header = pack_header(key, payload)
        path = self._path(key)
        # Unique in this process (tmp/ is emptied on start, and one process uses a cache).
        temp = f"{self._tmp_dir}/{key.hex()}.{os.getpid()}.{next(self._temp_names)}"
        try:
            try:
                self._write_file(temp, header, payload)
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
                raise
        except OSError as exc:
            log.warning("cannot write cache chunk %s: %s", path, exc)
            return False
        return True

    def _write_file(self, temp: str, header: bytes, payload: bytes) -> None:
        """Create `temp` holding header and payload: a large payload with O_DIRECT where the
        file system allows it and a buffer is free, anything else buffered."""
        size = len(header) + len(payload)
        direct = len(payload) >= DIRECT_WRITE_BYTES and self._direct_ok
        with (
            self._direct_buffers.borrow(size) if direct else contextlib.nullcontext(None)
        ) as buffer:
            fd, direct = self._create(temp, buffer is not None)
            try:
                if direct:
                    assert buffer is not None
                    _write_direct(fd, buffer, header, payload)
                else:
                    _write_all(fd, [header, payload])
            finally:
                os.close(fd)

    def _create(self, temp: str, direct: bool) -> tuple[int, bool]:
        """A new temporary chunk file, and whether it is open for O_DIRECT writes: if
        `direct` and the file system allows them (else, then and from then on, a buffered one)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if direct and self._direct_ok:
            try:
                return os.open(temp, flags | os.O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_ok = False
                # Some file systems (ramfs) create the file before refusing O_DIRECT.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        return os.open(temp, flags, 0o600), False

    def _room_on_disk(self) -> bool:
        """Keep `free_floor` bytes free on the cache's filesystem, evicting to get there. A
        file system that reports no size at all (ramfs, some network and FUSE ones) has no
        floor to keep: the byte limit and a failed write (ENOSPC) still bound the cache.

        The bytes reserved count every write in flight, this one's included: each of them
        passing alone would take the disk below the floor together (a part of them already
        written is counted twice, which errs on the safe side).
        """
        while True:
            try:
                usage = os.statvfs(self.directory)
            except OSError:
                return False
            if usage.f_blocks == 0:
                return True
            with self._lock:
                if usage.f_bavail * usage.f_frsize - self._reserved >= self.free_floor:
                    return True
                if not self._index:
                    return False
                self._index.popitem()
                self._refresh_stats()

    def record_hit(self) -> None:
        """A hit served from a reader's memory copy of a chunk."""
        with self._lock:
            self.stats.hits += 1

    def record_miss(self) -> None:
        """A chunk looked for and known absent, without opening its file."""
        with self._lock:
            self.stats.misses += 1

    def record_fetch(self, nbytes: int) -> None:
        with self._lock:
            self.stats.fetched_bytes += nbytes

    def record_error(self) -> None:
        with self._lock:
            self.stats.errors += 1

    def drop(self, key: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            # Under the lock, as eviction does: once the bytes are uncounted a put may take
            # them, so the file must be gone by then.
            self._index.pop(key, None)
            self._remove_file(key)
            self._refresh_stats()

    # -- maintenance ------------------------------------------------------------------------

    def clear(self) -> int:
        """Remove every chunk; returns how many bytes were freed."""
        with self._lock:
            freed = int(self._index.currsize)
            keys = list(self._index.keys())
            self._index.clear()
            self._refresh_stats()
        for key in keys:
            self._remove_file(key)
        for path in list(self._iter_files()):  # strays not in the index
            path.unlink(missing_ok=True)
        return freed

    def fsck(self) -> tuple[int, int]:
        """Re-check every chunk file, every block; drop the bad ones. Returns (checked, dropped)."""
        checked = dropped = 0
        for path in list(self._iter_files()):
            checked += 1
            try:
                key = bytes.fromhex(path.name)
            except ValueError:
                key = b""
            try:
                if len(key) != 32:
                    raise _Damaged("not named by a chunk key")
                _check_file(path, key)
                continue
            except (OSError, _Damaged) as exc:
                reason = str(exc)
            dropped += 1
            log.warning("cache fsck: dropping damaged chunk %s (%s)", path, reason)
            path.unlink(missing_ok=True)
            with self._lock:
                self._index.pop(key, None)
        with self._lock:
            self._refresh_stats()
        return checked, dropped

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            self._refresh_stats()
            return dict(vars(self.stats))


class _Damaged(Exception):
    """A chunk file that must not be served; the message says why."""


class _DirectBuffers:
    """A few page-aligned buffers (anonymous maps) for O_DIRECT writes, lent one per write and
    reused: new memory is the very cost that direct writes avoid. None when all are lent."""

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []
        self._left = count  # buffers that may still be made

    @contextlib.contextmanager
    def borrow(self, size: int) -> Iterator[mmap.mmap | None]:
        size = _aligned(size)
        with self._lock:
            buffer = self._free.pop() if self._free else None
            make = buffer is None and self._left > 0
            if make:
                self._left -= 1
        if make or (buffer is not None and len(buffer) < size):
            if buffer is not None:
                buffer.close()
            buffer = mmap.mmap(-1, size)
        try:
            yield buffer
        finally:
            if buffer is not None:
                with self._lock:
                    self._free.append(buffer)


def _aligned(size: int) -> int:
    """`size` rounded up to a multiple of DIRECT_ALIGN."""
    return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN


def _write_direct(fd: int, buffer: mmap.mmap, header: bytes, payload: bytes) -> None:
    """Header and payload in one O_DIRECT write from `buffer` (aligned, its length a multiple
    of DIRECT_ALIGN: the file is written padded, then cut to its length)."""
    total = len(header) + len(payload)
    padded = _aligned(total)
    buffer[: len(header)] = header
    buffer[len(header) : total] = payload
    with memoryview(buffer) as whole, whole[:padded] as view:
        written = os.write(fd, view)
    if written != padded:
        raise OSError(errno.EIO, f"short direct write: {written} of {padded} bytes")
    os.ftruncate(fd, total)


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write every byte of `parts` in order (writev, resumed after a short write)."""
    views = [memoryview(part) for part in parts if part]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _pread_full(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes at `offset`: fewer only at the end of the file."""
    data = os.pread(fd, size, offset)
    # A regular file reads short only at its end, or past Linux's ~2 GiB cap on one read.
    while 0 < len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _read_checked(
    pread: Callable[[int, int], bytes],
    file_size: int,
    key: bytes,
    start: int,
    end: int | None = None,
) -> bytes:
    """Payload bytes [start, end) (end None: to the payload's end, clipped to it) of the chunk
    file that `pread(size, offset)` reads, after checking its header and every block the range
    touches. Raises _Damaged."""
    head = pread(_HEADER_READ, 0)
    if len(head) < _PREFIX.size:
        raise _Damaged(f"{file_size} bytes, shorter than a header")
    magic, version, length, block, stored_key = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise _Damaged("not a chunk file")
    if version != FORMAT_VERSION:
        raise _Damaged(f"chunk format {version}, not {FORMAT_VERSION}")
    size = header_size(length)
    if file_size != size + length:
        raise _Damaged(f"{file_size} bytes, its header says {size + length}")
    if len(head) < size:
        head += pread(size - len(head), len(head))
        if len(head) < size:
            raise _Damaged("header cut short")  # the file shrank under us
    (header_crc,) = _CRC.unpack_from(head, size - _CRC.size)
    if crc32c.crc32c(memoryview(head)[: size - _CRC.size]) != header_crc:
        raise _Damaged("header checksum mismatch")
    if block != BLOCK:
        raise _Damaged(f"blocks of {block} bytes, not {BLOCK}")
    if stored_key != key:
        raise _Damaged("its header names another key")
    stop = length if end is None else min(end, length)
    if start >= stop:
        return b""
    first, last = start // BLOCK, (stop - 1) // BLOCK
    crcs = struct.unpack_from(f">{last - first + 1}I", head, _PREFIX.size + _CRC.size * first)
    # One read of every block the range touches, each block then checked in place (a view:
    # `crc32c` takes any buffer). For a whole 8 MiB chunk in the page cache, a read per block
    # joined afterwards ran ~7x slower (the join's fresh allocation), and checking copies of
    # the blocks (google-crc32c, used before, takes bytes only) 1.1-1.8x slower than views.
    begin, stop_block = first * BLOCK, min(length, (last + 1) * BLOCK)
    whole = pread(stop_block - begin, size + begin)
    if len(whole) != stop_block - begin:
        raise _Damaged(f"block {first + len(whole) // BLOCK} cut short")
    view = memoryview(whole)
    for index, crc in enumerate(crcs, first):
        at = (index - first) * BLOCK
        if crc32c.crc32c(view[at : at + BLOCK]) != crc:
            raise _Damaged(f"block {index} checksum mismatch")
    low, high = start - begin, stop - begin
    return whole if low == 0 and high == len(whole) else whole[low:high]


def _check_file(path: Path, key: bytes) -> None:
    """Check a chunk file's header and every block; raises _Damaged or OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        _read_checked(lambda size, at: _pread_full(fd, size, at), file_size, key, 0)
    finally:
        os.close(fd)


def _take_directory(directory: Path) -> int:
    """A descriptor holding the cache directory's lock (see the module docstring)."""
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise CacheBusyError(
            directory, holder, "stop it, or give this one another --cache-dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise ArtifactfsError(f"cannot lock cache {directory}: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        os.close(fd)  # and the lock with it
        raise
    return fd


def _unusable(directory: Path, exc: OSError) -> ArtifactfsError:
    return ArtifactfsError(f"cannot use cache directory {directory}: {exc.strerror or exc}")


def cache_usage(directory: Path) -> tuple[int, int]:
    """(chunks, bytes) in a cache directory, read without taking it (see `ChunkCache`)."""
    chunks = total = 0
    try:
        with os.scandir(directory / "chunks") as subdirectories:
            for sub in subdirectories:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError), os.scandir(sub.path) as items:
                    for item in items:
                        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                            total += item.stat(follow_symlinks=False).st_size
                            chunks += 1
    except FileNotFoundError:
        return 0, 0
    except OSError as exc:
        raise _unusable(directory, exc) from exc
    return chunks, total
