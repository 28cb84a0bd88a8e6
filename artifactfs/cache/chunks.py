"""The on-disk chunk cache: content-addressed chunk files under a hard byte limit, LRU evicted.

Layout of a cache directory (format version in `FORMAT`):

    FORMAT                   "artifactfs-cache 1"
    chunks/ab/abcdef...      one file per chunk, named by a SHA-256 of its content identity
    tmp/                     chunks being written; published by os.replace, never read

A chunk's identity is (entry type, tracked file hash, size, chunk size, chunk index): the same
file in two runs is cached once, and a chunk of other bytes can never be found under it. Each
chunk file starts with a header (magic, version, payload length, SHA-256 of the payload, the
key) that is checked on every read, so a torn or corrupted file is detected, dropped and
fetched again rather than served. The LRU index (cachetools) is rebuilt from the directory on
start, oldest-used first by mtime, which a hit refreshes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from artifactfs.errors import ArtifactfsError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FORMAT_TEXT = f"artifactfs-cache {FORMAT_VERSION}\n"
MAGIC = b"AFSCHUNK"
# magic, format version, payload length, payload SHA-256, key SHA-256
_HEADER = struct.Struct(">8sIQ32s32s")
HEADER_SIZE = _HEADER.size
DEFAULT_FREE_FLOOR = 256 * 1024 * 1024


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
        self._prepare_directory()
        self._index = _EvictingLRU(limit_bytes, self)
        self._rebuild_index()

    # -- layout -----------------------------------------------------------------------------

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        format_file = self.directory / "FORMAT"
        if format_file.exists():
            found = format_file.read_text().strip()
            if found != FORMAT_TEXT.strip():
                raise ArtifactfsError(
                    f"cache {self.directory} has format {found!r}, this artifactfs uses "
                    f"{FORMAT_TEXT.strip()!r}: remove that directory or pick another --cache-dir"
                )
        else:
            format_file.write_text(FORMAT_TEXT)
        (self.directory / "chunks").mkdir(exist_ok=True, mode=0o700)
        tmp = self.directory / "tmp"
        # Whatever is in tmp/ was being written when a process died: never complete.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)

    def _path(self, key: bytes) -> Path:
        name = key.hex()
        return self.directory / "chunks" / name[:2] / name

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
                self._index[key] = size
            self._refresh_stats()

    def _refresh_stats(self) -> None:
        self.stats.cache_bytes = int(self._index.currsize)
        self.stats.chunks = len(self._index)

    def _remove_file(self, key: bytes) -> None:
        self._path(key).unlink(missing_ok=True)

    # -- reading and writing ----------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        """The chunk's payload, or None if absent or damaged (then it is dropped)."""
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            with self._lock:
                # A put may have published it since: only forget a file that is still missing
                # (puts publish before they index, and index under this lock).
                if not path.exists():
                    self._index.pop(key, None)
                self.stats.misses += 1
                self._refresh_stats()
            return None
        payload = _unpack(raw, key)
        with self._lock:
            if payload is None:
                self.stats.errors += 1
                self.stats.misses += 1
                self._index.pop(key, None)
                self._refresh_stats()
            else:
                self.stats.hits += 1
                if key in self._index:
                    self._index[key] = len(raw)  # marks it most recently used
                # else: evicted while we read it; its file is gone, so do not count it again
        if payload is None:
            log.error("cache chunk %s is damaged: dropped, will fetch again", path)
            self._remove_file(key)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # keeps LRU order across restarts
        return payload

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
        size = HEADER_SIZE + len(payload)
        if size > self.limit:
            return False
        with self._lock:
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
            written = self._room_on_disk(size) and self._write(key, payload)
        finally:
            # One locked step from "reserved" to "indexed": never a moment uncounted.
            with self._lock:
                self._reserved -= size
                if written:
                    self._index[key] = size
                    while self._index.currsize + self._reserved > self.limit:
                        self._index.popitem()
                self._refresh_stats()
        return written

    def _write(self, key: bytes, payload: bytes) -> bool:
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest(), key
        )
        path = self._path(key)
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            fd, temp = tempfile.mkstemp(dir=self.directory / "tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(header)
                    out.write(payload)
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
        except OSError as exc:
            log.warning("cannot write cache chunk %s: %s", path, exc)
            return False
        return True

    def _room_on_disk(self, size: int) -> bool:
        """Keep `free_floor` bytes free on the cache's filesystem, evicting to get there."""
        while True:
            try:
                free = shutil.disk_usage(self.directory).free
            except OSError:
                return False
            if free - size >= self.free_floor:
                return True
            with self._lock:
                if not self._index:
                    return False
                self._index.popitem()
                self._refresh_stats()

    def record_hit(self) -> None:
        """A hit served from a reader's memory copy of a chunk."""
        with self._lock:
            self.stats.hits += 1

    def record_fetch(self, nbytes: int) -> None:
        with self._lock:
            self.stats.fetched_bytes += nbytes

    def record_error(self) -> None:
        with self._lock:
            self.stats.errors += 1

    def drop(self, key: bytes) -> None:
        with self._lock:
            self._index.pop(key, None)
            self._refresh_stats()
        self._remove_file(key)

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
        """Re-check every chunk file; drop the bad ones. Returns (checked, dropped)."""
        checked = dropped = 0
        for path in list(self._iter_files()):
            checked += 1
            try:
                key = bytes.fromhex(path.name)
                raw = path.read_bytes()
            except (OSError, ValueError):
                key, raw = b"", b""
            if len(key) != 32 or _unpack(raw, key) is None:
                dropped += 1
                log.warning("cache fsck: dropping damaged chunk %s", path)
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


def _unpack(raw: bytes, key: bytes) -> bytes | None:
    if len(raw) < HEADER_SIZE:
        return None
    magic, version, length, digest, stored_key = _HEADER.unpack_from(raw)
    if magic != MAGIC or version != FORMAT_VERSION or stored_key != key:
        return None
    payload = raw[HEADER_SIZE:]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        return None
    return payload
