"""A remote file of several chunks, up to `VERIFY_BEFORE_SERVING_BYTES`, is checked whole before
any of its bytes is served (no FUSE, no servers: an in-memory S3 source that can lie).

The source answers with other bytes under the tracked identity when told to, as a server that
ignores `If-Match` would after the object was replaced: only the whole-file MD5 can tell.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from artifactfs import sources as sources_module
from artifactfs.cache import ChunkCache, chunk_key
from artifactfs.entries import ArtifactFileData
from artifactfs.reader import Reader, ReadError
from artifactfs.sources.base import Source
from tests.support.concurrent import run_at_once

CHUNK = 64 * 1024


class LyingS3(Source):
    """S3 entries served from a dict; `lie_at` chunk offsets come back with every byte inverted."""

    type_name = "S3"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.lie_at: set[int] = set()
        self.reads: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def list_location(self, location: str, on_progress: Any = None) -> Iterator[ArtifactFileData]:
        raise NotImplementedError

    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        with self._lock:
            self.reads.append((entry.source_url, offset))
        data = self.objects[entry.source_url]
        piece = data[offset : len(data) if length is None else offset + length]
        if offset in self.lie_at:
            piece = bytes(b ^ 0xFF for b in piece)
        return iter([piece])

    def check(self, entry: ArtifactFileData) -> None:
        pass

    def fetched(self, entry: ArtifactFileData) -> list[int]:
        """The chunk offsets of `entry` read so far, in order."""
        return [offset for url, offset in self.reads if url == entry.source_url]


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch) -> LyingS3:
    found = LyingS3()
    monkeypatch.setitem(sources_module._sources, "S3", found)
    return found


@pytest.fixture
def cache(tmp_path: Path) -> ChunkCache:
    return ChunkCache(tmp_path / "cache", 64 * 1024 * 1024, free_floor_bytes=0)


@pytest.fixture
def readers(cache: ChunkCache) -> Iterator[list[Reader]]:
    made: list[Reader] = []
    yield made
    for reader in made:
        reader.close()


def new_reader(readers: list[Reader], cache: ChunkCache, **options: Any) -> Reader:
    options.setdefault("chunk_size", CHUNK)
    options.setdefault("deadline", 5.0)
    # Whole chunks only: which fetches happen is what these tests look at.
    options.setdefault("direct_reads", False)
    reader = Reader(cache, **options)
    readers.append(reader)
    return reader


def put(source: LyingS3, name: str, size: int, seed: int = 1) -> tuple[ArtifactFileData, bytes]:
    body = random.Random(seed).randbytes(size)
    url = f"s3://bucket/{name}"
    source.objects[url] = body
    entry = ArtifactFileData(
        name, hashlib.md5(body).hexdigest(), "S3", size, {"file_path": url, "location": url}
    )
    return entry, body


def keys_of(entry: ArtifactFileData) -> list[bytes]:
    count = -(-(entry.size or 0) // CHUNK)
    return [chunk_key(entry.type, entry.file_hash, entry.size, CHUNK, i) for i in range(count)]


def test_first_read_fetches_every_chunk_then_later_reads_fetch_nothing(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    entry, body = put(source, "three.bin", 3 * CHUNK - 100)
    reader = new_reader(readers, cache, readahead_chunks=0)
    assert reader.read(entry, 10, 100) == body[10:110]
    assert sorted(source.fetched(entry)) == [0, CHUNK, 2 * CHUNK]  # one fetch per chunk
    assert all(cache.contains(key) for key in keys_of(entry))
    for offset, length in [(0, len(body)), (CHUNK - 5, 10), (2 * CHUNK, 50)]:
        assert reader.read(entry, offset, length) == body[offset : offset + length]
    assert len(source.fetched(entry)) == 3


def test_a_wrong_chunk_fails_the_first_read_and_nothing_is_served_or_kept(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    entry, _ = put(source, "liar.bin", 3 * CHUNK + 7)
    source.lie_at = {2 * CHUNK}
    reader = new_reader(readers, cache)
    with pytest.raises(ReadError) as info:
        reader.read(entry, 0, 100)  # chunk 0 is right: still not served before the check
    assert "s3://bucket/liar.bin" in str(info.value)
    assert "whole-file check failed" in str(info.value)
    assert not any(cache.contains(key) for key in keys_of(entry))
    assert reader.cached_bytes(entry) == 0
    # The kernel's immediate retry, or any read soon after: EIO without fetching it all again.
    fetches = len(source.fetched(entry))
    for offset in (0, CHUNK, 3 * CHUNK):
        with pytest.raises(ReadError):
            reader.read(entry, offset, 10)
    assert len(source.fetched(entry)) == fetches


@pytest.mark.parametrize("offset", [0, CHUNK + 5, 2 * CHUNK + 5])
def test_direct_reads_never_bypass_the_check_before_serving(
    source: LyingS3, cache: ChunkCache, readers: list[Reader], offset: int
) -> None:
    """A first or random read may be served by its own ranged request, but never for a file
    that is checked whole before serving: a lie anywhere in it fails every read."""
    entry, _ = put(source, "liar-direct.bin", 3 * CHUNK + 7)
    source.lie_at = {2 * CHUNK}
    reader = new_reader(readers, cache, direct_reads=True)
    with pytest.raises(ReadError) as info:
        reader.read(entry, offset, 100)
    assert "whole-file check failed" in str(info.value)
    assert sorted(source.fetched(entry)) == [i * CHUNK for i in range(4)]  # whole chunks only


def test_a_failed_file_is_served_once_fetched_anew_and_right(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    entry, body = put(source, "flaky.bin", 2 * CHUNK + 1)
    source.lie_at = {CHUNK}
    reader = new_reader(readers, cache, failure_memory=0.05)  # instead of 5 s
    with pytest.raises(ReadError):
        reader.read(entry, 0, 10)
    fetches = len(source.fetched(entry))
    source.lie_at = set()
    time.sleep(0.1)
    assert reader.read(entry, 0, len(body)) == body
    assert len(source.fetched(entry)) == fetches + 3  # all three chunks, fetched anew
    assert all(cache.contains(key) for key in keys_of(entry))


def test_a_restart_checks_the_cached_chunks_again_without_fetching(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    entry, body = put(source, "kept.bin", 4 * CHUNK)
    assert new_reader(readers, cache).read(entry, 0, 10) == body[:10]
    fetches = len(source.fetched(entry))
    again = new_reader(readers, cache)  # a new process: nothing verified in memory
    assert again.read(entry, CHUNK, 10) == body[CHUNK : CHUNK + 10]
    assert len(source.fetched(entry)) == fetches
    # A chunk damaged in the cache under its key (valid header): the check catches it.
    cache.drop(keys_of(entry)[3])
    cache.put(keys_of(entry)[3], bytes(CHUNK))
    third = new_reader(readers, cache)
    with pytest.raises(ReadError):
        third.read(entry, 0, 10)
    assert not any(cache.contains(key) for key in keys_of(entry))


@pytest.mark.parametrize("callbacks_late", [False, True])
def test_a_chunk_fetched_again_after_eviction_is_checked_against_the_verified_one(
    source: LyingS3,
    cache: ChunkCache,
    readers: list[Reader],
    callbacks_late: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`callbacks_late`: a fetch's future lets its waiters go on before its done-callbacks
    run; on a busy machine the first fetch of the dropped chunk was still listed as in
    flight, and its old result was served without a new fetch or check."""
    if callbacks_late:
        monkeypatch.setattr(Reader, "_forget_inflight", lambda self, done: None)
    entry, body = put(source, "evicted.bin", 3 * CHUNK)
    reader = new_reader(readers, cache, memory_bytes=0)
    assert reader.read(entry, 0, 10) == body[:10]
    cache.drop(keys_of(entry)[1])
    source.lie_at = {CHUNK}
    with pytest.raises(ReadError) as info:
        reader.read(entry, CHUNK, 10)
    assert "not the one its whole-file check passed" in str(info.value)
    assert not cache.contains(keys_of(entry)[1])
    assert reader.read(entry, 2 * CHUNK, 10) == body[2 * CHUNK : 2 * CHUNK + 10]


