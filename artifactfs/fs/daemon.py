"""Mounting and unmounting: the daemon's life cycle, signals, logging, recovery of dead mounts.

`mount()` without foreground forks: the child mounts, then tells the parent through a pipe
that the mount is ready (or why it failed), so the command returns only once the mount point
works. SIGTERM and SIGINT end the FUSE loop and unmount promptly: requests still waiting on
a server after a short grace are abandoned. A mount whose daemon died (`kill -9`) is left
"disconnected" by the kernel; `unmount()` clears it with fusermount3, lazily if it has to
(only then: a live mount that is busy stays mounted). `unmount()` touches nothing but
artifactfs mounts.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from artifactfs.cache.location import (
    DEFAULT_CACHE_SIZE,
    chunk_directory,
    default_cache_dir,
    parse_size,
)
from artifactfs.errors import ArtifactfsError
from artifactfs.log_repeats import RepeatFilter, report_held_back
from artifactfs.reader import DEFAULT_DEADLINE, Reader

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
S3_WARM_WAIT = 1.0  # seconds the mount waits for its S3 client before it says ready

# A remote read's deadline (retries included) may be set from 1 s to an hour.
READ_DEADLINE_RANGE = (1.0, 3600.0)
# The remote fetch unit: smaller turns one read into thousands of requests and cache files,
# larger fetches far more than a small read needs.
CHUNK_SIZE_RANGE = (64 * 1024, 1024**3)
CHUNK_SIZE_TEXT = "from 64K to 1G, such as 8M"
FS_TYPE = "fuse.artifactfs"  # as /proc/mounts shows our mounts (subtype=artifactfs)
# After SIGTERM/SIGINT, requests in flight get this long to finish before they are abandoned
# (their worker threads cannot be interrupted) and the mount goes away.
STOP_GRACE = 1.0
# How long `unmount` waits for the mount point's statfs: a dead daemon's fails at once.
STAT_TIMEOUT = 3.0


def parse_read_deadline(text: str) -> float:
    """Seconds, such as `30` or `2.5`, within READ_DEADLINE_RANGE."""
    low, high = READ_DEADLINE_RANGE
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not low <= seconds <= high:  # also false for NaN
        raise ArtifactfsError(
            f"invalid read deadline {text!r}: seconds from {low:g} to {high:g}, such as 30"
        )
    return seconds


def parse_chunk_size(text: str) -> int:
    """Bytes, such as `8M`, within CHUNK_SIZE_RANGE."""
    size = parse_size(text)
    low, high = CHUNK_SIZE_RANGE
    if not low <= size <= high:
        raise ArtifactfsError(f"invalid chunk size ({size} bytes): {CHUNK_SIZE_TEXT}")
    return size


@dataclass
class MountOptions:
    mountpoint: str
    store_uri: str | None = None
    run_id: str | None = None
    field_path: str | None = None
    cache_dir: str | None = None
    cache_size: int = parse_size(DEFAULT_CACHE_SIZE)
    chunk_size: int = 8 * 1024 * 1024
    read_deadline: float = DEFAULT_DEADLINE
    allow_other: bool = False
    log_file: str | None = None

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()

    @property
    def resolved_log_file(self) -> Path:
        if self.log_file:
            return Path(self.log_file)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.abspath(self.mountpoint).strip("/"))
        return self.resolved_cache_dir / "logs" / f"mount-{name or 'root'}.log"


# -- /proc/mounts ----------------------------------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_types(target: str) -> list[str]:
    """Types of the file systems mounted at `target` (an absolute path), bottom first."""
    try:
        with open("/proc/mounts") as mounts:
            fields = [line.split() for line in mounts]
    except OSError:
        return ["unknown"] if os.path.ismount(target) else []
    return [f[2] for f in fields if len(f) > 2 and _unescape(f[1]) == target]


def resolve_mountpoint(mountpoint: str) -> str:
    """The absolute path as /proc/mounts names it: symlinks resolved, except for a path
    already in the table (resolving it stats the mount, which a stuck daemon never answers)."""
    path = os.path.abspath(mountpoint)
    return path if _mount_types(path) else os.path.realpath(path)


def mount_type(mountpoint: str) -> str | None:
    """The type of the file system mounted on top at `mountpoint`, None if none is."""
    types = _mount_types(resolve_mountpoint(mountpoint))
    return types[-1] if types else None


def is_mounted(mountpoint: str) -> bool:
    """Whether any file system is mounted at `mountpoint`."""
    return mount_type(mountpoint) is not None


def _daemon_dead(path: str) -> bool:
    """Whether the FUSE mount at `path` lost its daemon: the kernel answers ENOTCONN (or
    ECONNABORTED while it aborts). A daemon that does not answer in time is not dead.
    statfs, not stat: the kernel may answer a stat from its attribute cache."""
    outcome: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            outcome.append(0)
        except OSError as exc:
            outcome.append(exc.errno or 0)

    prober = threading.Thread(target=probe, name="artifactfs-stat", daemon=True)
    prober.start()
    prober.join(STAT_TIMEOUT)
    return bool(outcome) and outcome[0] in (errno.ENOTCONN, errno.ECONNABORTED)


def _check_mountpoint(mountpoint: str) -> str:
    path = resolve_mountpoint(mountpoint)
    # Before anything stats it: a dead daemon's mount point fails every stat (ENOTCONN).
    kind = mount_type(path)
    if kind is not None:
        if kind == FS_TYPE and _daemon_dead(path):
            raise ArtifactfsError(
                f"mount point {path} was left by a daemon that died: "
                f"run `artifactfs unmount {shlex.quote(path)}`"
            )
        raise ArtifactfsError(f"{path} is already a mount point: unmount it first")
    if not os.path.lexists(path):
        raise ArtifactfsError(f"mount point {path} does not exist: make the directory first")
    if not os.path.isdir(path):
        raise ArtifactfsError(f"mount point {path} is not a directory")
    if os.listdir(path):
        raise ArtifactfsError(f"mount point {path} is not empty")
    return path


# -- mounting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """A mount served by a daemon in the background."""

    mountpoint: str
    pid: int
    log_file: Path


def mount(options: MountOptions, foreground: bool) -> Started | None:
    """Mount; in the foreground, serve until unmounted (then None), else return once the
    daemon's mount is ready."""
    # Everything the daemon writes (cache, logs, hash cache) is private to the mounting user.
    os.umask(0o077)
    options.mountpoint = _check_mountpoint(options.mountpoint)
    _make_paths_absolute(options)
    if shutil.which("fusermount3") is None:
        raise ArtifactfsError("fusermount3 not found: install the 'fuse3' package")
    log_file = options.resolved_log_file
    try:  # here, where an error still reaches the user as one line
        log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as exc:
        raise ArtifactfsError(f"cannot write log file {log_file}: {exc.strerror or exc}") from exc
    if foreground:
        _configure_logging(log_file, also_stderr=True)
        _serve(options, ready_fd=None)
        return None
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        status = 0
        try:
            os.setsid()
            # As daemons do: the directory it was started from is not kept busy (its file
            # system could not be unmounted while the mount lived).
            os.chdir("/")
            _detach_stdio(log_file)
            _configure_logging(log_file, also_stderr=False)
            _serve(options, ready_fd=write_fd)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, ArtifactfsError) else repr(exc)
            log.error("mount failed: %s", message)
            _tell(write_fd, f"error {message}")
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    answer = _wait_for_answer(read_fd)
    if answer.startswith("ready"):
        return Started(options.mountpoint, pid, log_file)
    if not answer:
        answer = f"error the daemon exited before the mount was ready; see {log_file}"
    raise ArtifactfsError(answer.removeprefix("error "))


