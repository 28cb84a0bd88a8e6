"""The interface every byte source implements: list a location, read tracked bytes back.

Reads are *conditional on the tracked identity*: a source either returns exactly the bytes it had
when the entry was tracked or raises `SourceChangedError`. Listing returns entries whose
`file_path` is relative to the location (callers add a destination prefix and validate).

Remote reads can be bounded as a whole, headers and body, by a `RequestDeadline` (below).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from artifactfs.entries import ArtifactFileData
from artifactfs.errors import ArtifactfsError, NotFoundError, TransientSourceError

STREAM_CHUNK = 1024 * 1024
# Seconds one `check` (`verify`) of a remote object may take, answer and all: a server that
# trickles its answer never trips a socket timeout, and `verify` must end.
CHECK_DEADLINE = 30.0

# Called with the number of files done so far (progress bars).
ProgressCallback = Callable[[int], None]

log = logging.getLogger(__name__)

# Shell wildcards, which `track` does not expand. A file or key may hold them in its name:
# a location that names one is tracked; these only explain a location where nothing is.
WILDCARDS = frozenset("*?[")


def has_wildcards(location: str) -> bool:
    return any(char in WILDCARDS for char in location)


def wildcards_refused(location: str) -> ArtifactfsError:
    return ArtifactfsError(f"wildcards are not supported: {location!r}; name a prefix instead")


def nothing_at(location: str) -> ArtifactfsError:
    """The error for a bucket location with no object at it or below it."""
    if has_wildcards(location):
        return wildcards_refused(location)
    return NotFoundError(f"no objects at {location}")


def parse_bucket_url(url: str, scheme: str) -> tuple[str, str]:
    """`s3://bucket/key` (or `gs://`) -> (bucket, key); key may be empty."""
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        raise ArtifactfsError(f"not a {prefix} URL: {url!r}")
    bucket, _, key = url[len(prefix) :].partition("/")
    if not bucket:
        raise ArtifactfsError(f"invalid URL {url!r}: no bucket")
    return bucket, key


def warn_object_is_also_a_folder(location: str) -> None:
    """`s3://b/data/tr` named an object that is also a folder (keys `data/tr/...`): the object
    is tracked, as named; say so, and how to track the folder instead."""
    log.warning(
        "%s is an object and also a folder: tracked the object; track %s/ for the folder",
        location,
        location,
    )


class Source(ABC):
    type_name: ClassVar[str]
    # Whether `read_many` reads several entries together (else it reads none).
    reads_many: ClassVar[bool] = False

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
    def check(self, entry: ArtifactFileData, stop: threading.Event | None = None) -> int:
        """Raise SourceChangedError unless the source still holds the tracked bytes; their
        size (known so, where the entry has none: an imported one may not). A check that
        reads the bytes gives up once `stop` is set (StoppedError); one request is bounded
        by its deadline instead."""

    def read_range(self, entry: ArtifactFileData, offset: int, length: int) -> bytes:
        return b"".join(self.open_stream(entry, offset, length))

    def read_many(self, entries: Sequence[ArtifactFileData]) -> list[bytes | None]:
        """Each entry whole, where the source reads several together cheaper than one by one;
        None for an entry not read so (failed, or not for that path): the caller reads it
        with `read_range`, which retries and says what went wrong. By default: none."""
        return [None] * len(entries)

    async def read_many_on_loop(
        self, entries: Sequence[ArtifactFileData], seconds: float
    ) -> list[bytes | None] | None:
        """`read_many` by tasks of the calling trio loop, within `seconds`, blocking neither
        the loop nor on a thread hand-off per request (the mount's prefetches); None when it
        cannot now: the caller then uses `read_many` on a thread. By default: None."""
        return None


# -- an overall deadline for the HTTP requests of one read --------------------------------------
#
# Socket timeouts bound each wait for a byte, not a whole answer: a server that trickles one
# byte every few seconds (in the headers or in the body) never trips them, and a read on top
# of it would never end. A `RequestDeadline` bounds everything the HTTP requests of one thread
# do between `with` and its end: when it passes, the connections those requests use are shut
# down, which wakes any read blocked on them at once, and any later request in the scope fails
# before it is sent. A read cut off this way ends in an error, or in an answer that looks
# short or even whole (http.client takes the end of the stream for the end of the headers):
# the sources trust no answer that ends after the deadline (`check_deadline`). The S3 and GCS
# sources make their clients' connections report to the scope (`watched_pool_classes`,
# `watched_connection_class`); the reader opens one scope per chunk fetch.

_scope = threading.local()
_OWNER = "_artifactfs_deadline"  # on a connection: the scope whose request uses it now
# One lock for every scope: a connection changes hands (back to its pool, then to another
# thread's request) between scopes, and a scope must never shut down one it no longer owns.
_watch_lock = threading.Lock()


class DeadlinePassedError(TimeoutError):
    """Raised for a request started after its scope's deadline (an OSError, as HTTP clients
    expect of a connection that fails)."""


class RequestDeadline:
    """`with RequestDeadline(seconds, url):` every HTTP request this thread makes inside is
    over, answer and all, `seconds` from now, or cut off then."""

    def __init__(self, seconds: float, url: str) -> None:
        self.seconds = seconds
        self.url = url
        self.expires_at = time.monotonic() + seconds
        # Connections used by requests in the scope, each with the socket its answer is read
        # from (None until the answer starts: a new connection connects as it sends).
        self._watched: list[tuple[Any, socket.socket | None]] = []
        self._expired = False
        self._ended = False
        self._outer: RequestDeadline | None = None

    def __enter__(self) -> RequestDeadline:
        self._outer = current_deadline()
        _scope.deadline = self
        _watchdog.add(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _scope.deadline = self._outer
        with _watch_lock:
            # From here on the connections may serve other requests: never touch them again.
            self._ended = True
            self._watched.clear()
        _watchdog.ended()

    @property
    def expired(self) -> bool:
        return self._expired or time.monotonic() >= self.expires_at

    def remaining(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())

    def message(self) -> str:
        return f"{self.url}: no complete answer within the {self.seconds:.0f}s read deadline"

    def check(self) -> None:
        """Between pieces of a body: raise TransientSourceError once the deadline passed."""
        if self.expired:
            raise TransientSourceError(self.message())

    def watch(self, connection: Any) -> None:
        """Called by a watched connection as a request on it starts, in the requesting thread."""
        with _watch_lock:
            if self.expired:  # by the clock too: the watchdog may not have come round yet
                raise DeadlinePassedError(self.message())
            setattr(connection, _OWNER, self)
            self._watched.append((connection, None))

    def watch_answer(self, connection: Any) -> None:
        """Called by a watched connection as its answer starts: the socket it is read from is
        kept, since http.client hands it over to the answer (the connection lets go of it)
        when the server says `Connection: close`."""
        sock = getattr(connection, "sock", None)
        with _watch_lock:
            if isinstance(sock, socket.socket):
                self._watched.append((connection, sock))

    def _expire(self) -> None:
        with _watch_lock:
            if self._ended:
                return
            self._expired = True
            for connection, sock in self._watched:
                # A connection that went back to its pool and now carries another thread's
                # request belongs to that thread's scope.
                if getattr(connection, _OWNER, None) is self:
                    _shut_down(sock if sock is not None else getattr(connection, "sock", None))


COMPACT_AFTER_ENDED = 1024


class _Watchdog:
    """One thread expires every scope at its deadline. A timer thread per scope would start a
    thread per chunk fetch: thousands a second when a program reads small files."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._pending: list[tuple[float, int, RequestDeadline]] = []  # a heap by deadline
        self._count = 0
        # About how many scopes in the heap have ended (one that ended after the watchdog
        # expired it is counted too, which only makes a compaction come sooner).
        self._ended = 0
        self._thread: threading.Thread | None = None

    def add(self, scope: RequestDeadline) -> None:
        with self._condition:
            self._count += 1
            heapq.heappush(self._pending, (scope.expires_at, self._count, scope))
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked
                self._thread = threading.Thread(
                    target=self._run, name="artifactfs-deadlines", daemon=True
                )
                self._thread.start()
            elif self._pending[0][2] is scope:
                self._condition.notify()  # the new scope ends first: wake up sooner

    def ended(self) -> None:
        """A scope ended (most do long before their deadlines). Ended scopes are dropped from
        the heap in bulk once they are most of it: thousands of fetches a second, each with a
        30 s deadline, would otherwise keep some 100,000 of them until their deadlines."""
        with self._condition:
            self._ended += 1
            if self._ended >= COMPACT_AFTER_ENDED and 2 * self._ended >= len(self._pending):
                self._pending = [item for item in self._pending if not item[2]._ended]
                heapq.heapify(self._pending)
                self._ended = 0

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending or self._pending[0][0] > time.monotonic():
                    timeout = self._pending[0][0] - time.monotonic() if self._pending else None
                    self._condition.wait(timeout)
                _, _, scope = heapq.heappop(self._pending)
                if scope._ended:
                    self._ended -= 1
            scope._expire()  # a no-op for a scope that has ended


