"""ChunkCache on a real directory: atomic, checked, bounded, LRU, safe after a crash.

No FUSE and no servers: the cache is driven directly, and its directory is inspected and
damaged by hand the way a crash, a full disk or a stray `dd` would.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifactfs.cache import CacheBusyError, ChunkCache, chunk_key, chunks
from artifactfs.cache.chunks import (
    BLOCK,
    FORMAT_TEXT,
    FORMAT_VERSION,
    MAGIC,
    header_size,
    unpack_chunk,
)
from artifactfs.errors import ArtifactfsError

MiB = 1024 * 1024
# The fixed start of a format 2 header: magic, version, payload length, block size, key.
PREFIX = struct.Struct(">8sIQI32s")


def key(n: int) -> bytes:
    return chunk_key("S3", f"{n:032x}", 10 * MiB, MiB, n)


def payload(n: int, size: int = 1000) -> bytes:
    return random.Random(n).randbytes(size)


def stored(length: int) -> int:
    """Bytes on disk of a chunk file holding `length` payload bytes."""
    return header_size(length) + length


def payload_start(raw: bytes) -> int:
    """Where the payload starts in a chunk file's bytes: after its header."""
    (length,) = struct.unpack_from(">Q", raw, 12)
    return header_size(length)


def chunk_path(directory: Path, k: bytes) -> Path:
    return directory / "chunks" / k.hex()[:2] / k.hex()


def chunk_files(directory: Path) -> list[Path]:
    return [p for p in (directory / "chunks").rglob("*") if p.is_file()]


def bytes_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in chunk_files(directory))


def new_cache(directory: Path, limit: int = 100 * MiB, **kwargs: int) -> ChunkCache:
    # The free-space floor defaults to 256 MiB; tests keep it at 0 unless they test it.
    kwargs.setdefault("free_floor_bytes", 0)
    return ChunkCache(directory, limit, **kwargs)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_dir: Path) -> ChunkCache:
    return new_cache(cache_dir)


# -- round trip and on-disk format ------------------------------------------------------------


def test_put_get_round_trip(cache: ChunkCache) -> None:
    for n in range(5):
        assert cache.put(key(n), payload(n, 100 + n))
    for n in range(5):
        assert cache.contains(key(n))
        assert cache.get(key(n)) == payload(n, 100 + n)
    assert cache.get(key(99)) is None
    assert not cache.contains(key(99))
    stats = cache.snapshot()
    assert stats["hits"] == 5
    assert stats["misses"] == 1
    assert stats["chunks"] == 5
    assert stats["errors"] == 0


def test_empty_payload_round_trip(cache: ChunkCache) -> None:
    assert cache.put(key(1), b"")
    assert cache.get(key(1)) == b""


def test_chunk_key_is_content_identity() -> None:
    base = chunk_key("S3", "abc", 10, 4, 0)
    assert len(base) == 32
    assert base == chunk_key("S3", "abc", 10, 4, 0)
    others = {
        chunk_key("GCS", "abc", 10, 4, 0),
        chunk_key("S3", "abd", 10, 4, 0),
        chunk_key("S3", "abc", 11, 4, 0),
        chunk_key("S3", "abc", 10, 8, 0),
        chunk_key("S3", "abc", 10, 4, 1),
        chunk_key("S3", "abc", None, 4, 0),
    }
    assert base not in others
    assert len(others) == 6


@pytest.mark.parametrize(
    "length",
    [0, 1, 5000, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 1234],
    ids=lambda n: f"{n} bytes",
)
def test_chunk_file_is_named_by_key_and_starts_with_versioned_header(
    cache: ChunkCache, cache_dir: Path, length: int
) -> None:
    """Format 2: prefix, one CRC32C per BLOCK of payload, a CRC32C of the header, payload."""
    k = key(7)
    body = payload(7, length)
    assert cache.put(k, body)
    path = chunk_path(cache_dir, k)
    assert path.is_file()
    assert chunk_files(cache_dir) == [path]
    raw = path.read_bytes()
    blocks = [body[at : at + BLOCK] for at in range(0, length, BLOCK)]
    assert len(blocks) == -(-length // BLOCK)
    size = PREFIX.size + 4 * len(blocks) + 4
    assert size == header_size(length)
    assert len(raw) == size + length == stored(length)
    magic, version, stored_length, block, stored_key = PREFIX.unpack_from(raw)
    assert PREFIX.size == 56
    assert raw.startswith(MAGIC)
    assert magic == MAGIC
    assert version == FORMAT_VERSION == 2
    assert stored_length == length
    assert block == BLOCK == MiB
    assert stored_key == k
    crcs = struct.unpack_from(f">{len(blocks)}I", raw, PREFIX.size)
    assert list(crcs) == [google_crc32c.value(b) for b in blocks]
    (header_crc,) = struct.unpack_from(">I", raw, size - 4)
    assert header_crc == google_crc32c.value(raw[: size - 4])
    assert raw[size:] == body
    assert unpack_chunk(raw, k) == body
    assert unpack_chunk(raw, key(8)) is None
    assert (cache_dir / "FORMAT").read_text() == FORMAT_TEXT == "artifactfs-cache 2\n"
    assert list((cache_dir / "tmp").iterdir()) == []  # nothing left half-written


# -- damaged chunk files are dropped, never served --------------------------------------------


def _flip_payload_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[payload_start(raw) + 17] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1])


def _truncate_into_header(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: payload_start(raw) - 3])