def _hide_command_line(mountpoint: str) -> None:
    """The daemon's line in `ps`, for as long as it runs: it was the command that started it,
    the store's URI (and any password in it) included, for every user of the host to read."""
    import setproctitle

    setproctitle.setproctitle(f"artifactfs: daemon of {mountpoint}")


def _make_paths_absolute(options: MountOptions) -> None:
    """The paths the daemon is given, made absolute where it was started: it works from `/`."""
    from artifactfs.store import resolve_store_uri  # here: SQLAlchemy, which the daemon needs

    options.store_uri = resolve_store_uri(options.store_uri)  # as `Store` would, from here
    if options.cache_dir:
        options.cache_dir = os.path.abspath(os.path.expanduser(options.cache_dir))
    if options.log_file:
        options.log_file = os.path.abspath(os.path.expanduser(options.log_file))


def _wait_for_answer(read_fd: int) -> str:
    import select

    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], READY_TIMEOUT)
        if not ready:
            return "error the daemon did not become ready in time"
        chunks.append(pipe.readline())
    return b"".join(chunks).decode("utf-8", "replace").strip()


def _tell(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (" ".join(message.split()) + "\n").encode("utf-8"))
        os.close(fd)
    except OSError:
        pass


def _detach_stdio(log_file: Path) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)


# The daemon's log lines repeated within seconds: counted, not written (`log_repeats`).
_REPEATS = RepeatFilter()


def _configure_logging(log_file: Path, also_stderr: bool) -> None:
    handlers: list[logging.Handler] = [logging.FileHandler(log_file)]
    if also_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.addFilter(_REPEATS)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    os.chmod(log_file, 0o600)