def test_concurrent_first_reads_share_one_check_and_one_fetch_per_chunk(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    entry, body = put(source, "shared.bin", 5 * CHUNK + 3)
    reader = new_reader(readers, cache)
    results = run_at_once(lambda index: reader.read(entry, index * CHUNK // 2, 1000), timeout=30)
    for index, result in enumerate(results):
        offset = index * CHUNK // 2
        assert result == body[offset : offset + 1000]
    assert sorted(source.fetched(entry)) == [i * CHUNK for i in range(6)]


def test_a_file_above_the_limit_is_read_chunk_by_chunk(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    entry, body = put(source, "large.bin", 8 * CHUNK)
    reader = new_reader(readers, cache, readahead_chunks=0, verify_before_serving_bytes=4 * CHUNK)
    offset = 5 * CHUNK + 77
    assert reader.read(entry, offset, 100) == body[offset : offset + 100]
    assert source.fetched(entry) == [5 * CHUNK]


def test_a_file_whose_hash_covers_no_content_is_read_chunk_by_chunk(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    """A multipart ETag (`md5-N`) is no hash of the content: nothing to check it whole against."""
    entry, body = put(source, "multipart.bin", 4 * CHUNK)
    multipart = ArtifactFileData(
        entry.file_path, "0" * 32 + "-4", "S3", entry.size, dict(entry.metadata)
    )
    reader = new_reader(readers, cache, readahead_chunks=0)
    assert reader.read(multipart, CHUNK, 10) == body[CHUNK : CHUNK + 10]
    assert source.fetched(multipart) == [CHUNK]


def test_iter_file_serves_a_checked_file_whole(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    """What `download` uses: every chunk of a file that passed its check, in order."""
    entry, body = put(source, "download.bin", 3 * CHUNK + 11)
    reader = new_reader(readers, cache)
    assert b"".join(reader.iter_file(entry)) == body
    source.lie_at = {0}
    other, _ = put(source, "download-liar.bin", 2 * CHUNK, seed=2)
    with pytest.raises(ReadError):
        b"".join(reader.iter_file(other))


def test_read_if_ready_serves_only_what_read_would_serve(
    source: LyingS3, cache: ChunkCache, readers: list[Reader]
) -> None:
    """The mount answers reads of bytes already in memory without a worker thread: never
    bytes of a file not yet checked whole, or of one that failed its check."""
    entry, body = put(source, "ready.bin", 3 * CHUNK + 7)
    reader = new_reader(readers, cache)
    assert reader.read_if_ready(entry, 0, 100) is None  # nothing in memory yet
    assert reader.read(entry, 0, 100) == body[:100]  # checked whole, every chunk in memory
    assert reader.read_if_ready(entry, CHUNK + 5, 100) == body[CHUNK + 5 : CHUNK + 105]
    assert reader.read_if_ready(entry, 3 * CHUNK, 100) == body[3 * CHUNK :]  # clipped
    assert reader.read_if_ready(entry, CHUNK - 5, 10) is None  # two chunks: `read` does it
    liar, _ = put(source, "liar-ready.bin", 3 * CHUNK + 7, seed=2)
    source.lie_at = {2 * CHUNK}
    with pytest.raises(ReadError):
        reader.read(liar, 0, 10)
    for offset in (0, CHUNK, 2 * CHUNK, 3 * CHUNK):
        assert reader.read_if_ready(liar, offset, 10) is None
    # Chunks in memory of a file whose check has not run (a check under way) are not served.
    unchecked, unchecked_body = put(source, "unchecked.bin", 3 * CHUNK + 7, seed=3)
    reader._remember(keys_of(unchecked)[1], unchecked_body[CHUNK : 2 * CHUNK])
    cache.put(keys_of(unchecked)[1], unchecked_body[CHUNK : 2 * CHUNK])
    assert reader.read_if_ready(unchecked, CHUNK, 10) is None


def test_a_random_read_of_a_chunk_dropped_meanwhile_gets_its_own_small_request(
    source: LyingS3, cache: ChunkCache, readers: list[Reader], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk's first fetch, ended but still listed (its done-callback not yet run),
    counted as under way: the read waited for all of a new chunk fetch instead."""
    monkeypatch.setattr(Reader, "_forget_inflight", lambda self, done: None)
    entry, body = put(source, "large.bin", 8 * CHUNK)
    reader = new_reader(
        readers,
        cache,
        readahead_chunks=0,
        verify_before_serving_bytes=4 * CHUNK,
        direct_reads=True,
        memory_bytes=0,
    )
    offset = 5 * CHUNK + 77
    assert reader.read(entry, offset, 100) == body[offset : offset + 100]
    key = keys_of(entry)[5]
    deadline = time.monotonic() + 10
    while not cache.contains(key) and time.monotonic() < deadline:  # the chunk's own fetch
        time.sleep(0.01)
    cache.drop(key)
    source.reads.clear()
    later = offset + 1000  # not where the last read ended: a random read
    assert reader.read(entry, later, 100) == body[later : later + 100]
    assert (entry.source_url, later) in source.reads, source.reads