_watchdog = _Watchdog()


def current_deadline() -> RequestDeadline | None:
    """The scope this thread is in, if any."""
    found: RequestDeadline | None = getattr(_scope, "deadline", None)
    return found


def within_current_deadline(seconds: float) -> float:
    """`seconds`, or less if this thread's scope ends sooner: a scope opened inside another
    (a check run by a read) must not outlast it."""
    outer = current_deadline()
    return seconds if outer is None else max(0.0, min(seconds, outer.remaining()))


def deadline_passed() -> bool:
    """Whether this thread's scope (if any) has passed its deadline."""
    deadline = current_deadline()
    return deadline is not None and deadline.expired


def check_deadline() -> None:
    """Raise TransientSourceError if this thread's scope (if any) has passed its deadline."""
    deadline = current_deadline()
    if deadline is not None:
        deadline.check()


def timeout_within_deadline(connect: float, read: float) -> tuple[float, float]:
    """Socket timeouts no longer than what is left of this thread's deadline (if any)."""
    deadline = current_deadline()
    if deadline is None:
        return connect, read
    left = max(0.1, deadline.remaining())
    return min(connect, left), min(read, left)


def _shut_down(sock: Any) -> None:
    if isinstance(sock, socket.socket):
        # socket.socket's own shutdown, also for an SSLSocket (whose override would drop its
        # SSL object under the reading thread): the reader gets EOF, then an error. A socket
        # closed meanwhile has no descriptor any more (-1): never someone else's.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def watched_pool_classes(classes: Mapping[str, type[Any]]) -> dict[str, type[Any]]:
    """urllib3 connection pool classes (scheme -> class) whose connections report each
    request to this thread's `RequestDeadline`: subclasses, so that botocore's and requests'
    own connection classes keep working as before."""
    return {scheme: _watched_pool(pool) for scheme, pool in classes.items()}


