"""Checking fetched bytes against what was tracked, wherever the tracked hash allows it.

Local entries carry a SHA-1, single-part S3 uploads an MD5 ETag, GCS objects an MD5 (or, for
composite objects, a CRC32C). A multipart ETag (`md5-N`) names no hash of the whole content:
for those only the size and the server-side identity check (If-Match) stand guard.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import crc32c

from artifactfs.entries import TYPE_GCS, TYPE_LOCAL, TYPE_S3, ArtifactFileData

_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")

GCS_HASH_KEY = "hash_algorithm"  # metadata key saying a GCS entry's hash is a CRC32C


class _Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


def _digest_for(entry: ArtifactFileData) -> _Digest | None:
    wanted = entry.file_hash.lower()
    if entry.type == TYPE_LOCAL and _SHA1_HEX.match(wanted):
        return hashlib.sha1()
    if entry.type == TYPE_S3 and _MD5_HEX.match(wanted):
        return hashlib.md5()
    if entry.type == TYPE_GCS:
        if entry.metadata.get(GCS_HASH_KEY) == "crc32c":
            return crc32c.CRC32CHash()
        if _MD5_HEX.match(wanted):
            return hashlib.md5()
    return None


class ContentCheck:
    """Feed it every byte of a file in order; `problem()` says what, if anything, is wrong."""

    def __init__(self, entry: ArtifactFileData) -> None:
        self.entry = entry
        self.length = 0
        self._digest = _digest_for(entry)

    @property
    def checks_hash(self) -> bool:
        return self._digest is not None

    def update(self, data: bytes | memoryview) -> None:
        self.length += len(data)
        if self._digest is not None:
            self._digest.update(data)  # hashlib and crc32c take views: no copy

    def problem(self) -> str | None:
        if self.entry.size is not None and self.length != self.entry.size:
            return f"size is {self.length} bytes, tracked {self.entry.size}"
        if self._digest is not None:
            actual = self._digest.hexdigest()
            if actual != self.entry.file_hash.lower():
                return f"content hash is {actual}, tracked {self.entry.file_hash}"
        return None
