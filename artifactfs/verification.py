"""Checking fetched bytes against what was tracked, wherever the tracked hash allows it.

Local entries carry a SHA-1, single-part S3 uploads an MD5 ETag, GCS objects an MD5 (or, for
composite objects, a CRC32C). A multipart ETag (`md5-N`) names no hash of the whole content:
for those only the size and the server-side identity check (If-Match) stand guard. Nor does
the ETag of an object encrypted with SSE-KMS, though it looks like an MD5: the answers to its
reads say so (`etag_is_not_md5`), and it is then checked as a multipart one is.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from typing import Protocol

import crc32c
from cachetools import LRUCache

from artifactfs.entries import TYPE_GCS, TYPE_LOCAL, TYPE_S3, ArtifactFileData

_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")

GCS_HASH_KEY = "hash_algorithm"  # metadata key saying a GCS entry's hash is a CRC32C


class _Digest(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


log = logging.getLogger(__name__)

# S3 objects (by URL and ETag) whose ETag is known not to be the MD5 of their bytes. Bounded
# (a daemon lives long): one let go costs a HEAD, the next time its bytes fail their MD5.
_etags_not_md5: LRUCache[tuple[str, str], bool] = LRUCache(maxsize=65_536)
_etags_lock = threading.Lock()


def etag_is_not_md5(entry: ArtifactFileData) -> None:
    """Say that this S3 entry's ETag is not the MD5 of its bytes: an answer to a read of it
    said it is encrypted with a KMS key, whose objects' ETags are not (AWS's documentation of
    the ETag). Without this, every read of such an object failed its content check."""
    key = (entry.source_url, entry.file_hash)
    with _etags_lock:
        known = _etags_not_md5.get(key, False)
        _etags_not_md5[key] = True
    if not known:
        log.info(
            "%s: encrypted with a KMS key: its ETag is not the MD5 of its bytes, which are "
            "checked by their size and the server's ETag checks only",
            entry.source_url,
        )


def _hash_known(entry: ArtifactFileData) -> bool:
    """Whether the entry's hash is still taken for a hash of its bytes."""
    if entry.type != TYPE_S3:
        return True
    with _etags_lock:
        return not _etags_not_md5.get((entry.source_url, entry.file_hash), False)


def _digest_for(entry: ArtifactFileData) -> _Digest | None:
    wanted = entry.file_hash.lower()
    if entry.type == TYPE_LOCAL and _SHA1_HEX.match(wanted):
        return hashlib.sha1()
    if entry.type == TYPE_S3 and _MD5_HEX.match(wanted) and _hash_known(entry):
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
        # Asked again: a read's answer may have said since that the hash is not one.
        return self._digest is not None and _hash_known(self.entry)

    def update(self, data: bytes | memoryview) -> None:
        self.length += len(data)
        if self._digest is not None:
            self._digest.update(data)  # hashlib and crc32c take views: no copy

    def problem(self) -> str | None:
        if self.entry.size is not None and self.length != self.entry.size:
            return f"size is {self.length} bytes, tracked {self.entry.size}"
        if self._digest is not None and _hash_known(self.entry):
            actual = self._digest.hexdigest()
            if actual != self.entry.file_hash.lower():
                return f"content hash is {actual}, tracked {self.entry.file_hash}"
        return None
