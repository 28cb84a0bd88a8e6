"""OrderedChecks on its own: chunks fetched and kept as a reader does, no cache, no server.

What a user of a large file relies on: a wrong file is found and rejected once, a right one
never is; a chunk that comes with two different contents under one tracked identity gets the
file rejected however the two meet; and the check reads each chunk it finds once, however late
and in whatever order the fetches tell it.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from artifactfs.entries import ArtifactFileData
from artifactfs.ordered_check import OrderedChecks

CHUNK = 1000
COUNT = 8
WAIT = 10.0


class Chunks:
    """The chunks a reader has at hand (memory or disk cache), and what the check did."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.entry = ArtifactFileData(
            "big.bin", hashlib.md5(body).hexdigest(), "S3", len(body), {"location": "s3://b/k"}
        )
        self.present: dict[int, bytes] = {}
        self.reads: Counter[int] = Counter()  # chunks found and given to the check
        self.rejected: list[str] = []
        self.lock = threading.Lock()
        self.gate = threading.Event()  # the check waits here for a chunk while it is clear
        self.gate.set()
        self.held = threading.Event()  # set once the check waits at the gate
        self.checks = OrderedChecks(lambda entry: COUNT, self.bytes_of, self.reject)

    def bytes_of(self, entry: ArtifactFileData, index: int) -> bytes | None:
        if not self.gate.is_set():
            self.held.set()
        assert self.gate.wait(WAIT)
        with self.lock:
            data = self.present.get(index)
            if data is not None:
                self.reads[index] += 1
            return data

    def reject(self, entry: ArtifactFileData, problem: str) -> None:
        self.rejected.append(problem)
        with self.lock:
            self.present.clear()
        self.checks.dropped(entry)  # as the reader's _reject_whole_file does

    def chunk(self, index: int) -> bytes:
        return self.body[index * CHUNK : (index + 1) * CHUNK]

    def keep(self, index: int, data: bytes | None = None) -> bytes:
        """A fetch of chunk `index` kept its bytes (the right ones unless `data` says)."""
        data = self.chunk(index) if data is None else data
        with self.lock:
            self.present[index] = data
        return data

    def fetch(self, index: int, data: bytes | None = None) -> None:
        """Keep the chunk and tell the check, as `Reader._fetch_and_cache` does."""
        self.checks.chunk_cached(self.entry, index, self.keep(index, data))

    def fetch_all(self) -> None:
        for index in range(COUNT):
            self.fetch(index)

    def settled(self) -> None:
        assert self.checks.settled(WAIT)


@pytest.fixture
def chunks_of() -> Iterator[Callable[[int], Chunks]]:
    """Chunks of a file made from a seed; their check is closed at the end, whatever happens."""
    made: list[Chunks] = []

    def make(seed: int) -> Chunks:
        made.append(Chunks(body_of(seed)))
        return made[-1]

    yield make
    for chunks in made:
        chunks.gate.set()
        chunks.checks.close()


def body_of(seed: int) -> bytes:
    return random.Random(seed).randbytes(COUNT * CHUNK)


def with_byte_flipped(data: bytes, at: int = 17) -> bytes:
    flipped = bytearray(data)
    flipped[at] ^= 0xFF
    return bytes(flipped)


def test_all_chunks_at_hand_are_read_once_whatever_the_notices(
    chunks_of: Callable[[int], Chunks],
) -> None:
    chunks = chunks_of(1)
    # Every fetch kept its chunk before the first told the check: the late notices find
    # their chunks hashed already.
    kept = {index: chunks.keep(index) for index in range(COUNT)}
    for index in random.Random(2).sample(range(COUNT), COUNT):
        chunks.checks.chunk_cached(chunks.entry, index, kept[index])
    chunks.settled()
    assert chunks.rejected == []
    assert chunks.reads == Counter(range(COUNT))  # each once


