"""File entries, the Neptune-compatible artifact hash, and path validation.

An artifact is an immutable list of `ArtifactFileData`. Its hash is SHA-256 over the entries
sorted by `file_path`, exactly as Neptune's client computed it, so hashes recorded there can be
checked against data tracked here. Paths are validated whenever they enter *or* leave the store:
a manifest written by someone else must never make us write or show anything outside the tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from artifactfs.errors import ArtifactfsError

# Neptune's timestamps (an entry's `last_modified`, a run's creation time), UTC here.
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def format_time(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime(TIME_FORMAT)


def parse_time(text: object) -> datetime | None:
    """The UTC time `text` says in TIME_FORMAT; None if it says none."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


TYPE_LOCAL = "Local"
TYPE_S3 = "S3"
TYPE_GCS = "GCS"
KNOWN_TYPES = (TYPE_LOCAL, TYPE_S3, TYPE_GCS)

MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 4096


class InvalidPathError(ArtifactfsError):
    """A file path that could escape the artifact tree or cannot exist on a POSIX system."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"invalid file path {path!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ArtifactFileData:
    """One file of an artifact, with the attributes of Neptune's class of the same name."""

    file_path: str
    file_hash: str
    type: str
    size: int | None
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file_path": self.file_path,
            "file_hash": self.file_hash,
            "type": self.type,
            "size": self.size,
            "metadata": dict(self.metadata),
        }

    @property
    def source_url(self) -> str:
        """Where the bytes live: `file:///abs`, `s3://b/k` or `gs://b/k`."""
        return self.metadata.get("file_path") or self.metadata.get("location", "")

    def with_path(self, file_path: str) -> ArtifactFileData:
        return ArtifactFileData(file_path, self.file_hash, self.type, self.size, self.metadata)

    def with_size(self, size: int) -> ArtifactFileData:
        return ArtifactFileData(self.file_path, self.file_hash, self.type, size, self.metadata)


def path_problem(path: str) -> str | None:
    """Why `path` is not a safe relative POSIX path inside a tree, or None if it is."""
    if not isinstance(path, str):
        return "not a string"
    if path == "":
        return "empty path"
    if "\x00" in path:
        return "contains a NUL byte"
    if path.startswith("/"):
        return "absolute path"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return f"longer than {MAX_PATH_BYTES} bytes"
    for segment in path.split("/"):
        if segment == "":
            return "empty path segment"
        if segment in (".", ".."):
            return f"'{segment}' segment"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"a segment is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def validate_path(path: str) -> str:
    """Return `path` unchanged if it is safe, else raise InvalidPathError naming the reason."""
    problem = path_problem(path)
    if problem is not None:
        raise InvalidPathError(path, problem)
    return path


def normal_destination(destination: str | None) -> str | None:
    """`destination` as Neptune's client made it with pathlib: `.` and empty segments dropped
    (`./a//b/` is `a/b`; `.`, `./` and `""` are no prefix). A leading `/` stays, to be refused;
    so does `..`."""
    if destination is None or destination.startswith("/"):
        return destination
    kept = [part for part in destination.split("/") if part not in ("", ".")]
    return "/".join(kept) or None


def join_destination(destination: str | None, path: str) -> str:
    """Prefix `path` with `destination` (`x/y`), validating both."""
    if not destination:
        return validate_path(path)
    prefix = destination.rstrip("/")  # `x/y/` means `x/y`; a leading '/' stays and is refused
    validate_path(prefix)
    return validate_path(f"{prefix}/{path}")


def find_file_dir_conflict(paths: Iterable[str]) -> tuple[str, str] | None:
    """A pair (file, file_below_it) if some path is both a file and a directory, else None."""
    all_paths = set(paths)
    for path in all_paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            ancestor = "/".join(parts[:depth])
            if ancestor in all_paths:
                return ancestor, path
    return None


def artifact_id(entries: Iterable[ArtifactFileData]) -> str:
    """The store's key for an artifact: like its hash, but over metadata too.

    Two trees with the same content at different places (or times) share an artifact hash,
    yet their entries name different sources; they must not share stored entries.
    """
    digest = hashlib.sha256()
    for entry in sorted(entries, key=_by_path):
        digest.update(_id_part(entry))
    return digest.hexdigest()


def artifact_hash(entries: Iterable[ArtifactFileData]) -> str:
    """SHA-256 hex over the entries sorted by file_path, metadata excluded (Neptune's formula)."""
    digest = hashlib.sha256()
    for entry in sorted(entries, key=_by_path):
        digest.update(_hash_part(entry))
    return digest.hexdigest()


def artifact_id_and_hash(entries: Iterable[ArtifactFileData]) -> tuple[str, str]:
    """Both of the above in one pass (one sort), for storing a new artifact."""
    id_digest, hash_digest = hashlib.sha256(), hashlib.sha256()
    for entry in sorted(entries, key=_by_path):
        id_digest.update(_id_part(entry))
        hash_digest.update(_hash_part(entry))
    return id_digest.hexdigest(), hash_digest.hexdigest()


def _by_path(entry: ArtifactFileData) -> str:
    return entry.file_path


def _id_part(e: ArtifactFileData) -> bytes:
    # repr() of str, int and None is unambiguous and never holds a raw newline; it is also
    # several times faster than JSON, which matters when re-tracking large trees.
    fields = (e.file_path, e.file_hash, e.type, e.size, tuple(sorted(e.metadata.items())))
    return repr(fields).encode("utf-8", "surrogateescape") + b"\n"


def _hash_part(entry: ArtifactFileData) -> bytes:
    # Neptune counts characters, not UTF-8 bytes; keep that for compatible hashes.
    path = entry.file_path
    size = b"" if entry.size is None else entry.size.to_bytes(8, "big")
    return b"".join(
        (
            b"#",
            len(path).to_bytes(4, "big"),
            path.encode("utf-8"),
            b"#",
            entry.file_hash.encode("utf-8"),
            b"#",
            size,
            b"#",
            len(entry.type).to_bytes(4, "big"),
            entry.type.encode("utf-8"),
        )
    )
