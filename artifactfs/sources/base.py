"""The interface every byte source implements: list a location, read tracked bytes back.

Reads are *conditional on the tracked identity*: a source either returns exactly the bytes it had
when the entry was tracked or raises `SourceChangedError`. Listing returns entries whose
`file_path` is relative to the location (callers add a destination prefix and validate).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

from artifactfs.entries import ArtifactFileData
from artifactfs.errors import ArtifactfsError

STREAM_CHUNK = 1024 * 1024

# Called with the number of files done so far (progress bars).
ProgressCallback = Callable[[int], None]


def parse_bucket_url(url: str, scheme: str) -> tuple[str, str]:
    """`s3://bucket/key` (or `gs://`) -> (bucket, key); key may be empty."""
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        raise ArtifactfsError(f"not a {prefix} URL: {url!r}")
    bucket, _, key = url[len(prefix) :].partition("/")
    if not bucket:
        raise ArtifactfsError(f"invalid URL {url!r}: no bucket")
    return bucket, key


class Source(ABC):
    type_name: ClassVar[str]

    @abstractmethod
    def list_location(
        self, location: str, on_progress: ProgressCallback | None = None
    ) -> Iterator[ArtifactFileData]:
        """Entries for the single file/object at `location`, or every one below it."""

    @abstractmethod
    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """The tracked bytes [offset, offset+length) in pieces; raises SourceChangedError."""

    @abstractmethod
    def check(self, entry: ArtifactFileData) -> None:
        """Raise SourceChangedError unless the source still holds the tracked bytes."""

    def read_range(self, entry: ArtifactFileData, offset: int, length: int) -> bytes:
        return b"".join(self.open_stream(entry, offset, length))