def test_chunks_coming_one_by_one_move_the_check_on_and_a_wrong_file_is_rejected_once(
    chunks_of: Callable[[int], Chunks],
) -> None:
    chunks = chunks_of(3)
    for index in (1, 0, 3, 2, 4, 5, 7, 6):  # in the order a few fetches at once finish
        wrong = with_byte_flipped(chunks.chunk(5)) if index == 5 else None
        chunks.fetch(index, wrong)  # chunk 5 cannot be told wrong alone
        chunks.settled()
        assert chunks.rejected == [] or index == 6
    assert len(chunks.rejected) == 1
    assert "content hash" in chunks.rejected[0]
    assert chunks.entry.file_hash in chunks.rejected[0]
    assert chunks.reads == Counter(range(COUNT))


def test_a_chunk_fetched_again_with_the_same_bytes_needs_nothing_more(
    chunks_of: Callable[[int], Chunks],
) -> None:
    chunks = chunks_of(4)
    chunks.fetch_all()
    chunks.fetch(3)  # evicted, then fetched again: the same bytes
    chunks.settled()
    assert chunks.rejected == []
    assert chunks.reads == Counter(range(COUNT))


def test_a_chunk_fetched_again_with_other_bytes_rejects_the_file_even_after_it_passed(
    chunks_of: Callable[[int], Chunks],
) -> None:
    chunks = chunks_of(5)
    chunks.fetch_all()
    chunks.settled()
    assert chunks.rejected == []
    chunks.fetch(3, with_byte_flipped(chunks.chunk(3)))  # evicted, fetched again: other bytes
    chunks.settled()
    assert len(chunks.rejected) == 1
    assert "chunk 3 came with other bytes" in chunks.rejected[0]


def test_a_chunk_found_with_other_bytes_than_its_fetch_brought_rejects_the_file(
    chunks_of: Callable[[int], Chunks],
) -> None:
    """An older copy put back over the fetched one (the cursor finds other bytes than the
    fetch told it about): two contents under one identity, though each may hash right alone."""
    chunks = chunks_of(6)
    chunks.fetch(2)  # ahead of the cursor: chunks 0 and 1 are not here yet
    chunks.keep(2, with_byte_flipped(chunks.chunk(2)))  # replaced by another copy
    chunks.fetch(0)
    chunks.fetch(1)
    chunks.settled()
    assert len(chunks.rejected) == 1
    assert "chunk 2 is cached with other bytes" in chunks.rejected[0]


def test_a_file_dropped_by_the_reader_is_checked_afresh_and_late_notices_are_ignored(
    chunks_of: Callable[[int], Chunks],
) -> None:
    """The reader dropped the file (its own check found it wrong) while this check had hashed
    part of it, wrongly, and had notices from before the drop still queued: neither may count
    against the right bytes fetched afterwards."""
    chunks = chunks_of(7)
    for index in range(4):
        chunks.fetch(index, with_byte_flipped(chunks.chunk(2)) if index == 2 else None)
    chunks.settled()
    chunks.gate.clear()  # the check is held as it reads chunk 4...
    chunks.fetch(4)
    assert chunks.held.wait(WAIT)
    # ... while a fetch from before the drop tells it about other bytes of chunk 5,
    chunks.fetch(5, with_byte_flipped(chunks.chunk(5)))
    with chunks.lock:  # and the reader drops the file,
        chunks.present.clear()
    chunks.checks.dropped(chunks.entry)
    chunks.fetch_all()  # which is fetched anew, all right.
    chunks.gate.set()
    chunks.settled()
    assert chunks.rejected == []
    # The check held at chunk 4 stopped there; the new one read every chunk once.
    assert chunks.reads == Counter(range(5)) + Counter(range(COUNT))
    # Checked afresh, whole: the new check knows the bytes of chunk 6 it hashed.
    chunks.fetch(6, with_byte_flipped(chunks.chunk(6)))
    chunks.settled()
    assert len(chunks.rejected) == 1
    assert "chunk 6 came with other bytes" in chunks.rejected[0]


def test_a_file_without_a_whole_content_hash_is_not_read(
    chunks_of: Callable[[int], Chunks],
) -> None:
    chunks = chunks_of(8)
    chunks.entry = ArtifactFileData("big.bin", "0123456789abcdef0123456789abcdef-3", "S3", 8000)
    chunks.fetch_all()
    chunks.settled()
    assert chunks.reads == Counter() and chunks.rejected == []