def _wrong_magic(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(b"XXXXXXXX" + raw[8:])


def _wrong_version(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    struct.pack_into(">I", raw, 8, FORMAT_VERSION + 1)
    path.write_bytes(bytes(raw))


def _extra_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


DAMAGES = {
    "flipped payload byte": _flip_payload_byte,
    "truncated": _truncate,
    "truncated into the header": _truncate_into_header,
    "empty file": lambda path: path.write_bytes(b""),
    "wrong magic": _wrong_magic,
    "wrong version": _wrong_version,
    "extra byte": _extra_byte,
    "only the prefix": lambda path: path.write_bytes(path.read_bytes()[: PREFIX.size]),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_chunk_is_dropped(cache: ChunkCache, cache_dir: Path, damage) -> None:
    k = key(3)
    assert cache.put(k, payload(3, 4096))
    path = chunk_path(cache_dir, k)
    damage(path)
    assert cache.get(k) is None
    assert not path.exists()
    assert not cache.contains(k)
    stats = cache.snapshot()
    assert stats["errors"] == 1
    assert stats["chunks"] == 0
    assert stats["cache_bytes"] == 0
    # Fetched again, it is stored and served again.
    assert cache.put(k, payload(3, 4096))
    assert cache.get(k) == payload(3, 4096)


def test_chunk_under_another_key_is_not_served(cache: ChunkCache, cache_dir: Path) -> None:
    """A valid chunk file copied to another key's name: its header names the other key."""
    a, b = key(1), key(2)
    assert cache.put(a, payload(1))
    target = chunk_path(cache_dir, b)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(chunk_path(cache_dir, a).read_bytes())
    assert cache.get(b) is None
    assert not target.exists()
    assert cache.snapshot()["errors"] == 1
    assert cache.get(a) == payload(1)  # the original is untouched


def test_damaged_chunk_found_at_start_is_dropped_on_read(cache_dir: Path) -> None:
    first = new_cache(cache_dir)
    assert first.put(key(1), payload(1))
    _flip_payload_byte(chunk_path(cache_dir, key(1)))
    first.close()  # the process ended
    second = new_cache(cache_dir)
    assert second.get(key(1)) is None
    assert not chunk_path(cache_dir, key(1)).exists()
    assert second.snapshot()["errors"] == 1


# -- reading a range: only the blocks it touches are read and checked -------------------------

# Three whole blocks and a short fourth: block boundaries inside, a short block at the end.
MULTI = 3 * BLOCK + 1234
MULTI_BLOCKS = 4


def multi_payload() -> bytes:
    return payload(42, MULTI)


@pytest.fixture(scope="module")
def multi_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[ChunkCache, bytes]:
    """One multi-block chunk, put once and only read (hypothesis reuses it)."""
    cache = new_cache(tmp_path_factory.mktemp("multi") / "cache")
    assert cache.put(key(42), multi_payload())
    return cache, multi_payload()


# Positions anywhere, and often right at a block boundary, one byte either side, or past the end.
POSITIONS = st.one_of(
    st.integers(0, MULTI + 2 * BLOCK),
    st.builds(
        lambda block, delta: max(0, block * BLOCK + delta),
        st.integers(0, MULTI_BLOCKS + 1),
        st.integers(-2, 2),
    ),
    st.sampled_from([MULTI - 1, MULTI, MULTI + 1]),
)


@settings(max_examples=300, deadline=None)
@given(offset=POSITIONS, length=st.one_of(POSITIONS, st.integers(0, 5000)))
def test_read_of_any_range_is_that_slice_of_the_payload(
    multi_cache: tuple[ChunkCache, bytes], offset: int, length: int
) -> None:
    cache, body = multi_cache
    errors = cache.snapshot()["errors"]
    hits = cache.snapshot()["hits"]
    got = cache.read(key(42), offset, length)
    assert got is not None
    assert got == body[offset : offset + length]  # clipped to the payload's end
    assert type(got) is bytes
    stats = cache.snapshot()
    assert stats["errors"] == errors == 0
    assert stats["hits"] == hits + 1


def test_read_every_block_aligned_and_whole(multi_cache: tuple[ChunkCache, bytes]) -> None:
    cache, body = multi_cache
    for index in range(MULTI_BLOCKS):
        assert (
            cache.read(key(42), index * BLOCK, BLOCK) == body[index * BLOCK : (index + 1) * BLOCK]
        )
    assert cache.read(key(42), 0, MULTI) == body
    assert cache.read(key(42), 0, 10 * MULTI) == body
    assert cache.get(key(42)) == body


def test_read_beyond_the_end_is_clipped(cache: ChunkCache) -> None:
    body = payload(5, BLOCK + 10)
    assert cache.put(key(5), body)
    assert cache.read(key(5), BLOCK, 4096) == body[BLOCK:]
    assert cache.read(key(5), len(body) - 1, 100) == body[-1:]
    assert cache.read(key(5), len(body), 100) == b""
    assert cache.read(key(5), len(body) + 5 * BLOCK, 100) == b""
    assert cache.read(key(5), 3, 0) == b""
    stats = cache.snapshot()
    assert stats["hits"] == 5  # a chunk that is there and whole, even for no bytes
    assert stats["errors"] == 0 and stats["misses"] == 0


def test_read_of_an_empty_payload(cache: ChunkCache, cache_dir: Path) -> None:
    assert cache.put(key(1), b"")
    assert chunk_path(cache_dir, key(1)).stat().st_size == header_size(0) == PREFIX.size + 4
    assert cache.read(key(1), 0, 0) == b""
    assert cache.read(key(1), 0, 4096) == b""
    assert cache.read(key(1), 100, 4096) == b""
    assert cache.get(key(1)) == b""
    assert cache.snapshot()["hits"] == 4


def test_read_of_an_absent_chunk_is_a_miss(cache: ChunkCache) -> None:
    assert cache.read(key(1), 0, 4096) is None
    stats = cache.snapshot()
    assert stats["misses"] == 1 and stats["hits"] == 0 and stats["errors"] == 0


def test_read_rejects_a_negative_range(cache: ChunkCache) -> None:
    assert cache.put(key(1), payload(1))
    with pytest.raises(ValueError):
        cache.read(key(1), -1, 10)
    with pytest.raises(ValueError):
        cache.read(key(1), 0, -10)


def test_header_longer_than_the_first_read(
    multi_cache: tuple[ChunkCache, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header longer than one first read (chunks over ~1 GiB) is read in a second pread."""
    cache, body = multi_cache
    monkeypatch.setattr(chunks, "_HEADER_READ", PREFIX.size + 1)
    assert cache.read(key(42), 2 * BLOCK - 3, 10) == body[2 * BLOCK - 3 : 2 * BLOCK + 7]
    assert cache.get(key(42)) == body
    assert cache.snapshot()["errors"] == 0


def _flip_multi_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[header_size(MULTI) + at] ^= 0x40
    path.write_bytes(bytes(raw))


# How a read can touch block k: inside it, from the block before into it, all of it, the whole
# chunk with get.
TOUCHING = {
    "inside": lambda k: (k * BLOCK + 500, 100),  # not even the flipped byte itself
    "spanning into it": lambda k: (max(0, k * BLOCK - 10), 20),
    "the whole block": lambda k: (k * BLOCK, BLOCK),
    "get": lambda k: None,
}


@pytest.mark.parametrize("how", TOUCHING.values(), ids=TOUCHING.keys())
@pytest.mark.parametrize("k", range(MULTI_BLOCKS))
def test_flipped_byte_in_block_k_fails_reads_touching_block_k(
    cache: ChunkCache, cache_dir: Path, k: int, how
) -> None:
    body = multi_payload()
    assert cache.put(key(42), body)
    path = chunk_path(cache_dir, key(42))
    _flip_multi_byte(path, k * BLOCK + 1000)  # every block, the short last one too, has it

    # Reads of other blocks check only those blocks: they are served, and right.
    other = (k + 1) % MULTI_BLOCKS
    assert cache.read(key(42), other * BLOCK + 5000, 100) == body[other * BLOCK + 5000 :][:100]
    assert cache.snapshot()["errors"] == 0

    rng = how(k)
    got = cache.get(key(42)) if rng is None else cache.read(key(42), *rng)
    assert got is None
    assert not path.exists()
    assert not cache.contains(key(42))
    stats = cache.snapshot()
    assert stats["errors"] == 1
    assert stats["misses"] == 1
    assert stats["chunks"] == 0 and stats["cache_bytes"] == 0
    # The whole chunk is gone: a read of another block now misses, with no new error.
    assert cache.read(key(42), other * BLOCK, 100) is None
    assert cache.snapshot()["errors"] == 1
    assert cache.snapshot()["misses"] == 2
    # Fetched again, it is stored and served again.
    assert cache.put(key(42), body)
    assert cache.read(key(42), k * BLOCK, BLOCK) == body[k * BLOCK : (k + 1) * BLOCK]


def test_damaged_header_is_detected_whatever_byte(cache: ChunkCache, cache_dir: Path) -> None:
    """A bit flipped anywhere in the header (prefix, block CRCs, header CRC) fails every read,
    even one of a block whose own bytes are intact."""
    body = payload(9, 2 * BLOCK + 7)
    size = header_size(len(body))
    assert size == PREFIX.size + 3 * 4 + 4
    path = chunk_path(cache_dir, key(9))
    for at in range(size):
        for bit in (0x01, 0x80):
            assert cache.put(key(9), body)
            raw = bytearray(path.read_bytes())
            raw[at] ^= bit
            path.write_bytes(bytes(raw))
            assert cache.read(key(9), 0, 10) is None, f"header byte {at} bit {bit:#x}"
            assert not path.exists()
            assert not cache.contains(key(9))
    stats = cache.snapshot()
    assert stats["errors"] == stats["misses"] == 2 * size
    assert stats["hits"] == 0


def test_header_with_another_block_size_is_refused(cache: ChunkCache, cache_dir: Path) -> None:
    """Even a consistent header (its CRC right) is refused if it was cut in other blocks."""
    body = payload(4, 5000)
    assert cache.put(key(4), body)
    path = chunk_path(cache_dir, key(4))
    half = BLOCK // 2
    head = PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), half, key(4))
    head += struct.pack(">I", google_crc32c.value(body))
    head += struct.pack(">I", google_crc32c.value(head))
    path.write_bytes(head + body)
    assert cache.read(key(4), 0, 10) is None
    assert not path.exists()
    assert cache.snapshot()["errors"] == 1


@pytest.mark.parametrize("damage", [_truncate, _extra_byte], ids=["truncated", "extra byte"])
def test_wrong_file_length_fails_a_read_of_the_first_block(
    cache: ChunkCache, cache_dir: Path, damage
) -> None:
    """The file's length is checked against its header on every read, not only at the end."""
    assert cache.put(key(42), multi_payload())
    damage(chunk_path(cache_dir, key(42)))
    assert cache.read(key(42), 0, 4096) is None
    assert not chunk_path(cache_dir, key(42)).exists()
    assert cache.snapshot()["errors"] == 1


# -- the byte limit and LRU eviction -----------------------------------------------------------


def test_limit_holds_under_many_puts(cache_dir: Path) -> None:
    limit = 20 * stored(1000) + 500
    cache = new_cache(cache_dir, limit)
    rng = random.Random(5)
    for n in range(300):
        assert cache.put(key(n), payload(n, rng.randrange(0, 2000)))
        assert bytes_on_disk(cache_dir) <= limit
        assert cache.snapshot()["cache_bytes"] <= limit
    stats = cache.snapshot()
    assert stats["cache_bytes"] == bytes_on_disk(cache_dir)
    assert stats["chunks"] == len(chunk_files(cache_dir))


# A use of a chunk from disk: all of it, or a few bytes of it.
USES = {
    "get": lambda cache, k: cache.get(k),
    "read": lambda cache, k: cache.read(k, 100, 10),
}


@pytest.mark.parametrize("use", USES.values(), ids=USES.keys())
def test_least_recently_used_evicted_first(cache_dir: Path, use) -> None:
    size = stored(1000)
    cache = new_cache(cache_dir, 4 * size)
    for n in range(4):
        assert cache.put(key(n), payload(n))
    assert use(cache, key(0)) is not None  # now the most recently used
    assert cache.put(key(4), payload(4))  # evicts key 1, the least recently used
    assert cache.contains(key(0))
    assert not cache.contains(key(1))
    assert not chunk_path(cache_dir, key(1)).exists()
    assert cache.put(key(5), payload(5))  # then key 2
    assert not cache.contains(key(2))
    for n in (0, 3, 4, 5):
        assert cache.get(key(n)) == payload(n)
    assert bytes_on_disk(cache_dir) <= 4 * size


def test_touch_marks_a_chunk_used_without_reading_it(cache_dir: Path) -> None:
    """A hit served from the reader's memory still counts as a use of the disk copy."""
    size = stored(1000)
    cache = new_cache(cache_dir, 3 * size)
    for n in range(3):
        assert cache.put(key(n), payload(n))
    assert cache.touch(key(0))
    assert cache.put(key(3), payload(3))  # evicts key 1, not the touched key 0
    assert cache.contains(key(0)) and not cache.contains(key(1))
    assert not cache.touch(key(1))  # gone: the caller may put it back
    assert cache.get(key(0)) == payload(0)


def test_chunk_bigger_than_limit_is_refused(cache_dir: Path) -> None:
    cache = new_cache(cache_dir, 10_000)
    fits = 10_000 - header_size(10_000)
    assert stored(fits) == 10_000
    assert cache.put(key(1), payload(1, 1000))
    assert not cache.put(key(2), b"x" * 10_000)  # with its header, over the limit
    assert not cache.put(key(3), b"x" * (fits + 1))
    assert not cache.contains(key(2))
    assert not chunk_path(cache_dir, key(2)).exists()
    assert cache.get(key(1)) == payload(1, 1000)  # nothing was evicted for it
    assert cache.put(key(4), b"y" * fits)  # exactly the limit fits
    assert bytes_on_disk(cache_dir) == 10_000


def test_rejects_non_positive_limit(cache_dir: Path) -> None:
    with pytest.raises(ArtifactfsError):
        ChunkCache(cache_dir, 0)


# -- across restarts ---------------------------------------------------------------------------


def test_index_rebuilt_from_directory_in_mtime_order(cache_dir: Path) -> None:
    size = stored(1000)
    first = new_cache(cache_dir, 4 * size)
    for n in range(4):
        assert first.put(key(n), payload(n))
    # Last used: key 2 long ago, then 0, 3, 1 (oldest first).
    for age, n in enumerate((2, 0, 3, 1)):
        stamp = 1_600_000_000 + age * 100
        os.utime(chunk_path(cache_dir, key(n)), (stamp, stamp))
    first.close()

    second = new_cache(cache_dir, 4 * size)
    for n in range(4):
        assert second.contains(key(n))
    stats = second.snapshot()
    assert stats["chunks"] == 4
    assert stats["cache_bytes"] == 4 * size

    assert second.put(key(10), payload(10))
    assert not second.contains(key(2)) and not chunk_path(cache_dir, key(2)).exists()
    assert second.put(key(11), payload(11))
    assert not second.contains(key(0))
    assert second.put(key(12), payload(12))
    assert not second.contains(key(3))
    assert second.contains(key(1))
    assert second.get(key(1)) == payload(1)


def test_restart_with_a_limit_below_a_chunk_drops_that_chunk(cache_dir: Path) -> None:
    first = new_cache(cache_dir, 100 * MiB)
    assert first.put(key(1), payload(1, 50_000))
    assert first.put(key(2), payload(2, 100))
    first.close()
    smaller = new_cache(cache_dir, stored(1000))  # no error: the big chunk cannot be kept
    assert not smaller.contains(key(1)) and not chunk_path(cache_dir, key(1)).exists()
    assert smaller.get(key(2)) == payload(2, 100)
    assert smaller.snapshot()["cache_bytes"] == bytes_on_disk(cache_dir) == stored(100)


def test_restart_with_smaller_limit_evicts_down_to_it(cache_dir: Path) -> None:
    size = stored(1000)
    first = new_cache(cache_dir, 10 * size)
    for n in range(10):
        assert first.put(key(n), payload(n))
    first.close()
    smaller = new_cache(cache_dir, 3 * size)
    assert smaller.snapshot()["cache_bytes"] <= 3 * size
    assert bytes_on_disk(cache_dir) <= 3 * size


@pytest.mark.parametrize("use", USES.values(), ids=USES.keys())
def test_get_refreshes_mtime_for_next_start(cache_dir: Path, use) -> None:
    size = stored(1000)
    first = new_cache(cache_dir, 3 * size)
    for n in range(3):
        assert first.put(key(n), payload(n))
        stamp = 1_600_000_000 + n
        os.utime(chunk_path(cache_dir, key(n)), (stamp, stamp))
    assert use(first, key(0)) is not None  # oldest on disk, now the newest
    assert chunk_path(cache_dir, key(0)).stat().st_mtime > 1_600_000_000 + 2
    first.close()
    second = new_cache(cache_dir, 3 * size)
    assert second.put(key(9), payload(9))
    assert second.contains(key(0))
    assert not second.contains(key(1))


def test_half_written_chunks_in_tmp_are_removed_and_never_served(cache_dir: Path) -> None:
    first = new_cache(cache_dir)
    assert first.put(key(1), payload(1))
    complete = chunk_path(cache_dir, key(1)).read_bytes()
    # A process died while writing: a complete-looking and a torn temp file of key 2.
    (cache_dir / "tmp" / key(2).hex()).write_bytes(complete.replace(key(1), key(2)))
    (cache_dir / "tmp" / "tmpab12cd").write_bytes(complete[:100])
    (cache_dir / "tmp" / "sub").mkdir()
    (cache_dir / "tmp" / "sub" / "x").write_bytes(b"x")
    first.close()

    second = new_cache(cache_dir)
    assert list((cache_dir / "tmp").iterdir()) == []
    assert not second.contains(key(2))
    assert second.get(key(2)) is None
    assert second.get(key(1)) == payload(1)
    assert second.snapshot()["chunks"] == 1


def test_format_file_written_and_checked(cache_dir: Path) -> None:
    new_cache(cache_dir).close()
    assert (cache_dir / "FORMAT").read_text() == FORMAT_TEXT
    new_cache(cache_dir).close()  # the same format opens again


@pytest.mark.parametrize("text", ["artifactfs-cache 3\n", "artifactfs-cache 0", "something\n", ""])
def test_other_format_is_refused(cache_dir: Path, text: str) -> None:
    cache_dir.mkdir()
    (cache_dir / "FORMAT").write_text(text)
    (cache_dir / "chunks").mkdir()
    (cache_dir / "chunks" / "keep").write_bytes(b"not ours")
    with pytest.raises(ArtifactfsError) as info:
        new_cache(cache_dir)
    message = str(info.value)
    assert str(cache_dir) in message
    assert (cache_dir / "FORMAT").read_text() == text  # left as it was
    assert (cache_dir / "chunks" / "keep").read_bytes() == b"not ours"


def test_format_1_directory_is_cleared_and_upgraded(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A format 1 cache (one SHA-256 per chunk) is emptied, logged in one line, and reused."""
    old_key = key(1)
    body = payload(1)
    v1_header = struct.pack(
        ">8sIQ32s32s", MAGIC, 1, len(body), hashlib.sha256(body).digest(), old_key
    )
    old = chunk_path(cache_dir, old_key)
    old.parent.mkdir(parents=True)
    old.write_bytes(v1_header + body)
    (cache_dir / "FORMAT").write_text("artifactfs-cache 1\n")
    (cache_dir / "tmp").mkdir()
    (cache_dir / "tmp" / "tmpab12cd").write_bytes(b"half")

    with caplog.at_level(logging.INFO, logger="artifactfs.cache.chunks"):
        cache = new_cache(cache_dir)
    records = [r for r in caplog.records if r.name == "artifactfs.cache.chunks"]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "\n" not in message
    assert str(cache_dir) in message
    assert "artifactfs-cache 1" in message and "artifactfs-cache 2" in message
    assert "clear" in message
    assert (cache_dir / "FORMAT").read_text() == FORMAT_TEXT
    assert chunk_files(cache_dir) == []
    assert list((cache_dir / "tmp").iterdir()) == []
    assert cache.snapshot()["chunks"] == 0 and cache.snapshot()["cache_bytes"] == 0
    assert cache.get(old_key) is None
    assert cache.put(old_key, body)
    assert cache.get(old_key) == body

    caplog.clear()
    cache.close()
    with caplog.at_level(logging.INFO, logger="artifactfs.cache.chunks"):
        again = new_cache(cache_dir)  # now format 2: opened as it is, nothing logged
    assert [r for r in caplog.records if r.name == "artifactfs.cache.chunks"] == []
    assert again.get(old_key) == body


def test_format_1_chunk_file_in_a_format_2_cache_is_dropped(
    cache: ChunkCache, cache_dir: Path
) -> None:
    body = payload(1)
    path = chunk_path(cache_dir, key(1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        struct.pack(">8sIQ32s32s", MAGIC, 1, len(body), hashlib.sha256(body).digest(), key(1))
        + body
    )
    assert cache.read(key(1), 0, 10) is None
    assert not path.exists()
    assert cache.snapshot()["errors"] == 1


# -- maintenance -------------------------------------------------------------------------------


def test_fsck_drops_damaged_chunks_and_reports(cache: ChunkCache, cache_dir: Path) -> None:
    for n in range(6):
        assert cache.put(key(n), payload(n))
    _flip_payload_byte(chunk_path(cache_dir, key(1)))
    _truncate(chunk_path(cache_dir, key(4)))
    stray = cache_dir / "chunks" / "zz" / "not-a-key"
    stray.parent.mkdir()
    stray.write_bytes(b"junk")

    assert cache.fsck() == (7, 3)
    assert not chunk_path(cache_dir, key(1)).exists()
    assert not chunk_path(cache_dir, key(4)).exists()
    assert not stray.exists()
    assert not cache.contains(key(1)) and not cache.contains(key(4))
    for n in (0, 2, 3, 5):
        assert cache.get(key(n)) == payload(n)
    stats = cache.snapshot()
    assert stats["chunks"] == 4
    assert stats["cache_bytes"] == bytes_on_disk(cache_dir)
    assert cache.fsck() == (4, 0)


def test_fsck_checks_every_block(cache: ChunkCache, cache_dir: Path) -> None:
    """fsck reads every block, so it finds damage that reads of other blocks would not."""
    body = multi_payload()
    assert cache.put(key(42), body)
    assert cache.put(key(43), body)
    _flip_multi_byte(chunk_path(cache_dir, key(42)), MULTI - 1)  # the last byte of the last block
    assert cache.read(key(42), 0, BLOCK) == body[:BLOCK]  # block 0 is intact
    assert cache.fsck() == (2, 1)
    assert not chunk_path(cache_dir, key(42)).exists()
    assert not cache.contains(key(42))
    assert cache.get(key(43)) == body
    assert cache.snapshot()["cache_bytes"] == bytes_on_disk(cache_dir) == stored(MULTI)


def test_clear_removes_everything(cache: ChunkCache, cache_dir: Path) -> None:
    for n in range(5):
        assert cache.put(key(n), payload(n))
    stray = cache_dir / "chunks" / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"stray")
    freed = cache.clear()
    assert freed >= 5 * stored(1000)
    assert chunk_files(cache_dir) == []
    for n in range(5):
        assert not cache.contains(key(n))
        assert cache.get(key(n)) is None
    stats = cache.snapshot()
    assert stats["chunks"] == 0
    assert stats["cache_bytes"] == 0
    assert cache.put(key(1), payload(1))  # still usable
    assert cache.get(key(1)) == payload(1)


def test_drop_removes_one_chunk(cache: ChunkCache, cache_dir: Path) -> None:
    assert cache.put(key(1), payload(1))
    assert cache.put(key(2), payload(2))
    cache.drop(key(1))
    assert not cache.contains(key(1))
    assert not chunk_path(cache_dir, key(1)).exists()
    assert cache.get(key(2)) == payload(2)
    cache.drop(key(99))  # absent: no error


def test_free_space_floor_refuses_puts(cache_dir: Path) -> None:
    cache = new_cache(cache_dir, 100 * MiB, free_floor_bytes=10**18)
    assert not cache.put(key(1), payload(1))
    assert not cache.contains(key(1))
    assert chunk_files(cache_dir) == []
    assert list((cache_dir / "tmp").iterdir()) == []
    assert cache.get(key(1)) is None
    assert cache.snapshot()["cache_bytes"] == 0


def test_free_space_floor_holds_with_writes_in_flight(tmp_path: Path) -> None:
    """Eight 8 MiB puts at once on a 96 MiB file system with a 36 MiB floor: each alone would
    pass the floor, together they must not take the disk below it (seven fit)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        floor = 36 * MiB
        cache = ChunkCache(target / "cache", 1 << 30, free_floor_bytes=floor)
        all_in_flight = threading.Barrier(8, timeout=10)
        real_room = cache._room_on_disk

        def room_once_all_reserved() -> bool:
            all_in_flight.wait()
            return real_room()

        cache._room_on_disk = room_once_all_reserved  # type: ignore[method-assign]
        bodies = [payload(n, 8 * MiB - 4096) for n in range(8)]
        kept: dict[int, bool] = {}
        writers = [
            threading.Thread(target=lambda n=n: kept.update({n: cache.put(key(n), bodies[n])}))
            for n in range(8)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        usage = os.statvfs(target)
        assert usage.f_bavail * usage.f_frsize >= floor
        # Not all eight: together they do not fit. (How many do depends on the order the
        # threads take the lock: each refused one gives its reservation back only after.)
        assert sum(kept.values()) < 8
        # A kept chunk may since have been evicted by a later write keeping the floor; what the
        # cache still holds is each one's own bytes, and only chunks it reported kept.
        held = {n: cache.get(key(n)) for n in range(8)}
        assert any(held.values())
        assert all(held[n] == bodies[n] for n in range(8) if held[n] is not None)
        assert all(kept[n] for n in range(8) if held[n] is not None)
        cache.close()
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


# -- one process per cache directory -----------------------------------------------------------

_HOLD = """
import sys, time
from pathlib import Path
from artifactfs.cache import ChunkCache
cache = ChunkCache(Path(sys.argv[1]), 1 << 30)
print("holding", flush=True)
time.sleep(600)
"""


def test_a_cache_directory_is_used_by_one_process_at_a_time(cache_dir: Path) -> None:
    """Two processes on one directory would each keep the limit alone (their sum on disk) and
    empty tmp/ under each other's writes: the second is refused, naming the first, and changes
    nothing; once the first ends, however it ends, the directory is free again."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(cache_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        in_flight = cache_dir / "tmp" / "being-written"
        in_flight.write_bytes(b"half")
        with pytest.raises(CacheBusyError) as refused:
            new_cache(cache_dir, 10)  # a smaller limit would evict
        message = str(refused.value)
        assert "\n" not in message
        assert str(cache_dir) in message and f"pid {holder.pid}" in message
        assert in_flight.read_bytes() == b"half"
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed mount does not hold it
        holder.wait(30)
    cache = new_cache(cache_dir)
    assert cache.put(key(1), payload(1))
    with pytest.raises(CacheBusyError):
        new_cache(cache_dir)  # in this process too
    cache.close()
    assert new_cache(cache_dir).get(key(1)) == payload(1)


def test_closing_waits_for_writes_under_way_and_refuses_later_ones(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closed cache lets another process have the directory: no chunk of this one may
    appear in it after, not even from a fetch thread still at work."""
    cache = new_cache(cache_dir)
    writing, finish = threading.Event(), threading.Event()
    real_write_file = cache._write_file

    def slow_write_file(temp: str, header: bytes, payload: bytes) -> None:
        writing.set()
        finish.wait(10)
        real_write_file(temp, header, payload)

    monkeypatch.setattr(cache, "_write_file", slow_write_file)
    putting = threading.Thread(target=cache.put, args=(key(1), payload(1)))
    putting.start()
    assert writing.wait(10)
    closing = threading.Thread(target=cache.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive(), "close let go of the directory while a write was under way"
    finish.set()
    closing.join(10)
    putting.join(10)
    assert not cache.put(key(2), payload(2))  # after close: refused, nothing written
    assert [p.name for p in chunk_files(cache_dir)] == [key(1).hex()]
    assert new_cache(cache_dir).get(key(1)) == payload(1)


def test_a_dropped_chunks_bytes_are_free_only_once_its_file_is_gone(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put that needs the bytes of a chunk being dropped must wait for its file to go: the
    directory never holds more than the limit, even for a moment."""
    cache, ledger, limit = full_cache_with_ledger(cache_dir, monkeypatch)
    put_done = threading.Event()
    real_remove = cache._remove_file

    def slow_remove(chunk: bytes) -> None:
        if chunk == key(0):
            put_done.wait(1)  # a put that does not wait for this removal ends meanwhile
        real_remove(chunk)

    monkeypatch.setattr(cache, "_remove_file", slow_remove)
    dropping = threading.Thread(target=cache.drop, args=(key(0),))
    dropping.start()
    while key(0) in cache._index:  # dropped from the index, its file not yet removed
        pass
    assert cache.put(key(10), payload(10))
    put_done.set()
    dropping.join(10)
    assert ledger.peak <= limit, f"{ledger.peak} bytes on disk at once, over the limit {limit}"
    assert cache.get(key(10)) == payload(10)


# -- concurrency -------------------------------------------------------------------------------


class DiskLedger:
    """Exact bytes under chunks/ at every instant: wraps the only calls that change it."""

    def __init__(self, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.chunks = str(directory / "chunks") + os.sep
        self.lock = threading.Lock()
        self.files: dict[str, int] = {}
        self.peak = 0
        real_replace, real_unlink = os.replace, os.unlink

        def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            with self.lock:
                real_replace(src, dst, *args, **kwargs)
                if str(dst).startswith(self.chunks):
                    self.files[str(dst)] = os.stat(dst).st_size
                    self.peak = max(self.peak, sum(self.files.values()))

        def unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            with self.lock:
                try:
                    real_unlink(path, *args, **kwargs)
                finally:
                    if not os.path.exists(path):
                        self.files.pop(str(path), None)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "unlink", unlink)


def full_cache_with_ledger(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[ChunkCache, DiskLedger, int]:
    """A cache of four chunks' limit holding four, and a ledger of its bytes from now on."""
    limit = 4 * stored(1000)
    cache = new_cache(cache_dir, limit)
    for n in range(4):
        assert cache.put(key(n), payload(n))
    ledger = DiskLedger(cache_dir, monkeypatch)
    ledger.files = {str(p): p.stat().st_size for p in chunk_files(cache_dir)}
    return cache, ledger, limit


def test_two_concurrent_puts_never_exceed_limit_on_disk(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both puts make room before writing, so the directory must never hold more than the limit.

    The two puts are held just before they write (after their make-room step), then let go
    together: the directory must stay within the limit while both chunk files are published.
    """
    cache, ledger, limit = full_cache_with_ledger(cache_dir, monkeypatch)
    ready = threading.Barrier(2, timeout=10)
    real_room = cache._room_on_disk

    def room_after_both_made_room() -> bool:
        ready.wait()
        return real_room()

    monkeypatch.setattr(cache, "_room_on_disk", room_after_both_made_room)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(cache.put(key(n), payload(n))))
        for n in (10, 11)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [True, True]
    assert bytes_on_disk(cache_dir) <= limit
    assert ledger.peak <= limit, (
        f"the cache directory held {ledger.peak} bytes at once, over its limit of {limit}"
    )


def test_concurrent_puts_and_gets_keep_limit_and_bytes(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = stored(2000)
    limit = 12 * size
    cache = new_cache(cache_dir, limit)
    ledger = DiskLedger(cache_dir, monkeypatch)
    keys = 40
    wrong: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(8, timeout=10)

    def expected(n: int) -> bytes:
        return payload(n, 2000)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            barrier.wait()
            for _ in range(300):
                n = rng.randrange(keys)
                draw = rng.random()
                if draw < 0.5:
                    cache.put(key(n), expected(n))
                elif draw < 0.75:
                    got = cache.get(key(n))
                    if got is not None and got != expected(n):
                        wrong.append(f"key {n}: {len(got)} bytes")
                else:
                    offset, length = rng.randrange(2100), rng.randrange(2100)
                    got = cache.read(key(n), offset, length)
                    if got is not None and got != expected(n)[offset : offset + length]:
                        wrong.append(f"key {n} [{offset}:+{length}]: {len(got)} bytes")
                assert cache.snapshot()["cache_bytes"] <= limit
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors
    assert not wrong
    assert bytes_on_disk(cache_dir) <= limit
    stats = cache.snapshot()
    assert stats["cache_bytes"] <= limit
    assert stats["errors"] == 0
    for n in range(keys):
        got = cache.get(key(n))
        assert got is None or got == expected(n)
    # The index agrees with the directory once the threads are done.
    on_disk = {p.name for p in chunk_files(cache_dir)}
    indexed = {key(n).hex() for n in range(keys) if cache.contains(key(n))}
    assert indexed == on_disk
    assert stats["cache_bytes"] == bytes_on_disk(cache_dir)
    assert ledger.peak <= limit, (
        f"the cache directory held {ledger.peak} bytes at once, over its limit of {limit}"
    )


# -- property: any sequence of operations ------------------------------------------------------

OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["put", "get", "read", "drop"]), st.integers(0, 7)),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations=OPERATIONS,
    sizes=st.lists(st.integers(0, 400), min_size=8, max_size=8),
    limit=st.integers(header_size(0), 1500),
)
def test_any_operation_sequence_keeps_limit_and_bytes(
    operations: list[tuple[str, int]], sizes: list[int], limit: int
) -> None:
    # Content-addressed: a key always stands for the same bytes (their size varies by key).
    bodies = [random.Random(n).randbytes(size) for n, size in enumerate(sizes)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "cache"
        cache = new_cache(directory, limit)
        present: set[int] = set()  # keys whose chunk may be in the cache
        for op, n in operations:
            if op == "put":
                if cache.put(key(n), bodies[n]):
                    present.add(n)
                else:
                    assert stored(sizes[n]) > limit
            elif op in ("get", "read"):
                # A read takes a slice that depends on the key: start, middle or past the end.
                start, stop = (0, None) if op == "get" else (n * 37, n * 37 + 50)
                got = cache.get(key(n)) if op == "get" else cache.read(key(n), start, 50)
                if n not in present:
                    assert got is None
                else:
                    assert got is None or got == bodies[n][start:stop]
                    if got is None:
                        present.discard(n)  # evicted
            else:
                cache.drop(key(n))
                present.discard(n)
                assert cache.get(key(n)) is None
            stats = cache.snapshot()
            assert stats["cache_bytes"] <= limit
            assert bytes_on_disk(directory) <= limit
            assert stats["cache_bytes"] == bytes_on_disk(directory)
            assert stats["errors"] == 0
        # After a restart the same holds.
        cache.close()
        again = new_cache(directory, limit)
        assert again.snapshot()["cache_bytes"] == bytes_on_disk(directory)
        for n in range(8):
            got = again.get(key(n))
            assert got is None or (n in present and got == bodies[n])


@pytest.fixture(params=["disk", "tmpfs", "ramfs"])
def any_directory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A cache directory on the test's disk, on tmpfs (which has O_DIRECT since Linux 6.6) or
    on a ramfs the test mounts (which refuses O_DIRECT: the buffered path)."""
    if request.param == "disk":
        yield tmp_path / "cache"
    elif request.param == "tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm here")
        with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
            yield Path(shm) / "cache"
    else:
        yield from _ramfs(tmp_path / "ramfs")


def _ramfs(target: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a ramfs")
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a ramfs: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError) as refused:  # what makes this the buffered path
            os.open(target / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        assert refused.value.errno == errno.EINVAL
        yield target / "cache"
    finally:
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_large_chunks_written_at_once_read_back_exactly(any_directory: Path) -> None:
    """Chunks of 1 MiB and more are written with O_DIRECT where the file system allows it
    (padded, then cut to length) and buffered where it does not; more writers at once than
    there are direct buffers write buffered. Every chunk reads back whole and in ranges, and
    its file is exactly as long as its header says."""
    # No free-space floor: a ramfs says it has no free space, whatever it holds.
    cache = ChunkCache(any_directory, 512 * 1024 * 1024, free_floor_bytes=0)
    sizes = [1024 * 1024, 3 * 1024 * 1024 + 123, 8 * 1024 * 1024 - 1, 2 * 1024 * 1024 + 4096]
    bodies = {key(n): payload(n, sizes[n % len(sizes)]) for n in range(12)}
    writers = [
        threading.Thread(target=cache.put, args=(chunk, body)) for chunk, body in bodies.items()
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    for chunk, body in bodies.items():
        assert os.path.getsize(chunk_path(any_directory, chunk)) == stored(len(body))
        assert cache.get(chunk) == body
        assert cache.read(chunk, len(body) - 5000, 4096) == body[-5000:-904]
    # A restart finds them whole.
    cache.close()
    reopened = ChunkCache(any_directory, 512 * 1024 * 1024, free_floor_bytes=0)
    assert all(reopened.get(chunk) == body for chunk, body in bodies.items())
    assert reopened.fsck() == (len(bodies), 0)
