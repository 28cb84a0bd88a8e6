"""The Reader against a real S3 server (moto_server on 127.0.0.1) and local files, no FUSE.

Entries come from tracking, exactly as the mount gets them. The cache and the reader are driven
directly with small chunks (64 KiB), so multi-chunk objects stay small and fast to serve.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import crc32c
import pytest

import artifactfs
from artifactfs.cache import ChunkCache, chunk_key
from artifactfs.cache.chunks import header_size
from artifactfs.entries import ArtifactFileData
from artifactfs.reader import DEFAULT_READAHEAD_CHUNKS, Reader, ReadError
from artifactfs.sources import source_for_entry
from artifactfs.verification import GCS_HASH_KEY
from tests.conftest import GCSBucket, S3Bucket, make_tree
from tests.support.concurrent import run_at_once
from tests.support.faultproxy import FaultProxy, fault_proxy
from tests.support.s3_helpers import point_at

pytestmark = pytest.mark.s3

CHUNK = 64 * 1024
WAIT = 10.0  # seconds to wait for background read-ahead before failing


def body_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def track(location: str, field: str = "data") -> ArtifactFileData:
    run = artifactfs.init_run(project="ml/reader")
    run[field].track_files(location)
    files = run[field].fetch_files_list()
    assert len(files) == 1
    return files[0]


def track_s3(s3: S3Bucket, key: str, body: bytes) -> ArtifactFileData:
    s3.put(key, body)
    entry = track(s3.url(key))
    assert entry.type == "S3"
    assert entry.size == len(body)
    return entry


def chunk_files(directory: Path) -> list[Path]:
    return [p for p in (directory / "chunks").rglob("*") if p.is_file()]


def key_of(entry: ArtifactFileData, index: int, chunk_size: int = CHUNK) -> bytes:
    return chunk_key(entry.type, entry.file_hash, entry.size, chunk_size, index)


def wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_dir: Path) -> ChunkCache:
    return ChunkCache(cache_dir, 64 * 1024 * 1024, free_floor_bytes=0)


@pytest.fixture
def make_reader(cache: ChunkCache) -> Iterator[Callable[..., Reader]]:
    readers: list[Reader] = []

    def make(**options: int | float) -> Reader:
        options.setdefault("chunk_size", CHUNK)
        options.setdefault("deadline", 10.0)
        # These tests are about chunk mechanics (read-ahead, one fetch per chunk, the
        # background whole-file check): files of a few chunks are read chunk by chunk, as files
        # over VERIFY_BEFORE_SERVING_BYTES are. The check before serving has its own tests in
        # tests/unit/test_verify_before_serving.py.
        options.setdefault("verify_before_serving_bytes", 0)
        # Nor do they want a first or random read served by its own small request.
        options.setdefault("direct_reads", False)
        reader = Reader(cache, **options)  # type: ignore[arg-type]
        readers.append(reader)
        return reader

    yield make
    for reader in readers:
        reader.close()


@pytest.fixture
def reader(make_reader: Callable[..., Reader]) -> Reader:
    return make_reader()


def random_ranges(size: int, count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    ranges = [(0, size), (0, 1), (size - 1, 1), (size - 1, 100), (0, size + 10)]
    for boundary in range(CHUNK, size, CHUNK):  # across every chunk boundary
        ranges.append((boundary - 3, 7))
        ranges.append((boundary, 1))
    for _ in range(count):
        offset = rng.randrange(size)
        ranges.append((offset, rng.randrange(1, 3 * CHUNK)))
    return ranges


# -- remote reads return the tracked bytes -----------------------------------------------------


def test_random_ranges_of_single_chunk_object(s3: S3Bucket, reader: Reader) -> None:
    body = body_of(40_000, 1)
    entry = track_s3(s3, "one/small.bin", body)
    for offset, length in random_ranges(len(body), 40, seed=2):
        assert reader.read(entry, offset, length) == body[offset : offset + length]
    assert reader.cache.stats.fetched_bytes == len(body)  # fetched once, then cached
    assert reader.cached_bytes(entry) == len(body)


def test_random_ranges_of_multi_chunk_object(s3: S3Bucket, reader: Reader) -> None:
    body = body_of(5 * CHUNK + 1234, 3)
    entry = track_s3(s3, "multi/big.bin", body)
    for offset, length in random_ranges(len(body), 60, seed=4):
        assert reader.read(entry, offset, length) == body[offset : offset + length], (
            offset,
            length,
        )
    assert b"".join(reader.iter_file(entry)) == body
    assert reader.cached_bytes(entry) == len(body)
    assert wait_for(lambda: reader.cache.stats.fetched_bytes == len(body))
    # A second reader on the same cache fetches nothing.
    again = Reader(reader.cache, chunk_size=CHUNK)
    try:
        assert again.read(entry, 0, len(body)) == body
    finally:
        again.close()
    assert reader.cache.stats.fetched_bytes == len(body)


# CRC32C's generator polynomial (reflected, as bytes): XORed anywhere into a message, it leaves
# the message's CRC32C as it was.
CRC32C_POLYNOMIAL = bytes.fromhex("f176ec0501")


def as_composite(entry: ArtifactFileData) -> ArtifactFileData:
    """The entry as tracking records a composite GCS object (no MD5: its CRC32C, so marked).
    The emulator gives composed objects an MD5, which real GCS does not."""
    return ArtifactFileData(
        entry.file_path,
        f"{crc32c.crc32c(entry_body[entry.source_url]):08x}",
        entry.type,
        entry.size,
        {**entry.metadata, GCS_HASH_KEY: "crc32c"},
    )


entry_body: dict[str, bytes] = {}


@pytest.mark.gcs
@pytest.mark.parametrize("chunk_size", [CHUNK, 1024 * 1024], ids=["chunks", "one-chunk"])
def test_objects_known_only_by_one_crc32c_never_share_cached_bytes(
    gcs: GCSBucket, make_reader: Callable[..., Reader], chunk_size: int
) -> None:
    """Two composite GCS objects of one size whose CRC32C (their only hash, 32 bits) happens to
    be the same: each is read as its own bytes, never served the other's from the cache."""
    first = body_of(3 * CHUNK + 100, seed=1)
    second = bytearray(first)
    second[1000 : 1000 + len(CRC32C_POLYNOMIAL)] = bytes(
        x ^ y for x, y in zip(first[1000:], CRC32C_POLYNOMIAL, strict=False)
    )
    assert crc32c.crc32c(first) == crc32c.crc32c(bytes(second)) and first != second
    entries = []
    for name, body in (("run1/model.bin", first), ("run2/weights.bin", bytes(second))):
        gcs.put(name, body)
        entry_body[gcs.url(name)] = body
        entries.append(as_composite(track(gcs.url(name))))
    assert entries[0].file_hash == entries[1].file_hash
    reader = make_reader(chunk_size=chunk_size)
    assert reader.read(entries[0], 0, len(first)) == first
    assert reader.read(entries[1], 0, len(first)) == bytes(second)
    assert reader.read(entries[0], 0, len(first)) == first


