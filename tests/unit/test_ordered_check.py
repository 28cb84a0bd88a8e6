"""OrderedChecks on its own: chunks fetched and kept as a reader does, no cache, no server.

What a user of a large file relies on: a wrong file is found and rejected once, a right one
never is; and the check reads each chunk it finds once, however late and in whatever order the
fetches tell it, unless a chunk it already hashed is fetched again.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter

from artifactfs.entries import ArtifactFileData
from artifactfs.ordered_check import OrderedChecks

CHUNK = 1000
COUNT = 8
WAIT = 10.0


class Chunks:
    """The chunks a reader has at hand, and what the check did with them."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.present: dict[int, bytes] = {}
        self.reads: Counter[int] = Counter()  # chunks found and given to the check
        self.rejected: list[str] = []
        self.lock = threading.Lock()

    def bytes_of(self, entry: ArtifactFileData, index: int) -> bytes | None:
        with self.lock:
            data = self.present.get(index)
            if data is not None:
                self.reads[index] += 1
            return data

    def fetch(self, checks: OrderedChecks, index: int, data: bytes | None = None) -> int:
        """Fetch chunk `index` (absent now) and keep it, as the reader does; returns the
        number to tell the check with."""
        with self.lock:
            assert index not in self.present
        number = checks.fetch_starting()
        with self.lock:
            self.present[index] = (
                self.body[index * CHUNK : (index + 1) * CHUNK] if data is None else data
            )
        return number

    def reject(self, entry: ArtifactFileData, problem: str) -> None:
        self.rejected.append(problem)

    def checks(self) -> OrderedChecks:
        return OrderedChecks(lambda entry: COUNT, self.bytes_of, self.reject)


def s3_entry(body: bytes) -> ArtifactFileData:
    return ArtifactFileData(
        "big.bin", hashlib.md5(body).hexdigest(), "S3", len(body), {"location": "s3://b/big.bin"}
    )


def body_of(seed: int) -> bytes:
    return random.Random(seed).randbytes(COUNT * CHUNK)


def test_all_chunks_at_hand_are_read_once_whatever_the_notices() -> None:
    body = body_of(1)
    chunks = Chunks(body)
    checks = chunks.checks()
    try:
        # Every fetch has kept its chunk before the first tells the check: the others' late
        # notices find their chunks hashed already.
        numbers = {index: chunks.fetch(checks, index) for index in range(COUNT)}
        for index in random.Random(2).sample(range(COUNT), COUNT):
            checks.chunk_cached(s3_entry(body), index, numbers[index])
        assert checks.settled(WAIT)
    finally:
        checks.close()
    assert chunks.rejected == []
    assert chunks.reads == Counter(range(COUNT))  # each once


def test_chunks_coming_one_by_one_move_the_check_on_and_a_wrong_file_is_rejected_once() -> None:
    body = body_of(3)
    served = bytearray(body)
    served[5 * CHUNK + 17] ^= 0xFF  # one chunk of other bytes
    chunks = Chunks(bytes(served))
    checks = chunks.checks()
    entry = s3_entry(body)
    try:
        for index in (1, 0, 3, 2, 4, 5, 7, 6):  # in the order a few fetches at once finish
            checks.chunk_cached(entry, index, chunks.fetch(checks, index))
            assert checks.settled(WAIT)
            assert chunks.rejected == [] or index == 6
    finally:
        checks.close()
    assert len(chunks.rejected) == 1
    assert "content hash" in chunks.rejected[0] and entry.file_hash in chunks.rejected[0]
    assert chunks.reads == Counter(range(COUNT))


def test_a_chunk_fetched_again_after_it_was_hashed_starts_the_check_over() -> None:
    body = body_of(4)
    chunks = Chunks(body)
    checks = chunks.checks()
    entry = s3_entry(body)
    try:
        numbers = [chunks.fetch(checks, index) for index in range(COUNT)]
        checks.chunk_cached(entry, COUNT - 1, numbers[-1])
        assert checks.settled(WAIT)
        assert chunks.reads == Counter(range(COUNT)) and chunks.rejected == []
        with chunks.lock:  # chunk 3 evicted, then fetched again: other bytes this time
            del chunks.present[3]
        checks.chunk_cached(entry, 3, chunks.fetch(checks, 3, bytes(CHUNK)))
        assert checks.settled(WAIT)
    finally:
        checks.close()
    assert chunks.reads == Counter({index: 2 for index in range(COUNT)})
    assert len(chunks.rejected) == 1


def test_a_file_without_a_whole_content_hash_is_not_read() -> None:
    body = body_of(5)
    chunks = Chunks(body)
    checks = chunks.checks()
    multipart = ArtifactFileData("big.bin", "0123456789abcdef0123456789abcdef-3", "S3", len(body))
    try:
        numbers = [chunks.fetch(checks, index) for index in range(COUNT)]
        checks.chunk_cached(multipart, 0, numbers[0])
        assert checks.settled(WAIT)
    finally:
        checks.close()
    assert chunks.reads == Counter() and chunks.rejected == []
