"""What the cache and the whole-file checks know a file's bytes by."""

from __future__ import annotations

from artifactfs.entries import TYPE_GCS, ArtifactFileData
from artifactfs.verification import GCS_HASH_KEY

# (type, content identity, size): what caches and whole-file checks know a file's bytes by.
FileId = tuple[str, str, int]


def content_identity(entry: ArtifactFileData) -> str:
    """What names the entry's bytes in the cache and the checks: the tracked hash, where no two
    contents share one in practice (SHA-1, MD5, an ETag: the same file in two runs is then
    cached once). A 32-bit CRC32C (a GCS composite object) is shared by chance: one pair of
    objects of a size in ~4 billion, likely among ~100,000 equal-sized shards; one object would
    then be served the other's cached bytes, and pass the check. So such an entry is known by
    its object and generation as well."""
    if entry.type == TYPE_GCS and entry.metadata.get(GCS_HASH_KEY) == "crc32c":
        generation = entry.metadata.get("generation", "")
        return f"{entry.file_hash}\0{entry.source_url}\0{generation}"
    return entry.file_hash


def file_identity(entry: ArtifactFileData) -> FileId:
    return (entry.type, content_identity(entry), entry.size or 0)
