"""ChunkCache on a real directory: atomic, checked, bounded, LRU, safe after a crash.

No FUSE and no servers: the cache is driven directly, and its directory is inspected and
damaged by hand the way a crash, a full disk or a stray `dd` would.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifactfs.cache import ChunkCache, chunk_key
from artifactfs.cache.chunks import FORMAT_TEXT, FORMAT_VERSION, HEADER_SIZE, MAGIC
from artifactfs.errors import ArtifactfsError

MiB = 1024 * 1024


def key(n: int) -> bytes:
    return chunk_key("S3", f"{n:032x}", 10 * MiB, MiB, n)


def payload(n: int, size: int = 1000) -> bytes:
    return random.Random(n).randbytes(size)


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


def test_chunk_file_is_named_by_key_and_starts_with_versioned_header(
    cache: ChunkCache, cache_dir: Path
) -> None:
    k = key(7)
    body = payload(7, 5000)
    assert cache.put(k, body)
    path = chunk_path(cache_dir, k)
    assert path.is_file()
    assert chunk_files(cache_dir) == [path]
    raw = path.read_bytes()
    assert len(raw) == HEADER_SIZE + len(body)
    magic, version, length, digest, stored_key = struct.unpack_from(">8sIQ32s32s", raw)
    assert raw.startswith(MAGIC)
    assert magic == MAGIC
    assert version == FORMAT_VERSION
    assert length == len(body)
    assert digest == hashlib.sha256(body).digest()
    assert stored_key == k
    assert raw[HEADER_SIZE:] == body
    assert (cache_dir / "FORMAT").read_text() == FORMAT_TEXT
    assert list((cache_dir / "tmp").iterdir()) == []  # nothing left half-written


# -- damaged chunk files are dropped, never served --------------------------------------------


def _flip_payload_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 17] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1])


def _truncate_into_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: HEADER_SIZE - 3])


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
    second = new_cache(cache_dir)
    assert second.get(key(1)) is None
    assert not chunk_path(cache_dir, key(1)).exists()
    assert second.snapshot()["errors"] == 1


# -- the byte limit and LRU eviction -----------------------------------------------------------


def test_limit_holds_under_many_puts(cache_dir: Path) -> None:
    limit = 20 * (HEADER_SIZE + 1000) + 500
    cache = new_cache(cache_dir, limit)
    rng = random.Random(5)
    for n in range(300):
        assert cache.put(key(n), payload(n, rng.randrange(0, 2000)))
        assert bytes_on_disk(cache_dir) <= limit
        assert cache.snapshot()["cache_bytes"] <= limit
    stats = cache.snapshot()
    assert stats["cache_bytes"] == bytes_on_disk(cache_dir)
    assert stats["chunks"] == len(chunk_files(cache_dir))


def test_least_recently_used_evicted_first(cache_dir: Path) -> None:
    size = HEADER_SIZE + 1000
    cache = new_cache(cache_dir, 4 * size)
    for n in range(4):
        assert cache.put(key(n), payload(n))
    assert cache.get(key(0)) == payload(0)  # now the most recently used
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
    size = HEADER_SIZE + 1000
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
    assert cache.put(key(1), payload(1, 1000))
    assert not cache.put(key(2), b"x" * 10_000)  # with its header, over the limit
    assert not cache.put(key(3), b"x" * (10_000 - HEADER_SIZE + 1))
    assert not cache.contains(key(2))
    assert not chunk_path(cache_dir, key(2)).exists()
    assert cache.get(key(1)) == payload(1, 1000)  # nothing was evicted for it
    assert cache.put(key(4), b"y" * (10_000 - HEADER_SIZE))  # exactly the limit fits
    assert bytes_on_disk(cache_dir) == 10_000


def test_rejects_non_positive_limit(cache_dir: Path) -> None:
    with pytest.raises(ArtifactfsError):
        ChunkCache(cache_dir, 0)


# -- across restarts ---------------------------------------------------------------------------


def test_index_rebuilt_from_directory_in_mtime_order(cache_dir: Path) -> None:
    size = HEADER_SIZE + 1000
    first = new_cache(cache_dir, 4 * size)
    for n in range(4):
        assert first.put(key(n), payload(n))
    # Last used: key 2 long ago, then 0, 3, 1 (oldest first).
    for age, n in enumerate((2, 0, 3, 1)):
        stamp = 1_600_000_000 + age * 100
        os.utime(chunk_path(cache_dir, key(n)), (stamp, stamp))

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


def test_restart_with_smaller_limit_evicts_down_to_it(cache_dir: Path) -> None:
    size = HEADER_SIZE + 1000
    first = new_cache(cache_dir, 10 * size)
    for n in range(10):
        assert first.put(key(n), payload(n))
    smaller = new_cache(cache_dir, 3 * size)
    assert smaller.snapshot()["cache_bytes"] <= 3 * size
    assert bytes_on_disk(cache_dir) <= 3 * size


def test_get_refreshes_mtime_for_next_start(cache_dir: Path) -> None:
    size = HEADER_SIZE + 1000
    first = new_cache(cache_dir, 3 * size)
    for n in range(3):
        assert first.put(key(n), payload(n))
        stamp = 1_600_000_000 + n
        os.utime(chunk_path(cache_dir, key(n)), (stamp, stamp))
    assert first.get(key(0)) == payload(0)  # oldest on disk, now the newest
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

    second = new_cache(cache_dir)
    assert list((cache_dir / "tmp").iterdir()) == []
    assert not second.contains(key(2))
    assert second.get(key(2)) is None
    assert second.get(key(1)) == payload(1)
    assert second.snapshot()["chunks"] == 1


def test_format_file_written_and_checked(cache_dir: Path) -> None:
    new_cache(cache_dir)
    assert (cache_dir / "FORMAT").read_text() == FORMAT_TEXT
    new_cache(cache_dir)  # the same format opens again


@pytest.mark.parametrize("text", ["artifactfs-cache 2\n", "artifactfs-cache 0", "something\n", ""])
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


def test_clear_removes_everything(cache: ChunkCache, cache_dir: Path) -> None:
    for n in range(5):
        assert cache.put(key(n), payload(n))
    stray = cache_dir / "chunks" / "ab" / ("ab" + "0" * 62)
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"stray")
    freed = cache.clear()
    assert freed >= 5 * (HEADER_SIZE + 1000)
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


def test_two_concurrent_puts_never_exceed_limit_on_disk(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both puts make room before writing, so the directory must never hold more than the limit.

    The two puts are held just before they write (after their make-room step), then let go
    together: the directory must stay within the limit while both chunk files are published.
    """
    size = HEADER_SIZE + 1000
    limit = 4 * size
    cache = new_cache(cache_dir, limit)
    for n in range(4):
        assert cache.put(key(n), payload(n))
    ledger = DiskLedger(cache_dir, monkeypatch)
    ledger.files = {str(p): p.stat().st_size for p in chunk_files(cache_dir)}
    ready = threading.Barrier(2, timeout=10)
    real_room = cache._room_on_disk

    def room_after_both_made_room(nbytes: int) -> bool:
        ready.wait()
        return real_room(nbytes)

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
    size = HEADER_SIZE + 2000
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
                if rng.random() < 0.5:
                    cache.put(key(n), expected(n))
                else:
                    got = cache.get(key(n))
                    if got is not None and got != expected(n):
                        wrong.append(f"key {n}: {len(got)} bytes")
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
    st.tuples(st.sampled_from(["put", "get", "drop"]), st.integers(0, 7)),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    operations=OPERATIONS,
    sizes=st.lists(st.integers(0, 400), min_size=8, max_size=8),
    limit=st.integers(HEADER_SIZE, 1500),
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
                    assert HEADER_SIZE + sizes[n] > limit
            elif op == "get":
                got = cache.get(key(n))
                if n not in present:
                    assert got is None
                else:
                    assert got is None or got == bodies[n]
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
        again = new_cache(directory, limit)
        assert again.snapshot()["cache_bytes"] == bytes_on_disk(directory)
        for n in range(8):
            got = again.get(key(n))
            assert got is None or (n in present and got == bodies[n])
