"""Writing an artifact's files to a directory, every byte checked against the tracked hash.

Remote bytes come through the same chunk cache as the mount's (a file downloaded twice, or
downloaded and then read through a mount, is fetched once), unless another process (a
mount) uses that cache meanwhile: then through a temporary one beside it. Local files are
copied in place.

Paths from the store are validated again here: a store written by someone else must not make us
write outside the destination (no `..`, no absolute paths, no following a symlink that an
earlier file or an attacker planted inside the destination). Each file is written to a temporary
name beside its target and renamed into place only once its bytes check out; such names left by
a download killed mid-file are removed by the next download that writes into their directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from artifactfs.cache import CacheUnusableError, ChunkCache
from artifactfs.cache.location import DEFAULT_CACHE_SIZE, chunk_directory, parse_size
from artifactfs.entries import TYPE_LOCAL, ArtifactFileData, parse_time, path_problem
from artifactfs.errors import ArtifactfsError, CheckFailedError
from artifactfs.progress import progress_bar
from artifactfs.reader import Reader
from artifactfs.sources import content_problem, source_for_entry
from artifactfs.sources.local import local_path_of
from artifactfs.verification import ContentCheck
from artifactfs.worker_pool import map_interruptibly, raise_if_stopped

log = logging.getLogger(__name__)

DOWNLOAD_WORKERS = 8


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask() sets process state, which threads must not race on.
_UMASK = _read_umask()


@dataclass
class DownloadReport:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def download_entries(
    entries: Sequence[ArtifactFileData],
    destination: str,
    *,
    symlink_local: bool = False,
    show_progress: bool | None = None,
) -> DownloadReport:
    """Fetch every entry below `destination`; raise CheckFailedError naming any that failed."""
    bad = [(e.file_path, problem) for e in entries if (problem := path_problem(e.file_path))]
    if bad:
        path, problem = bad[0]
        raise ArtifactfsError(f"refusing to download: invalid file path {path!r} ({problem})")
    root = os.path.realpath(os.path.expanduser(destination))  # `~/data`, as track takes it
    report = DownloadReport()
    created: set[str] = set()  # directories this download made, removed again if left empty
    with contextlib.ExitStack() as stack:
        remote = any(e.type != TYPE_LOCAL for e in entries)
        # The cache first: if it cannot be opened, nothing below DEST has been made yet.
        reader = stack.enter_context(_cached_reader()) if remote else None
        _make_directory(root, created)
        stack.callback(_remove_empty, created)
        total = sum(e.size or 0 for e in entries)
        stale = _StaleParts()

        bar = stack.enter_context(
            progress_bar(total, "downloading", unit="B", unit_scale=True, enabled=show_progress)
        )

        def download(entry: ArtifactFileData, stop: threading.Event) -> str | None:
            return _download_one(entry, root, created, stale, symlink_local, reader, stop)

        def record(entry: ArtifactFileData, outcome: str | None) -> None:
            bar.update(entry.size or 0)
            if outcome is None:
                report.written.append(entry.file_path)
            elif outcome == "unchanged":
                report.unchanged.append(entry.file_path)
            else:
                report.failed[entry.file_path] = outcome

        map_interruptibly(download, entries, DOWNLOAD_WORKERS, record)
    if report.failed:
        details = "; ".join(f"{path}: {why}" for path, why in sorted(report.failed.items()))
        raise CheckFailedError(f"download failed for {len(report.failed)} file(s): {details}")
    return report


def _make_directory(path: str, created: set[str]) -> None:
    """Make `path` and its missing parents, adding those made to `created`."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _make_directory(parent, created)
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise ArtifactfsError(f"{path} exists and is not a directory") from None
        return  # there before, or made meanwhile by another file's thread
    except OSError as exc:
        raise ArtifactfsError(f"cannot create directory {path}: {exc.strerror}") from None
    created.add(path)


def _remove_empty(created: set[str]) -> None:
    """Remove the directories this download made that hold nothing (every file in them
    failed): a download that writes nothing leaves DEST as it found it. Deepest first."""
    for path in sorted(created, key=lambda p: p.count(os.sep), reverse=True):
        with contextlib.suppress(OSError):  # not empty: it holds files written
            os.rmdir(path)


def _safe_target(root: str, file_path: str, created: set[str]) -> str:
    """The target path, with every parent created as a real directory inside root."""
    parts = file_path.split("/")
    current = root
    for part in parts[:-1]:
        current = os.path.join(current, part)
        if os.path.islink(current) or (os.path.exists(current) and not os.path.isdir(current)):
            raise ArtifactfsError(f"{current} exists and is not a directory")
        _make_directory(current, created)
    target = os.path.join(current, parts[-1])
    if os.path.commonpath([root, os.path.realpath(current)]) != root:
        raise ArtifactfsError(f"{file_path} would land outside {root}")
    if os.path.isdir(target) and not os.path.islink(target):
        raise ArtifactfsError(f"{target} exists and is a directory")
    return target