def test_empty_object(s3: S3Bucket, reader: Reader) -> None:
    entry = track_s3(s3, "empty", b"")
    assert reader.read(entry, 0, 100) == b""
    assert reader.cached_bytes(entry) == 0


def test_offset_at_or_beyond_size_reads_nothing(s3: S3Bucket, reader: Reader) -> None:
    body = body_of(3 * CHUNK, 5)
    entry = track_s3(s3, "b.bin", body)
    assert reader.read(entry, len(body), 10) == b""
    assert reader.read(entry, len(body) + 1, 10) == b""
    assert reader.read(entry, 10**12, 4096) == b""
    assert reader.read(entry, 0, 0) == b""
    assert reader.cache.stats.fetched_bytes == 0
    assert reader.read(entry, len(body) - 5, 100) == body[-5:]


# -- a changed object is never served ----------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "new_size"), [(1000, 1000), (1000, 999), (4 * CHUNK, 4 * CHUNK), (4 * CHUNK, 100)]
)
def test_changed_object_raises_and_caches_nothing(
    s3: S3Bucket, reader: Reader, cache_dir: Path, size: int, new_size: int
) -> None:
    entry = track_s3(s3, "data/x.bin", body_of(size, 6))
    s3.put("data/x.bin", body_of(new_size, 7))
    url = s3.url("data/x.bin")
    for offset in (0, size // 2):
        with pytest.raises(ReadError) as info:
            reader.read(entry, offset, 4096)
        assert url in str(info.value)
    time.sleep(0.5)  # read-ahead fetches, if any, fail in the background
    assert reader.cached_bytes(entry) == 0
    assert chunk_files(cache_dir) == []
    assert reader.cache.stats.errors >= 2


def test_deleted_object_raises(s3: S3Bucket, reader: Reader) -> None:
    entry = track_s3(s3, "gone.bin", body_of(1000, 8))
    s3.client.delete_object(Bucket=s3.name, Key="gone.bin")
    with pytest.raises(ReadError) as info:
        reader.read(entry, 0, 10)
    assert s3.url("gone.bin") in str(info.value)
    assert reader.cached_bytes(entry) == 0


def test_changed_object_after_partial_caching_serves_cached_or_fails(
    s3: S3Bucket, make_reader: Callable[..., Reader]
) -> None:
    """Chunks cached before the change are the tracked bytes; the others cannot be fetched."""
    body = body_of(3 * CHUNK, 9)
    entry = track_s3(s3, "half.bin", body)
    reader = make_reader(readahead_chunks=0)
    assert reader.read(entry, 0, 100) == body[:100]
    s3.put("half.bin", body_of(3 * CHUNK, 10))
    assert reader.read(entry, 200, 100) == body[200:300]  # chunk 0, from the cache
    with pytest.raises(ReadError):
        reader.read(entry, 2 * CHUNK, 100)
    assert reader.cached_bytes(entry) == CHUNK


# -- one fetch per chunk, read-ahead -----------------------------------------------------------


def _read_concurrently(reader: Reader, entry: ArtifactFileData, offset: int, length: int) -> list:
    return run_at_once(lambda i: reader.read(entry, offset + i, length))


def test_concurrent_reads_of_one_chunk_fetch_once(
    s3: S3Bucket, make_reader: Callable[..., Reader]
) -> None:
    body = body_of(4 * CHUNK, 11)
    entry = track_s3(s3, "shared.bin", body)
    reader = make_reader(readahead_chunks=0)
    offset = CHUNK + 100  # inside chunk 1
    results = _read_concurrently(reader, entry, offset, 1000)
    for i, result in enumerate(results):
        assert result == body[offset + i : offset + i + 1000]
    assert reader.cache.stats.fetched_bytes == CHUNK
    assert reader.cached_bytes(entry) == CHUNK


def test_concurrent_reads_of_small_object_fetch_once(s3: S3Bucket, reader: Reader) -> None:
    body = body_of(30_000, 12)
    entry = track_s3(s3, "small-shared.bin", body)
    results = _read_concurrently(reader, entry, 0, 5000)
    for i, result in enumerate(results):
        assert result == body[i : i + 5000]
    assert reader.cache.stats.fetched_bytes == len(body)


def test_each_chunk_a_read_looks_for_counts_as_one_hit_or_one_miss(
    s3: S3Bucket, make_reader: Callable[..., Reader]
) -> None:
    """The figures users read as a hit rate (`getfattr -n user.artifactfs.hits`): a cold read
    of one chunk is one miss and one fetch; reading it again, one hit."""
    body = body_of(CHUNK // 2, 15)
    entry = track_s3(s3, "counted.bin", body)
    reader = make_reader(readahead_chunks=0)
    assert reader.read(entry, 0, len(body)) == body
    stats = reader.cache.snapshot()
    assert (stats["hits"], stats["misses"], stats["fetched_bytes"]) == (0, 1, len(body))
    assert reader.read(entry, 0, len(body)) == body
    stats = reader.cache.snapshot()
    assert (stats["hits"], stats["misses"], stats["fetched_bytes"]) == (1, 1, len(body))


def test_sequential_reading_reads_ahead(s3: S3Bucket, reader: Reader) -> None:
    body = body_of(8 * CHUNK, 13)
    entry = track_s3(s3, "seq.bin", body)
    assert reader.read(entry, 0, 4096) == body[:4096]
    assert wait_for(lambda: reader.cache.contains(key_of(entry, 1)))
    time.sleep(0.3)
    assert not reader.cache.contains(key_of(entry, 2))  # a first read: one chunk ahead, not more
    # Reading 4 KiB fetched the chunk read and the read-ahead, not the object.
    assert reader.cache.stats.fetched_bytes == 2 * CHUNK
    # Continuing where it stopped opens the full window ahead.
    assert reader.read(entry, 4096, 2 * CHUNK) == body[4096 : 4096 + 2 * CHUNK]
    ahead = range(3, min(8, 3 + DEFAULT_READAHEAD_CHUNKS))
    assert wait_for(lambda: all(reader.cache.contains(key_of(entry, i)) for i in ahead))


def test_random_reading_does_not_read_ahead(s3: S3Bucket, reader: Reader) -> None:
    body = body_of(8 * CHUNK, 14)
    entry = track_s3(s3, "random.bin", body)
    offset = 5 * CHUNK + 77
    assert reader.read(entry, offset, 100) == body[offset : offset + 100]
    time.sleep(0.5)
    assert reader.cached_bytes(entry) == CHUNK
    assert reader.cache.stats.fetched_bytes == CHUNK


def test_cached_bytes_reflects_the_cache(s3: S3Bucket, make_reader: Callable[..., Reader]) -> None:
    size = 3 * CHUNK + 500
    body = body_of(size, 15)
    entry = track_s3(s3, "cached.bin", body)
    reader = make_reader(readahead_chunks=0)
    assert reader.cached_bytes(entry) == 0
    assert reader.read(entry, CHUNK + 1, 10) == body[CHUNK + 1 : CHUNK + 11]
    assert reader.cached_bytes(entry) == CHUNK
    assert reader.read(entry, size - 1, 1) == body[-1:]
    assert reader.cached_bytes(entry) == CHUNK + 500
    assert reader.read(entry, 0, size) == body
    assert reader.cached_bytes(entry) == size
    reader.cache.drop(key_of(entry, 2))
    assert reader.cached_bytes(entry) == size - CHUNK
    reader.cache.clear()
    assert reader.cached_bytes(entry) == 0


# -- whole-file check of multi-chunk objects ---------------------------------------------------


def test_tampered_chunk_dropped_by_whole_file_check(
    s3: S3Bucket, make_reader: Callable[..., Reader], caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk with wrong bytes under the right key (valid chunk header, so the cache cannot
    tell): once every chunk is cached, the whole-file MD5 fails and all chunks are dropped."""
    size = 4 * CHUNK
    body = body_of(size, 16)
    entry = track_s3(s3, "tampered.bin", body)
    assert len(entry.file_hash) == 32  # a single-part upload: its ETag is the MD5
    # No hold-off after the failure: the read at the end checks the file anew at once.
    reader = make_reader(readahead_chunks=0, failure_memory=0.0)
    bad = bytes(b ^ 0xFF for b in body[:CHUNK])
    assert reader.cache.put(key_of(entry, 0), bad)
    errors_before = reader.cache.stats.errors

    # What a reader sees of chunk 0 before the other chunks complete the file: the cache
    # cannot tell (its header is valid), so the bytes put there.
    first = reader.read(entry, 0, 100)
    for index in (1, 2):
        offset = index * CHUNK
        assert reader.read(entry, offset, CHUNK) == body[offset : offset + CHUNK]
    # The read that completes the file triggers the check: it may return its own (correct)
    # chunk or fail the read; either way it never returns other bytes, and names the file.
    reported = caplog.text
    try:
        last = reader.read(entry, 3 * CHUNK, CHUNK)
    except ReadError as exc:
        reported += str(exc)
    else:
        assert last == body[3 * CHUNK :]
        reported += caplog.text

    # The check runs in the background and drops the chunks before it counts the error and
    # logs it: wait for the last of these.
    assert wait_for(
        lambda: (
            reader.cached_bytes(entry) == 0
            and reader.cache.stats.errors > errors_before
            and "whole-file check failed" in caplog.text
        )
    )
    reported += caplog.text
    assert s3.url("tampered.bin") in reported
    # Read again, everything comes from the server, is checked and stays cached.
    assert reader.read(entry, 0, size) == body
    assert reader.cached_bytes(entry) == size
    assert reader.cache.get(key_of(entry, 0)) == body[:CHUNK]
    assert first in (bad[:100], body[:100])


@pytest.fixture
def flipping_reader(
    s3: S3Bucket, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[Reader, FaultProxy]]]:
    """A reader whose S3 requests go through a fault proxy (the test adds its rules), with a
    disk cache of `cache_chunks` chunks and memory for `memory_chunks`; closed at the end."""
    readers: list[Reader] = []
    with fault_proxy(s3_endpoint) as proxy:

        def make(
            cache_chunks: int, memory_chunks: int, failure_memory: float = 0.0
        ) -> tuple[Reader, FaultProxy]:
            cache = ChunkCache(
                tmp_path / f"cache{len(readers)}",
                cache_chunks * (header_size(CHUNK) + CHUNK),
                free_floor_bytes=0,
            )
            reader = Reader(
                cache,
                chunk_size=CHUNK,
                readahead_chunks=0,
                deadline=10.0,
                memory_bytes=memory_chunks * CHUNK,
                verify_before_serving_bytes=0,
                direct_reads=False,
                failure_memory=failure_memory,  # none: a read after a failure checks anew
            )
            readers.append(reader)
            point_at(monkeypatch, proxy.url, "testing", "testing")
            return reader, proxy

        try:
            yield make
        finally:
            for reader in readers:
                reader.close()


def read_chunk_by_chunk(reader: Reader, entry: ArtifactFileData) -> bytes:
    """Read the file in order, one chunk per read, letting the background check catch up
    after each (a cache smaller than the file would evict a chunk before a slow check got to
    it: then the check never completes, which is not what these tests are about)."""
    pieces = []
    for offset in range(0, entry.size or 0, CHUNK):
        pieces.append(reader.read(entry, offset, CHUNK))
        assert reader.checks_settled(WAIT)
    return b"".join(pieces)


@pytest.mark.parametrize("memory_chunks", [64, 0], ids=["from-memory", "from-disk"])
def test_a_file_larger_than_the_cache_is_still_checked_whole(
    s3: S3Bucket,
    flipping_reader: Callable[..., tuple[Reader, FaultProxy]],
    caplog: pytest.LogCaptureFixture,
    memory_chunks: int,
) -> None:
    """A file of 8 chunks through a disk cache of 3, one chunk answered with a byte flipped
    under the right ETag (it cannot be told alone): read in order, the file is hashed as its
    chunks come in (from the reader's memory, or with none, from the disk cache), fails its
    whole-file check, and is dropped, counted and reported. (A check that waited for every
    chunk to be on disk at once never ran for such a file.)"""
    body = body_of(8 * CHUNK, 30)
    entry = track_s3(s3, "larger-than-cache.bin", body)
    reader, proxy = flipping_reader(cache_chunks=3, memory_chunks=memory_chunks)
    proxy.add("flip", (f"GET /{s3.name}/larger-than-cache.bin ", f" bytes={5 * CHUNK}-"))

    read_chunk_by_chunk(reader, entry)

    assert reader.cache.stats.errors == 1, "the flipped chunk was never found"
    assert reader.cached_bytes(entry) == 0
    assert "whole-file check failed" in caplog.text
    assert s3.url("larger-than-cache.bin") in caplog.text
    # Every read of it now fails until all of it was fetched anew and checked: the flipped
    # chunk is still flipped, so it fails again rather than serving other bytes.
    # Each such failure is counted once, and said once (by the read's error, which the mount
    # logs): the background check, fed by the same fetches, leaves the report to that read
    # (it used to report it a second time whenever it finished first: a race, so four reads).
    for _ in range(4):
        with pytest.raises(ReadError, match="whole-file check failed"):
            reader.read(entry, 0, CHUNK)
        assert reader.checks_settled(WAIT)
    assert reader.cache.stats.errors == 1 + 4
    assert caplog.text.count("whole-file check failed") == 1


def test_a_large_file_that_failed_its_check_answers_eio_at_once_for_a_while(
    s3: S3Bucket, flipping_reader: Callable[..., tuple[Reader, FaultProxy]]
) -> None:
    """The kernel retries a failed read at once, and programs retry too: after a large file
    failed its whole-file check, such reads get EIO at once, without fetching all of the file
    again for each (16 bytes must not cost 10 GiB); a read after the hold-off checks it anew."""
    body = body_of(8 * CHUNK, 33)
    entry = track_s3(s3, "failed-lately.bin", body)
    reader, proxy = flipping_reader(cache_chunks=8, memory_chunks=8, failure_memory=2.0)
    gets = f"GET /{s3.name}/failed-lately.bin "
    proxy.add("flip", (gets, f" bytes={5 * CHUNK}-"))
    read_chunk_by_chunk(reader, entry)
    assert reader.cache.stats.errors == 1, "the flipped chunk was never found"
    fetched = len(proxy.requests(gets))

    for _ in range(5):
        with pytest.raises(ReadError, match="whole-file check failed"):
            reader.read(entry, 0, 16)
    assert len(proxy.requests(gets)) == fetched
    time.sleep(2.5)
    with pytest.raises(ReadError, match="whole-file check failed"):
        reader.read(entry, 0, 16)  # fetched whole and hashed anew: still flipped
    assert len(proxy.requests(gets)) == fetched + 8
    assert reader.cache.stats.errors == 1 + 5 + 1


@pytest.mark.parametrize("cache_chunks", [8, 3], ids=["file-fits", "file-larger-than-cache"])
def test_a_chunk_fetched_again_after_the_check_passed_it_is_checked_again(
    s3: S3Bucket,
    flipping_reader: Callable[..., tuple[Reader, FaultProxy]],
    caplog: pytest.LogCaptureFixture,
    cache_chunks: int,
) -> None:
    """The whole file passes its check; one chunk is then evicted and fetched again, and this
    time its answer has a byte flipped: the file, which now has two contents for one chunk,
    is dropped (whether or not all of it fits in the cache)."""
    body = body_of(6 * CHUNK, 31)
    entry = track_s3(s3, "fetched-again.bin", body)
    reader, proxy = flipping_reader(cache_chunks=cache_chunks, memory_chunks=1)
    match = (f"GET /{s3.name}/fetched-again.bin ", f" bytes={2 * CHUNK}-")
    proxy.add("pass", match, times=1)
    proxy.add("flip", match)

    assert read_chunk_by_chunk(reader, entry) == body
    assert reader.cache.stats.errors == 0

    reader.cache.drop(key_of(entry, 2))  # not in memory either: it holds the last chunk read
    reader.read(entry, 2 * CHUNK, CHUNK)  # fetched again: flipped

    assert reader.checks_settled(WAIT)
    assert reader.cache.stats.errors == 1
    assert reader.cached_bytes(entry) == 0
    assert "whole-file check failed" in caplog.text
    assert "chunk 2 came with other bytes" in caplog.text


def test_wrong_bytes_in_single_chunk_fetch_never_cached(
    s3: S3Bucket, make_reader: Callable[..., Reader], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers with other bytes (and the right ETag): the MD5 check refuses."""
    body = body_of(10_000, 17)
    entry = track_s3(s3, "liar.bin", body)
    from artifactfs.sources import source_for_entry

    source = source_for_entry(entry)
    monkeypatch.setattr(source, "read_range", lambda e, offset, length: b"\0" * length)
    reader = make_reader()
    with pytest.raises(ReadError) as info:
        reader.read(entry, 0, 100)
    assert s3.url("liar.bin") in str(info.value)
    assert reader.cached_bytes(entry) == 0


# -- local entries -----------------------------------------------------------------------------


@pytest.fixture
def local_entry(tmp_path: Path) -> tuple[Path, bytes, ArtifactFileData]:
    body = body_of(200_000, 18)
    data = make_tree(tmp_path / "local", {"f.bin": body})
    entry = track(str(data / "f.bin"))
    assert entry.type == "Local"
    return data / "f.bin", body, entry


def test_local_entry_read_in_place(
    local_entry: tuple[Path, bytes, ArtifactFileData], reader: Reader, cache_dir: Path
) -> None:
    _path, body, entry = local_entry
    for offset, length in random_ranges(len(body), 30, seed=19):
        assert reader.read(entry, offset, length) == body[offset : offset + length]
    assert reader.read(entry, len(body), 10) == b""
    assert reader.cached_bytes(entry) == len(body)
    assert chunk_files(cache_dir) == []  # nothing copied into the cache
    assert reader.cache.stats.fetched_bytes == 0


@pytest.mark.parametrize("change", ["same size", "other size", "deleted"])
def test_changed_local_file_raises(
    local_entry: tuple[Path, bytes, ArtifactFileData], reader: Reader, change: str
) -> None:
    path, body, entry = local_entry
    assert reader.read(entry, 0, 10) == body[:10]  # verified once
    info = path.stat()
    if change == "same size":
        path.write_bytes(body_of(len(body), 20))
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    elif change == "other size":
        path.write_bytes(body + b"more")
    else:
        path.unlink()
    with pytest.raises(ReadError) as raised:
        reader.read(entry, 0, 10)
    assert str(path) in str(raised.value)
    with pytest.raises(ReadError):
        reader.read(entry, 1000, 10)  # and again: never served once it failed


def test_a_local_file_replaced_while_a_read_checks_it_is_not_served(
    local_entry: tuple[Path, bytes, ArtifactFileData],
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file was changed (same size); a read opens it, and while that read checks the path,
    someone puts the tracked file back by a rename: the check passes on the tracked file, but
    the bytes of the read come from the changed one it opened. It must fail, not serve them."""
    path, body, entry = local_entry
    changed = body_of(len(body), 21)
    path.write_bytes(changed)
    (path.parent / "backup").write_bytes(body)
    local = source_for_entry(entry)
    real_check = local.check

    def check_after_restore(checked: ArtifactFileData) -> None:
        os.replace(path.parent / "backup", path)
        real_check(checked)

    monkeypatch.setattr(local, "check", check_after_restore)
    with pytest.raises(ReadError, match="changed while it was being checked"):
        reader.read(entry, 0, 16)
    monkeypatch.setattr(local, "check", real_check)
    assert reader.read(entry, 0, 16) == body[:16]  # the tracked file, now in place


def test_a_local_file_written_in_place_while_read_is_not_served(
    local_entry: tuple[Path, bytes, ArtifactFileData],
    reader: Reader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pipeline rewrites a tracked file in place while the mount reads it: a write landing
    after the read's checks and before its `pread` was served, bytes never tracked."""
    path, body, entry = local_entry
    assert reader.read(entry, 0, 16) == body[:16]  # checked once: later reads are not hashed
    real_pread = os.pread

    def pread_after_a_write(fd: int, length: int, offset: int) -> bytes:
        time.sleep(0.02)  # past a coarse clock tick: the write gets a new mtime
        with open(path, "r+b") as rewrite:
            rewrite.write(b"X" * 16)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(os, "pread", pread_after_a_write)
    with pytest.raises(ReadError, match="changed while it was being read"):
        reader.read(entry, 0, 16)
    monkeypatch.setattr(os, "pread", real_pread)
    with pytest.raises(ReadError):
        reader.read(entry, 0, 16)  # and not later either: it is no longer the tracked file


# -- reads from the disk cache -----------------------------------------------------------------


def test_a_read_from_the_disk_cache_checks_only_the_blocks_it_returns(
    s3: S3Bucket, make_reader: Callable[..., Reader], cache: ChunkCache
) -> None:
    """A reader with nothing in memory (a remount) reads a 4 MiB chunk from disk block by
    block: a damaged block is found by the first read that needs it, and that read still gets
    the tracked bytes (fetched again); reads of other blocks before it never needed a fetch."""
    MiB = 1024 * 1024
    body = body_of(4 * MiB + 123, 31)
    entry = track_s3(s3, "blocks.bin", body)
    options = {"chunk_size": 4 * MiB, "readahead_chunks": 0}
    assert make_reader(**options).read(entry, 0, len(body)) == body
    key = key_of(entry, 0, 4 * MiB)
    path = Path(cache._path(key))
    damaged = bytearray(path.read_bytes())
    damaged[header_size(4 * MiB) + 3 * MiB + 7] ^= 0xFF  # in block 3 of chunk 0
    path.write_bytes(bytes(damaged))

    remounted = make_reader(**options)
    fetched, errors = cache.stats.fetched_bytes, cache.stats.errors
    assert remounted.read(entry, 10, 4096) == body[10:4106]
    assert remounted.read(entry, 2 * MiB - 5, 10) == body[2 * MiB - 5 : 2 * MiB + 5]
    assert cache.stats.fetched_bytes == fetched, "a read of intact blocks fetched"
    assert remounted.read(entry, 3 * MiB, 4096) == body[3 * MiB : 3 * MiB + 4096]
    assert cache.stats.errors == errors + 1
    assert cache.stats.fetched_bytes == fetched + 4 * MiB  # the chunk, fetched again
    assert remounted.read(entry, 0, len(body)) == body


# -- first and random reads of large files ------------------------------------------------------


def test_first_and_random_reads_of_a_large_file_get_their_bytes_directly(
    s3: S3Bucket, make_reader: Callable[..., Reader]
) -> None:
    """A first or random read that starts its chunk's fetch is answered by a ranged request of
    just its bytes; the chunk still arrives for the reads after it, fetched once."""
    body = body_of(8 * CHUNK, 32)
    entry = track_s3(s3, "direct.bin", body)
    reader = make_reader(direct_reads=True, readahead_chunks=0)
    offset = 5 * CHUNK + 77
    assert reader.read(entry, offset, 4096) == body[offset : offset + 4096]
    assert wait_for(lambda: reader.cached_bytes(entry) == CHUNK)
    assert reader.cache.stats.fetched_bytes == CHUNK + 4096
    # Later reads of that chunk come from the cache: nothing more is fetched.
    assert reader.read(entry, 5 * CHUNK, CHUNK) == body[5 * CHUNK : 6 * CHUNK]
    assert reader.cache.stats.fetched_bytes == CHUNK + 4096


def test_a_direct_read_of_a_changed_object_fails_like_its_chunk(
    s3: S3Bucket, make_reader: Callable[..., Reader]
) -> None:
    body = body_of(8 * CHUNK, 33)
    entry = track_s3(s3, "direct-changed.bin", body)
    s3.put("direct-changed.bin", body_of(8 * CHUNK, 34))
    reader = make_reader(direct_reads=True, readahead_chunks=0)
    with pytest.raises(ReadError) as info:
        reader.read(entry, 3 * CHUNK + 5, 4096)
    assert s3.url("direct-changed.bin") in str(info.value)
    assert reader.cached_bytes(entry) == 0
