"""Local files: SHA-1 hashes (with a size+mtime hash cache), read in place."""

from __future__ import annotations

import functools
import hashlib
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO, ClassVar

from artifactfs.entries import TYPE_LOCAL, ArtifactFileData
from artifactfs.errors import ArtifactfsError, NotFoundError, SourceChangedError
from artifactfs.hashcache import FileKey, HashCache
from artifactfs.sources.base import STREAM_CHUNK, ProgressCallback, Source

_HASH_WORKERS = min(8, (os.cpu_count() or 1) * 2)
_HASH_BATCH = 64


def local_path_of(location: str) -> str:
    """`file:///abs/path` or a plain path, as an absolute path (symlinks kept)."""
    if location.startswith("file://"):
        location = location[len("file://") :]
        if not location.startswith("/"):
            raise ArtifactfsError(
                f"invalid file URL {'file://' + location!r}: expected file:///abs"
            )
    return os.path.abspath(os.path.expanduser(location))


def format_mtime(seconds: float) -> str:
    return _format_whole_seconds(int(seconds))


@functools.lru_cache(maxsize=4096)
def _format_whole_seconds(seconds: int) -> str:
    # Files of one tree share few distinct mtimes: formatting each once saves real time.
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class _Found:
    rel_path: str
    abs_path: str
    size: int
    mtime_ns: int
    ctime_ns: int

    @property
    def key(self) -> FileKey:
        return (self.abs_path, self.size, self.mtime_ns, self.ctime_ns)


def _stat_key(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ctime_ns


def sha1_of_file(path: str) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(STREAM_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha1_batch(batch: list[_Found]) -> list[str]:
    return [sha1_of_file(item.abs_path) for item in batch]


class LocalSource(Source):
    type_name: ClassVar[str] = TYPE_LOCAL

    def __init__(self, hash_cache: HashCache | None = None) -> None:
        self._hash_cache = hash_cache

    @property
    def hash_cache(self) -> HashCache:
        if self._hash_cache is None:
            self._hash_cache = HashCache()
        return self._hash_cache

    # -- listing ----------------------------------------------------------------------------

    def list_location(
        self, location: str, on_progress: ProgressCallback | None = None
    ) -> Iterator[ArtifactFileData]:
        root = local_path_of(location)
        try:
            info = os.stat(root)
        except FileNotFoundError:
            if any(char in root for char in "*?["):
                raise ArtifactfsError(
                    f"wildcards are not supported: {location!r}; name a directory instead"
                ) from None
            raise NotFoundError(f"no such file or directory: {root}") from None
        except OSError as exc:
            raise ArtifactfsError(f"cannot read {root}: {exc.strerror}") from None
        if stat.S_ISREG(info.st_mode):
            single = _Found(os.path.basename(root), root, *_stat_key(info))
            found = [single]
            digest = self.hash_cache.lookup(single.key)
            remembered = {root: (*single.key[1:], digest)} if digest else {}
        elif stat.S_ISDIR(info.st_mode):
            found = list(_walk_files(root))
            remembered = self.hash_cache.lookup_under(root)
        else:
            raise ArtifactfsError(f"not a regular file or directory: {root}")
        return self._hashed(found, remembered, on_progress)

    def _hashed(
        self,
        found: list[_Found],
        remembered: dict[str, tuple[int, int, int, str]],
        on_progress: ProgressCallback | None,
    ) -> Iterator[ArtifactFileData]:
        hashes: dict[str, str] = {}
        to_hash: list[_Found] = []
        for item in found:
            known = remembered.get(item.abs_path)
            if known is not None and known[:3] == item.key[1:]:
                hashes[item.abs_path] = known[3]
            else:
                to_hash.append(item)
        done = len(hashes)
        if on_progress:
            on_progress(done)
        if to_hash:
            # hashlib releases the GIL while hashing: a few threads hash files in parallel.
            # Batches keep the per-file cost of a thread pool (a Future each) out of the loop.
            batches = [to_hash[i : i + _HASH_BATCH] for i in range(0, len(to_hash), _HASH_BATCH)]
            with ThreadPoolExecutor(_HASH_WORKERS) as pool:
                for batch, digests in zip(batches, pool.map(_sha1_batch, batches), strict=True):
                    for item, digest in zip(batch, digests, strict=True):
                        hashes[item.abs_path] = digest
                    done += len(batch)
                    if on_progress:
                        on_progress(done)
            self.hash_cache.remember((item.key, hashes[item.abs_path]) for item in to_hash)
        for item in found:
            yield ArtifactFileData(
                file_path=item.rel_path,
                file_hash=hashes[item.abs_path],
                type=TYPE_LOCAL,
                size=item.size,
                metadata={
                    "file_path": f"file://{item.abs_path}",
                    "last_modified": format_mtime(item.mtime_ns / 1e9),
                },
            )

    # -- reading ----------------------------------------------------------------------------

    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        path = local_path_of(entry.source_url)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except FileNotFoundError:
            raise SourceChangedError(entry.source_url, "file no longer exists") from None
        except OSError as exc:
            raise SourceChangedError(entry.source_url, f"cannot read: {exc.strerror}") from None
        return _read_pieces(handle, offset, length)

    def check(self, entry: ArtifactFileData) -> None:
        path = local_path_of(entry.source_url)
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise SourceChangedError(entry.source_url, "file no longer exists") from None
        except OSError as exc:
            raise SourceChangedError(entry.source_url, f"cannot read: {exc.strerror}") from None
        if entry.size is not None and info.st_size != entry.size:
            raise SourceChangedError(
                entry.source_url, f"size is {info.st_size} bytes, tracked {entry.size}"
            )
        key = (path, *_stat_key(info))
        digest = self.hash_cache.lookup(key)
        if digest is None:
            digest = sha1_of_file(path)
            self.hash_cache.remember([(key, digest)])
        if digest != entry.file_hash:
            raise SourceChangedError(
                entry.source_url, f"content hash is {digest}, tracked {entry.file_hash}"
            )


def _read_pieces(handle: BinaryIO, offset: int, length: int | None) -> Iterator[bytes]:
    with handle:
        handle.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            want = STREAM_CHUNK if remaining is None else min(STREAM_CHUNK, remaining)
            piece = handle.read(want)
            if not piece:
                return
            if remaining is not None:
                remaining -= len(piece)
            yield piece


def _walk_files(root: str) -> Iterator[_Found]:
    """Regular files below root: symlinked files followed, symlinked directories skipped."""

    def on_error(exc: OSError) -> None:
        raise ArtifactfsError(f"cannot list {exc.filename}: {exc.strerror}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        # Symlinked directories sit in dirnames and, with followlinks=False, are not entered.
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in sorted(filenames):
            abs_path = os.path.join(dirpath, name)
            try:
                info = os.stat(abs_path)
            except FileNotFoundError:
                raise ArtifactfsError(f"broken symbolic link: {abs_path}") from None
            if not stat.S_ISREG(info.st_mode):
                continue  # sockets, fifos, devices
            yield _Found(prefix + name, abs_path, *_stat_key(info))