@contextlib.contextmanager
def _cached_reader() -> Iterator[Reader]:
    """A reader on the default cache, or on a temporary one while another process uses it;
    closed (its fetch threads ended, the cache let go, a temporary one removed) on exit."""
    directory, limit = chunk_directory(), parse_size(DEFAULT_CACHE_SIZE)
    with contextlib.ExitStack() as stack:
        try:
            cache = ChunkCache(directory, limit)
        except CacheUnusableError as exc:
            # Not the errors' advice (another --cache-dir): `download` has no such option.
            log.warning(
                "%s: downloading through a temporary cache (bytes cached there are fetched again)",
                exc.reason,
            )
            directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            scratch = tempfile.TemporaryDirectory(prefix="download-", dir=directory.parent)
            stack.enter_context(scratch)
            cache = ChunkCache(Path(scratch.name), limit)
        stack.callback(cache.close)
        reader = Reader(cache)
        stack.callback(reader.close)
        yield reader


def _download_one(
    entry: ArtifactFileData,
    root: str,
    created: set[str],
    stale: _StaleParts,
    symlink_local: bool,
    reader: Reader | None,
    stop: threading.Event,
) -> str | None:
    """None when written, 'unchanged' when already there, else why it failed (or that it was
    stopped: a Ctrl-C abandons a file under way, its temporary file removed)."""
    try:
        target = _safe_target(root, entry.file_path, created)
        stale.remove_from(os.path.dirname(target))
        if symlink_local and entry.type == TYPE_LOCAL:
            return _link_local(entry, target, stop)
        if _already_there(entry, target, stop):
            return "unchanged"
        _fetch_verified(entry, target, reader, stop)
        return None
    except ArtifactfsError as exc:
        return str(exc)
    except OSError as exc:
        return f"{exc.strerror or exc}"


def _already_there(entry: ArtifactFileData, target: str, stop: threading.Event) -> bool:
    if os.path.islink(target) or not os.path.isfile(target):
        return False
    if entry.size is not None and os.path.getsize(target) != entry.size:
        return False
    check = ContentCheck(entry)
    if not check.checks_hash:
        return False
    with open(target, "rb") as handle:
        while piece := handle.read(1024 * 1024):
            raise_if_stopped(stop)
            check.update(piece)
    return content_problem(check) is None


def _fetch_verified(
    entry: ArtifactFileData, target: str, reader: Reader | None, stop: threading.Event
) -> None:
    check = ContentCheck(entry)
    directory = os.path.dirname(target)
    fd, temp_path = tempfile.mkstemp(prefix=".artifactfs-", suffix=".part", dir=directory)
    try:
        # Locked until renamed (closing it lets go): a later download leaves it alone. On a
        # file system without locks, none: a later download then cannot lock it either.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(fd, "wb") as out:
            if reader is not None and entry.type != TYPE_LOCAL:
                pieces = reader.iter_file(entry)
            else:
                pieces = source_for_entry(entry).open_stream(entry)
            for piece in pieces:
                raise_if_stopped(stop)
                check.update(piece)
                out.write(piece)
            out.flush()
            problem = content_problem(check)
            if problem is not None:
                raise CheckFailedError(f"{entry.source_url}: {problem}")
            os.chmod(temp_path, 0o644 & ~_UMASK)
            _set_mtime(temp_path, entry)
            os.replace(temp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):  # renamed already: closing it failed
            os.unlink(temp_path)
        raise


class _StaleParts:
    """Removes, once per directory a download writes into, the temporary files that downloads
    killed mid-file (SIGKILL, a crash, the machine's OOM killer) left there: a download that
    completes leaves DEST holding the artifact's files, not those too. A download holds a lock
    on its temporary file until it is renamed (`flock`: of this host's processes, and of other
    hosts' on NFS), so a file that can be locked is no one's; a file made in the last second
    is left alone too (it is locked just after it is made)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def remove_from(self, directory: str) -> None:
        with self._lock:
            if directory in self._seen:
                return
            self._seen.add(directory)
        try:
            names = [name for name in os.listdir(directory) if _PART_NAME.match(name)]
        except OSError:
            return  # the write into it fails next, and says why
        for name in names:
            _remove_if_no_ones(os.path.join(directory, name))


_PART_NAME = re.compile(r"\.artifactfs-.*\.part\Z")
STALE_AFTER = 1.0  # seconds since a temporary file was last written before it may be no one's


def _remove_if_no_ones(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # gone meanwhile, or not a file of ours (a link, say)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or time.time() - info.st_mtime < STALE_AFTER:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # a download is writing it
        with contextlib.suppress(OSError):  # renamed or removed meanwhile
            os.unlink(path)
    finally:
        os.close(fd)


def _link_local(entry: ArtifactFileData, target: str, stop: threading.Event) -> str | None:
    source = source_for_entry(entry)
    source.check(entry, stop)
    if os.path.lexists(target):
        os.unlink(target)
    os.symlink(local_path_of(entry.source_url), target)
    return None


def _set_mtime(path: str, entry: ArtifactFileData) -> None:
    when = parse_time(entry.metadata.get("last_modified"))
    if when is not None:
        os.utime(path, (when.timestamp(), when.timestamp()))