def _serve(options: MountOptions, ready_fd: int | None) -> None:
    """Build the file system, mount it, say so, and serve until unmounted or signalled."""
    _hide_command_line(options.mountpoint)
    import pyfuse3
    import trio

    from artifactfs.cache import ChunkCache
    from artifactfs.fs.fuse_ops import ArtifactOperations
    from artifactfs.fs.tree import Tree
    from artifactfs.store import Store

    # Importing boto3 and building its client takes ~0.3 s of CPU: done while the store and
    # cache open, and over before the mount says it is ready, so that it never competes with
    # the first reads (waited for at most S3_WARM_WAIT: a slow credentials chain, such as an
    # instance-metadata lookup off EC2, must not hold the mount).
    warming = threading.Thread(target=_warm_s3_client, name="artifactfs-s3-warm", daemon=True)
    warming.start()
    # A whole-store mount may start before anything is tracked (runs appear as they come);
    # a run's mount needs the run, so a store that is not there is not made for it.
    store = Store(options.store_uri, create=options.run_id is None)
    try:
        tree = Tree(store, options.run_id, options.field_path)
    except BaseException:
        store.close()
        raise
    cache = ChunkCache(chunk_directory(options.resolved_cache_dir), options.cache_size)
    reader = Reader(cache, chunk_size=options.chunk_size, deadline=options.read_deadline)
    operations = ArtifactOperations(tree, reader)

    fuse_options = set(pyfuse3.default_options)
    fuse_options |= {"fsname=artifactfs", "subtype=artifactfs", "ro"}
    if options.allow_other:
        fuse_options.add("allow_other")
    pyfuse3.init(operations, options.mountpoint, fuse_options)
    warming.join(S3_WARM_WAIT)
    log.info(
        "mounted %s (store %s, run %s, field %s, cache %s, limit %d bytes)",
        options.mountpoint,
        store.uri,
        options.run_id or "-",
        options.field_path or "-",
        cache.directory,
        options.cache_size,
    )
    _tell(ready_fd, "ready")
    session = _Session()
    try:
        trio.run(_main_loop, options.mountpoint, reader, session)
    finally:
        session.close()
        operations.prefetcher.close()
        reader.close()
        cache.close()
        store.close()
        report_held_back(_REPEATS)
        log.info("unmounted %s", options.mountpoint)


class _Session:
    """pyfuse3's session: closed, and the mount detached, once and as early as possible."""

    def __init__(self) -> None:
        self.open = True

    def close(self) -> None:
        import pyfuse3

        if self.open:
            self.open = False
            # Closes /dev/fuse (requests still unanswered fail) and detaches the mount.
            pyfuse3.close(unmount=True)


async def _main_loop(mountpoint: str, reader: Reader, session: _Session) -> None:
    import pyfuse3
    import trio

    from artifactfs.fs.loop_batches import LoopBatches

    # Prefetch batches are read on this loop, in a nursery of their own that the unmount
    # does not cancel: each ends within its time limit and tells its readers.
    async with trio.open_nursery() as batches:
        reader.batch_starter = LoopBatches(batches, trio.lowlevel.current_trio_token())
        try:
            async with trio.open_nursery() as nursery:
                serving = trio.CancelScope()
                nursery.start_soon(_stop_on_signal, serving)
                nursery.start_soon(trio.to_thread.run_sync, _raise_readahead, mountpoint)
                with serving:
                    await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            reader.batch_starter = None
            # Unmount now, not once the batches still under way have ended.
            session.close()


async def _stop_on_signal(serving: trio.CancelScope) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            # A request waiting on a worker thread (a read from a server that does not
            # answer) would hold the loop until its deadline: after a grace, abandon it.
            serving.deadline = trio.current_time() + STOP_GRACE
            return


def _warm_s3_client() -> None:
    """Importing boto3 and building its client: not on the first read's clock."""
    from artifactfs.sources.s3 import s3_client

    try:
        s3_client()
    except ArtifactfsError as exc:  # no credentials: only S3 reads will fail, and say so
        log.info("no S3 client yet: %s", exc)


def _raise_readahead(mountpoint: str) -> None:
    """1 MiB kernel read-ahead (libfuse's default is 128 KiB); root only, best effort."""
    try:
        device = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(path, "w") as handle:
            handle.write("1024")
    except OSError as exc:
        log.info("could not raise read-ahead: %s", exc)


# -- unmounting -------------------------------------------------------------------------------


def unmount(mountpoint: str) -> None:
    path = resolve_mountpoint(mountpoint)
    kind = mount_type(path)
    if kind is None:
        raise ArtifactfsError(f"{path} is not mounted")
    if kind != FS_TYPE:  # somebody else's file system: never ours to unmount
        raise ArtifactfsError(f"{path} is not an artifactfs mount ({kind}): not unmounting it")
    result = _fusermount("-u", path)
    if result.returncode == 0 or mount_type(path) != FS_TYPE:
        return
    # Only a dead daemon's mount is detached lazily: a live one that is busy stays mounted.
    if not _daemon_dead(path):
        detail = _last_line(result.stderr)
        if "busy" in detail.lower():
            detail = (
                "it is busy (a program has a file or its working directory in it): end that "
                f"program or leave the directory, or detach it now with `fusermount3 -uz "
                f"{shlex.quote(path)}` (it goes when the last user lets go)"
            )
        raise ArtifactfsError(f"cannot unmount {path}: {detail}")
    lazy = _fusermount("-u", "-z", path)
    if lazy.returncode != 0 and mount_type(path) == FS_TYPE:
        raise ArtifactfsError(f"cannot unmount {path}: {_last_line(lazy.stderr or result.stderr)}")


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["fusermount3", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise ArtifactfsError("fusermount3 not found: install the 'fuse3' package") from None


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "unknown error"
