"""`ContentCheck` against each kind of tracked hash, with another library's hashes as the oracle
(google-crc32c for CRC32C, hashlib for MD5 and SHA-1), and the bytes fed in uneven pieces,
views among them, as the reader feeds them."""

from __future__ import annotations

import hashlib
import os

import google_crc32c
import pytest

from artifactfs.entries import TYPE_GCS, TYPE_LOCAL, TYPE_S3, ArtifactFileData
from artifactfs.verification import GCS_HASH_KEY, ContentCheck

CONTENT = os.urandom(3 * 1024 * 1024 + 12_345)  # a few 1 MiB blocks and a ragged end


def _entry(kind: str, content: bytes) -> ArtifactFileData:
    if kind == "gcs-crc32c":  # a composite GCS object: its only hash is a CRC32C
        crc = f"{google_crc32c.value(content):08x}"
        return ArtifactFileData("f", crc, TYPE_GCS, len(content), {GCS_HASH_KEY: "crc32c"})
    if kind == "gcs-md5":
        return ArtifactFileData("f", hashlib.md5(content).hexdigest(), TYPE_GCS, len(content))
    if kind == "s3-md5":
        return ArtifactFileData("f", hashlib.md5(content).hexdigest(), TYPE_S3, len(content))
    return ArtifactFileData("f", hashlib.sha1(content).hexdigest(), TYPE_LOCAL, len(content))


def _fed(entry: ArtifactFileData, content: bytes) -> str | None:
    """The verdict on `content` fed in pieces of 1 byte to 1 MiB, every other one a view."""
    check = ContentCheck(entry)
    view = memoryview(content)
    offset, step, as_view = 0, 1, True
    while offset < len(content):
        piece = view[offset : offset + step]
        check.update(piece if as_view else bytes(piece))
        offset, step, as_view = offset + len(piece), min(step * 7 + 1, 1024 * 1024), not as_view
    return check.problem()


KINDS = ["gcs-crc32c", "gcs-md5", "s3-md5", "local-sha1"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_tracked_bytes_pass(kind: str) -> None:
    entry = _entry(kind, CONTENT)
    assert ContentCheck(entry).checks_hash
    assert _fed(entry, CONTENT) is None


@pytest.mark.parametrize("kind", KINDS)
def test_one_flipped_byte_fails_naming_both_hashes(kind: str) -> None:
    entry = _entry(kind, CONTENT)
    flipped = bytearray(CONTENT)
    flipped[2 * 1024 * 1024 + 7] ^= 0x01
    other = _entry(kind, bytes(flipped)).file_hash
    assert _fed(entry, bytes(flipped)) == (f"content hash is {other}, tracked {entry.file_hash}")


def test_a_missing_byte_fails_on_size_first() -> None:
    entry = _entry("gcs-crc32c", CONTENT)
    assert _fed(entry, CONTENT[:-1]) == f"size is {len(CONTENT) - 1} bytes, tracked {len(CONTENT)}"
