"""Small S3 objects read together by tasks of a trio loop (the mount's), with no thread.

Why: a batch of prefetches read on a thread (`LeanGetter.read_many`) contends for the GIL
with the trio loop that serves FUSE, and every hand-off is a context switch. Measured on 2
cores, one program reading 3,000 files of 16 KiB through the mount: ~17.5 switches per file
and 920-1,140 files/s with batches on threads; the same GETs sent and read by tasks of the
loop, ~2.5 switches per file and 1,280-1,620 files/s (8 programs at once: 660-940 ->
920-1,460; runs interleaved, the ranges are this machine's noise).

What it shares with `s3_get`: the signed request (`LeanGetter.prepare`), the bucket's route
and the credentials (learnt or refreshed on a worker thread when that would block: botocore
prepares a GetObject, an STS call), the TLS context, and the check that an answer is of the
tracked object. It takes only answers that certainly are: a 200 or 206 with the tracked ETag
(and version), its Content-Length body read whole, within the time given. Anything else
(another status, ETag or version, a chunked answer, a connection that fails, the time
running out) leaves that entry None: the reader fetches it alone on a thread, the way that
retries and says what went wrong.

Connections are kept alive per loop run, per scheme, host and port (at most IDLE_CONNECTIONS
idle), one request at a time each. A kept-alive connection that the server closed while idle
fails before any byte of the answer: the GET goes once more on a new one. A connection that
failed, or was cut off mid-answer by the time limit, is closed, never reused.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from artifactfs.entries import ArtifactFileData
from artifactfs.sources.base import parse_bucket_url
from artifactfs.sources.s3_get import (
    CONNECT_TIMEOUT,
    LeanGetter,
    Route,
    identity_problem,
    note_encryption,
)

log = logging.getLogger(__name__)

IDLE_CONNECTIONS = 16  # two batches of eight at once, as the reader sends them
_MAX_HEAD = 64 * 1024  # an S3 answer's status line and headers are well under 2 KiB
_RECEIVE = 256 * 1024

# (scheme, host, port) -> connections kept alive, idle, of this loop run.
_Slot = tuple[str, str, int]
_IDLE: trio.lowlevel.RunVar[dict[_Slot, list[trio.abc.Stream]]] = trio.lowlevel.RunVar(
    "artifactfs_s3_idle_connections"
)


class _Unusable(Exception):
    """The answer cannot be taken: the entry is left to the reader."""


class _ClosedBeforeAnswer(_Unusable):
    """The connection ended before any byte of the answer (kept alive, closed by the server)."""


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    keep_alive: bool


async def read_many(
    getter: LeanGetter, entries: Sequence[ArtifactFileData], seconds: float
) -> list[bytes | None]:
    """Each entry whole, or None for one not read so (see the module's docstring), all within
    `seconds`: the GETs go out at once, each on a connection of its own."""
    results: list[bytes | None] = [None] * len(entries)
    with trio.move_on_after(seconds):
        await _settle_signing(getter, entries)
        async with trio.open_nursery() as nursery:
            for index, entry in enumerate(entries):
                nursery.start_soon(_read_into, getter, entry, results, index)
    return results


async def _settle_signing(getter: LeanGetter, entries: Sequence[ArtifactFileData]) -> None:
    """Learn the routes and refresh the credentials on a worker thread, where that blocks,
    so that signing the requests on the loop does not."""
    for bucket in {parse_bucket_url(entry.source_url, "s3")[0] for entry in entries}:
        if not getter.knows_route(bucket):
            await trio.to_thread.run_sync(getter.route, bucket)
    if getter.credentials_need_refresh():
        await trio.to_thread.run_sync(getter.refresh_credentials)


async def _read_into(
    getter: LeanGetter, entry: ArtifactFileData, results: list[bytes | None], index: int
) -> None:
    url = entry.source_url
    try:
        if not getter.knows_route(parse_bucket_url(url, "s3")[0]):
            return  # learning it failed just now: the reader's thread tries again, not the loop
        request = getter.prepare(entry, 0, entry.size or 0)
        if request is None:  # the bucket is boto3's
            return
        raw = _request_bytes(request.target, request.headers)
        for attempt in (1, 2):
            stream, reused = await _connection(getter, request.route)
            try:
                answer = await _exchange(stream, raw)
            except _ClosedBeforeAnswer:
                await trio.aclose_forcefully(stream)
                if attempt == 1 and reused:
                    log.debug("%s: kept-alive connection was closed, resending", url)
                    continue
                raise
            except BaseException:  # failed, or cut off by the time limit: never reused
                await trio.aclose_forcefully(stream)
                raise
            await _release(request.route, stream, answer.keep_alive)
            problem = identity_problem(
                entry,
                request.version,
                answer.headers.get("etag", ""),
                answer.headers.get("x-amz-version-id"),
            )
            if problem is not None:
                raise _Unusable(problem)
            note_encryption(entry, answer.headers.get("x-amz-server-side-encryption"))
            if len(answer.body) != (entry.size or 0):
                raise _Unusable(f"{len(answer.body)} bytes, tracked {entry.size}")
            results[index] = answer.body
            return
    except (_Unusable, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        log.debug("%s: not read on the loop: %s: %s", url, type(exc).__name__, exc)
    except Exception as exc:  # never the loop's end: the reader fetches it alone
        log.info("%s: not read on the loop: %s: %s", url, type(exc).__name__, exc)


def _request_bytes(target: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    lines.append("Accept-Encoding: identity")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _exchange(stream: trio.abc.Stream, raw: bytes) -> _Answer:
    """Send one GET and read its whole answer (a 200 or 206 with a Content-Length body)."""
    try:
        await stream.send_all(raw)
    except trio.BrokenResourceError as exc:  # a kept-alive connection the server closed
        raise _ClosedBeforeAnswer(str(exc)) from None
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > _MAX_HEAD:
            raise _Unusable("headers too long")
        try:
            data = await stream.receive_some(_RECEIVE)
        except trio.BrokenResourceError as exc:  # a reset before the answer: the same
            if buffer:
                raise
            raise _ClosedBeforeAnswer(str(exc)) from None
        if not data:
            if buffer:
                raise _Unusable("connection closed in the headers")
            raise _ClosedBeforeAnswer("connection closed before the answer")
        buffer += data
    status, headers, keep_alive = _parse_head(bytes(buffer[:end]))
    if status not in (200, 206):
        raise _Unusable(f"HTTP {status}")
    if "transfer-encoding" in headers:
        raise _Unusable("no Content-Length (Transfer-Encoding)")
    declared = headers.get("content-length", "")
    if not declared.isdigit():
        raise _Unusable(f"Content-Length {declared!r}")
    length = int(declared)
    body = buffer[end + 4 :]
    while len(body) < length:
        data = await stream.receive_some(max(_RECEIVE, length - len(body)))
        if not data:
            raise _Unusable(f"connection closed after {len(body)} of {length} bytes")
        body += data
    if len(body) > length:
        raise _Unusable("more bytes than Content-Length")
    return _Answer(status, headers, bytes(body), keep_alive)


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """Status, headers (names in lower case) and whether the connection stays open."""
    status_line, *lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _Unusable(f"not an HTTP/1 answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name.strip():
            raise _Unusable(f"malformed header line {line[:80]!r}")
        key = name.strip().lower().decode("latin-1")
        if key in headers:  # two ETags or lengths: which one? Nothing to take then.
            raise _Unusable(f"header {key} twice")
        headers[key] = value.strip().decode("latin-1")
    keep_alive = parts[0] == b"HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    return int(parts[1]), headers, keep_alive


# -- connections ---------------------------------------------------------------------------------


def _idle_connections() -> dict[_Slot, list[trio.abc.Stream]]:
    try:
        return _IDLE.get()
    except LookupError:  # the first connection of this loop run
        idle: dict[_Slot, list[trio.abc.Stream]] = {}
        _IDLE.set(idle)
        return idle


def _slot(route: Route) -> _Slot:
    return (route.scheme, route.hostname, route.port or (443 if route.scheme == "https" else 80))


async def _connection(getter: LeanGetter, route: Route) -> tuple[trio.abc.Stream, bool]:
    """A kept-alive connection to the route's host (True), else a new one (False)."""
    kept = _idle_connections().get(_slot(route))
    if kept:
        return kept.pop(), True
    scheme, host, port = _slot(route)
    with trio.fail_after(CONNECT_TIMEOUT):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if scheme == "https":
            context = await trio.to_thread.run_sync(getter.tls_context)  # may load the CA file
            secure = trio.SSLStream(stream, context, server_hostname=host, https_compatible=True)
            try:
                await secure.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stream = secure
    return stream, False


async def _release(route: Route, stream: trio.abc.Stream, keep_alive: bool) -> None:
    """Keep the connection for the next GET to its host, or close it."""
    kept = _idle_connections().setdefault(_slot(route), [])
    if keep_alive and len(kept) < IDLE_CONNECTIONS:
        kept.append(stream)
    else:
        await trio.aclose_forcefully(stream)