_watched_pools: dict[type[Any], type[Any]] = {}  # one subclass per pool class, made once
_watched_pools_lock = threading.Lock()


def _watched_pool(pool: type[Any]) -> type[Any]:
    if getattr(pool, "_artifactfs_watched", False):
        return pool
    with _watched_pools_lock:
        if pool not in _watched_pools:
            _watched_pools[pool] = type(
                f"Watched{pool.__name__}",
                (pool,),
                {
                    "ConnectionCls": watched_connection_class(pool.ConnectionCls),
                    "_artifactfs_watched": True,
                },
            )
        return _watched_pools[pool]


def watched_connection_class(base: type[Any]) -> type[Any]:
    """A subclass of an `http.client.HTTPConnection` class (urllib3's derive from it) whose
    requests report to this thread's `RequestDeadline`: when it passes, the connection's socket
    is shut down, waking a read blocked on it. Make it once per class: it is a new type."""

    def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = current_deadline()
        if deadline is not None:
            deadline.watch(self)
        return base.request(self, *args, **kwargs)

    def getresponse(self: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = current_deadline()
        if deadline is not None:
            deadline.watch_answer(self)
        return base.getresponse(self, *args, **kwargs)

    return type(
        f"Watched{base.__name__}", (base,), {"request": request, "getresponse": getresponse}
    )
