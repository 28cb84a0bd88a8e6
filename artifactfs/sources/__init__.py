"""Byte sources, picked by URL scheme (tracking) or entry type (reading back)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from artifactfs.entries import TYPE_GCS, TYPE_LOCAL, TYPE_S3, ArtifactFileData
from artifactfs.errors import ArtifactfsError
from artifactfs.sources.base import Source, has_wildcards, wildcards_refused

if TYPE_CHECKING:
    from artifactfs.verification import ContentCheck

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

_sources: dict[str, Source] = {}


def source_for_type(type_name: str) -> Source:
    """The process's source for an entry type: `Local`, `S3` or `GCS`."""
    if type_name not in _sources:
        if type_name == TYPE_LOCAL:
            from artifactfs.sources.local import LocalSource

            _sources[type_name] = LocalSource()
        elif type_name == TYPE_S3:
            from artifactfs.sources.s3 import S3Source

            _sources[type_name] = S3Source()
        elif type_name == TYPE_GCS:
            from artifactfs.sources.gcs import GCSSource

            _sources[type_name] = GCSSource()
        else:
            raise ArtifactfsError(f"unknown entry type {type_name!r}")
    return _sources[type_name]


def source_for_entry(entry: ArtifactFileData) -> Source:
    return source_for_type(entry.type)


def source_for_location(location: str) -> Source:
    """The source that tracks `location`: a path, `file://`, `s3://` or `gs://`."""
    if not location or not location.strip():
        raise ArtifactfsError("empty location: name a file, a directory, s3://... or gs://...")
    match = _SCHEME_RE.match(location)
    scheme = match.group(1).lower() if match else "file"
    if scheme == "file":
        return source_for_type(TYPE_LOCAL)
    bucket = location[len(match.group(0)) :].split("/", 1)[0] if match else ""
    if has_wildcards(bucket):  # never in a bucket's name: only a pattern has them there
        raise wildcards_refused(location)
    if scheme == "s3":
        return source_for_type(TYPE_S3)
    if scheme == "gs":
        return source_for_type(TYPE_GCS)
    raise ArtifactfsError(f"unsupported location scheme {scheme!r}: use a path, s3:// or gs://")


def content_problem(check: ContentCheck) -> str | None:
    """What is wrong with bytes checked whole (`check.problem()`). A process learns from an
    answer that an S3 object's ETag is not the MD5 of its bytes (SSE-KMS); one that has had
    none about it (its bytes came from the cache, or from a file downloaded before) asks the
    server (a HEAD, which says how the object is encrypted) before taking bytes that fail
    their MD5 for changed ones."""
    problem = check.problem()
    if problem is None or check.entry.type != TYPE_S3:
        return problem
    try:
        source_for_entry(check.entry).check(check.entry)
    except ArtifactfsError:
        return problem  # changed, or not known now: the MD5's verdict stands
    return check.problem()  # None, with the right size, if its ETag was found to be no MD5


def reset_sources() -> None:
    """Drop the process's sources and their clients (tests that change the environment)."""
    _sources.clear()
    from artifactfs.sources import s3

    s3.reset_client()
    try:
        from artifactfs.sources import gcs

        gcs.reset_client()
    except ImportError:
        pass


__all__ = [
    "Source",
    "content_problem",
    "reset_sources",
    "source_for_entry",
    "source_for_location",
    "source_for_type",
]
