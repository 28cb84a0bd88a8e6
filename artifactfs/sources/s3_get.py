"""The S3 reader's hot path: a conditional ranged GET, signed here and sent on `http.client`.

Why: reading many small files through the mount is bound by the CPU botocore spends on each
request, not by the network. Measured on a 2-core machine against `rclone serve s3` (1500 GETs
of 16 KiB): boto3 `get_object` ~550-730 GET/s (1 or 8 threads alike); botocore's own
AWSRequest + S3SigV4Auth + HTTP session ~1,070; a GET signed by hand (SigV4) on urllib3
~1,600-1,800; the same on `http.client.HTTPConnection`, one persistent connection per thread,
~2,100 (1 thread) to ~2,800-3,100 (8 threads). So `S3Source.read_range` sends its GET here.

What it takes from botocore, so that it goes where boto3 would and as the same identity:
- the credentials object of the process's client (refreshable ones refresh themselves in
  `get_frozen_credentials`, called for every request);
- per bucket, once: where to send and how to sign, from a GetObject that the client prepares
  and signs but never sends (its `before-send` event stops it): its URL, made by botocore's
  endpoint rules and addressing style (scheme, host, the path before the key), and the
  credential scope of its signature (region, service). Not from a presigned URL: botocore
  presigns S3 URLs with SigV2 unless the client is configured for s3v4, and says nothing then
  of how it signs real requests;
- TLS verification from the client's HTTP session (`AWS_CA_BUNDLE`, `verify=`).

What it leaves to botocore (the caller then uses boto3, `read_range` returns None): buckets
whose GET it cannot reproduce (not plain SigV4 for `s3`, `x-amz-` headers of botocore's own,
a proxy, a client certificate), and any answer it does not understand (a redirect to another
region, 400 AuthorizationHeaderMalformed, an unknown status): such a bucket is left to boto3
from then on, which follows redirects and learns regions. Listing, HEAD, `check` and streams
stay on boto3 too.

The request: `GET prefix + quote(key)` (`?versionId=` for a pinned version), signed over
Host, x-amz-date, x-amz-content-sha256 (of the empty body) and x-amz-security-token; Range,
If-Match and User-Agent are sent unsigned (SigV4 allows it). Some S3-compatible servers ignore
If-Match, so the answer's ETag (and version) are compared with the tracked ones as well.

Connections: one per thread per host and lane (`read_many` sends on several at once), reused;
each reports to the thread's `RequestDeadline` (`watched_connection_class`), so a stalled or
trickling server is cut off at the deadline as botocore's connections are. A connection that
failed is closed and dropped. A request on a reused connection that the server had closed
while idle fails before any answer byte: it is sent once more on a new connection. Other
failures are `TransientSourceError`s (the reader retries them within its deadline).

`ARTIFACTFS_S3_LEAN_GET=0` turns this path off (every read through boto3), for debugging.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import http.client
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from artifactfs.entries import ArtifactFileData
from artifactfs.errors import (
    AccessDeniedError,
    ArtifactfsError,
    ConnectFailedError,
    SourceChangedError,
    TransientSourceError,
    UnreadableSourceError,
)
from artifactfs.sources.base import (
    DeadlinePassedError,
    check_deadline,
    current_deadline,
    deadline_passed,
    parse_bucket_url,
    timeout_within_deadline,
    watched_connection_class,
)
from artifactfs.verification import etag_is_not_md5

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a GET's payload hash
ENV_SWITCH = "ARTIFACTFS_S3_LEAN_GET"
_MAX_ERROR_BODY = 64 * 1024  # an S3 error document is a few hundred bytes
_CODE_RE = re.compile(rb"<Code>([^<]{1,128})</Code>")
# Statuses whose code (the error document's, else the status) says what happened; any other
# status (301, 307, 400, ...) is for botocore to handle.
_MAPPED_STATUSES = frozenset({304, 403, 404, 412, 416, 429}) | frozenset(range(500, 600))


def lean_get_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def clean_etag(etag: str) -> str:
    return etag.strip().strip('"')


def identity_problem(
    entry: ArtifactFileData, version: str | None, etag: str, served_version: str | None
) -> str | None:
    """What says an answer is not of the tracked object (another ETag, another version; some
    servers ignore If-Match), or None when it is."""
    etag = clean_etag(etag)
    if etag != entry.file_hash:
        return f"object changed since it was tracked (ETag {etag})"
    if version is not None and served_version != version:
        return f"served version {served_version}, tracked {version}"
    return None


def note_encryption(entry: ArtifactFileData, encryption: str | None) -> None:
    """An answer's `x-amz-server-side-encryption`: an object encrypted with a KMS key
    (`aws:kms`, `aws:kms:dsse`) has an ETag that is not the MD5 of its bytes."""
    if encryption and encryption.startswith("aws:kms"):
        etag_is_not_md5(entry)


def expected_body_length(
    entry: ArtifactFileData, offset: int, length: int | None, status: int | None
) -> int | None:
    """How long a whole body of a 200/206 answer to a GET of [offset, offset+length) is:
    the range, within the tracked size; the whole object for a 200 or an unranged GET (as
    `S3Source._get` and `prepare` ask: no Range for an empty object); None when unknown."""
    size = entry.size
    ranged = size != 0 and (offset != 0 or length is not None)
    if status == 200 or not ranged:
        return size
    if length is None:
        return None if size is None else max(0, size - offset)
    return length if size is None else max(0, min(length, size - offset))


def error_for_code(url: str, code: str, detail: str, endpoint: str) -> ArtifactfsError:
    """What an S3 error code (or an HTTP status as a code) means for a read of tracked bytes:
    the one mapping for botocore's errors and for the answers read here. `endpoint`: where
    the request went, for an error that is most likely the setup's."""
    if code == "NoSuchBucket":
        return bucket_not_found(url, endpoint)
    if code in ("PreconditionFailed", "412", "NotModified", "304"):
        return SourceChangedError(url, "object changed since it was tracked")
    if code in ("NoSuchKey", "404", "NoSuchVersion", "NotFound"):
        return SourceChangedError(url, "object no longer exists")
    if code in ("InvalidRange", "416"):
        return SourceChangedError(url, "object is shorter than tracked")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return AccessDeniedError(url, f"access denied: {code}")
    return TransientSourceError(f"{url}: cannot read: {detail}")


def bucket_not_found(url: str, endpoint: str) -> UnreadableSourceError:
    """A bucket the endpoint does not have: a wrong endpoint more often than a deleted
    bucket, so a read fails for good but `verify` does not call the object changed."""
    bucket, _ = parse_bucket_url(url, "s3")
    return UnreadableSourceError(
        url, f"bucket {bucket} not found at {endpoint} (is AWS_ENDPOINT_URL right?)"
    )


# -- SigV4 ------------------------------------------------------------------------------------


def signing_key(secret_key: str, day: str, region: str) -> bytes:
    key = hmac.new(f"AWS4{secret_key}".encode(), day.encode(), hashlib.sha256).digest()
    for part in (region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign_get(
    *,
    host: str,
    path: str,
    query: str,
    region: str,
    access_key: str,
    token: str | None,
    amz_date: str,
    key: bytes,
) -> dict[str, str]:
    """The signed headers of a GET (Authorization included), for `key` =
    `signing_key(secret, amz_date[:8], region)`."""
    headers = {"host": host, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    canonical, names = canonical_request(path, query, headers)
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(
        ("AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    return headers


def canonical_request(path: str, query: str, headers: dict[str, str]) -> tuple[str, str]:
    """SigV4's canonical GET and its signed header names, for headers named in lower case and
    in sorted order. `path` and `query` are signed exactly as they are sent: already
    percent-encoded as botocore encodes them, and not normalized (S3 keeps `a//b`)."""
    names = ";".join(headers)
    lines = "".join(f"{name}:{value}\n" for name, value in headers.items())
    return f"GET\n{path}\n{query}\n{lines}\n{names}\n{EMPTY_SHA256}", names


# -- routes and connections -----------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where and how a bucket's GETs go, as botocore would send them."""

    scheme: str  # http | https
    hostname: str  # to connect to
    port: int | None
    host: str  # the Host header, signed: the netloc without a default port
    prefix: str  # the path before the quoted key: "/bucket/" (path style) or "/"
    region: str  # the signing region


@dataclass(frozen=True)
class SignedGet:
    """A signed GET of one entry's range, ready to send (`headers` without those any HTTP
    client adds: Accept-Encoding)."""

    entry: ArtifactFileData
    url: str
    bucket: str
    version: str | None
    route: Route
    target: str  # path and query
    headers: dict[str, str]
    offset: int = 0  # the range asked for: a body cut short is told by it
    length: int | None = None


PROBE_KEY = "k"
_AUTHORIZATION_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=[^/,\s]+/\d{8}/([^/,\s]+)/s3/aws4_request, SignedHeaders="
)
_OUR_AMZ_HEADERS = frozenset({"x-amz-date", "x-amz-content-sha256", "x-amz-security-token"})


def route_from_request(url: str, headers: Mapping[str, str | bytes]) -> Route | None:
    """The route of a GET of the key `PROBE_KEY` as botocore prepared and signed it; None
    unless it is one we can send the same: plain SigV4 for `s3` (not SigV4a, S3 Express or
    SigV2), no query, and no `x-amz-` header but those we send (a session token of S3
    Express, checksum mode, a request payer: botocore's business)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.path.endswith("/" + PROBE_KEY):
        return None
    if parts.query or "@" in parts.netloc or not parts.hostname:
        return None
    found = {name.lower(): _text(value) for name, value in headers.items()}
    if any(n.startswith("x-amz-") and n not in _OUR_AMZ_HEADERS for n in found):
        return None
    signed = _AUTHORIZATION_RE.match(found.get("authorization", ""))
    if signed is None:
        return None
    default_port = 443 if parts.scheme == "https" else 80
    host = parts.netloc
    if parts.port == default_port:
        host = host.rsplit(":", 1)[0]  # botocore signs the host without a default port
    prefix = parts.path[: -len(PROBE_KEY)]
    return Route(parts.scheme, parts.hostname, parts.port, host, prefix, signed.group(1))


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _Probed(Exception):
    """Stops a probe GetObject at `before-send`, carrying what botocore would have sent."""

    def __init__(self, url: str, headers: Mapping[str, str | bytes]) -> None:
        super().__init__(url)
        self.url = url
        self.headers = dict(headers)


class _TimedHTTPConnection(http.client.HTTPConnection):
    """`timeout` bounds the connect (and TLS handshake), `read_timeout` each wait after it."""

    read_timeout: float = READ_TIMEOUT

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _TimedHTTPSConnection(http.client.HTTPSConnection):
    read_timeout: float = READ_TIMEOUT

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


_Connection = _TimedHTTPConnection | _TimedHTTPSConnection
_HTTPConnection: type[_TimedHTTPConnection] = watched_connection_class(_TimedHTTPConnection)
_HTTPSConnection: type[_TimedHTTPSConnection] = watched_connection_class(_TimedHTTPSConnection)

# Failures that mean a reused connection had been closed by the server while idle, before it
# saw this request: the request may go once more, on a new connection. A reset while waiting
# for the answer counts too: the server's RST answers the request sent into a closed socket.
_STALE_ON_SEND = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_STALE_ON_ANSWER = (http.client.RemoteDisconnected, ConnectionResetError)
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


def _failed_to_connect(exc: BaseException) -> bool:
    """Whether no server took the connection: refused, no such host, unreachable, timed out.
    Not a TLS handshake that failed, nor a reset: a server answered those."""
    if isinstance(exc, ssl.SSLError):
        return False
    return isinstance(exc, (ConnectionRefusedError, socket.gaierror, TimeoutError)) or getattr(
        exc, "errno", None
    ) in (errno.EHOSTUNREACH, errno.ENETUNREACH)


def _cut_off_by_deadline(exc: BaseException) -> bool:
    """A request refused before it was sent because its deadline had passed (or a connect
    cut short by it): the deadline's failure, not the endpoint's."""
    return isinstance(exc, DeadlinePassedError) or deadline_passed()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class LeanGetter:
    """Signs and sends the reader's conditional ranged GETs for one boto3 S3 client."""

    def __init__(self, client: Any, credentials: Any) -> None:
        from artifactfs import __version__  # here: the package may still be importing above

        self._client = client
        self._user_agent = f"artifactfs/{__version__}"
        self._credentials = credentials
        self._lock = threading.Lock()
        self._routes: dict[str, Route | None] = {}  # bucket -> route, None: boto3's
        self._keys: dict[tuple[str, str, str], bytes] = {}  # (secret, day, region) -> key
        self._local = threading.local()  # .connections: (scheme, host, lane) -> connection
        self._tls: ssl.SSLContext | None = None
        self._probing = threading.local()  # .active: this thread's GetObject is a probe
        # Registered before the client is shared: a no-op for every GetObject but a probe.
        client.meta.events.register("before-send.s3.GetObject", self._stop_probe)

    # -- the request ---------------------------------------------------------------------------

    def read_range(self, entry: ArtifactFileData, offset: int, length: int) -> bytes | None:
        """The tracked bytes [offset, offset+length), or None when this request is for boto3.
        Raises SourceChangedError / TransientSourceError as `S3Source._get` does."""
        request = self.prepare(entry, offset, length)
        if request is None:
            return None
        connection, response = self._send(
            request.route, request.target, request.headers, request.url
        )
        return self._finish(request, connection, response)

    def read_many(self, entries: Sequence[ArtifactFileData]) -> list[bytes | None]:
        """Every entry whole, or None for one that failed or is not for this path (the caller
        reads those the usual way, which retries and tells what went wrong).

        All GETs are sent first, each on a connection of its own (this thread's lanes), and
        the answers read after, each as it starts to arrive: the server works on them together
        while this thread sends and parses, with no hand-off between threads, and one slow
        answer holds up no other. Measured against `rclone serve s3` on 2 cores, 16 KiB
        objects: ~4,400 GET/s from one thread in groups of 8, against ~2,600 from 8 threads
        of one GET each."""
        results: list[bytes | None] = [None] * len(entries)
        sent: list[tuple[int, SignedGet, _Connection]] = []
        for index, entry in enumerate(entries):
            request = self.prepare(entry, 0, entry.size or 0)
            if request is None:
                continue
            connection, _ = self._connection(request.route, lane=index)
            try:
                connection.request("GET", request.target, headers=request.headers)
            except Exception as exc:  # a kept-alive connection the server closed, say
                self._drop(connection)
                log.debug("%s: not sent with others: %s", entry.source_url, _describe(exc))
                continue
            sent.append((index, request, connection))
        for index, request, connection in self._as_answers_arrive(sent):
            try:
                response = connection.getresponse()
            except Exception as exc:
                self._drop(connection)
                log.debug("%s: no answer with others: %s", request.url, _describe(exc))
                continue
            try:
                results[index] = self._finish(request, connection, response)
            except ArtifactfsError as exc:
                log.debug("%s: read with others failed: %s", request.url, exc)
        return results

    def _as_answers_arrive(
        self, sent: list[tuple[int, SignedGet, _Connection]]
    ) -> Iterator[tuple[int, SignedGet, _Connection]]:
        """The sent requests, each once its answer has started to arrive (or its connection
        failed), until this thread's deadline (else READ_TIMEOUT) passes: those still silent
        then are closed and dropped, not waited for once more on a read."""
        waiting: dict[Any, tuple[int, SignedGet, _Connection]] = {}
        for item in sent:
            sock = item[2].sock
            if sock is None:  # not connected: its getresponse fails at once
                yield item
            else:
                waiting[sock] = item
        deadline = current_deadline()
        give_up = time.monotonic() + (deadline.remaining() if deadline else READ_TIMEOUT)
        try:
            while waiting:
                timeout = max(0.0, give_up - time.monotonic())
                try:
                    ready, _, _ = select.select(list(waiting), [], [], timeout)
                except (OSError, ValueError):  # a socket closed under us: read the rest in order
                    ready = list(waiting)
                if not ready:
                    break
                for sock in ready:
                    yield waiting.pop(sock)
        finally:  # also when the caller stops early: never keep a connection owing an answer
            for _, request, connection in waiting.values():
                log.debug("%s: no answer with others in time", request.url)
                self._drop(connection)

    def prepare(self, entry: ArtifactFileData, offset: int, length: int) -> SignedGet | None:
        """The signed GET of a range of the entry; None when its bucket is boto3's. May block
        the first time for a bucket (`route`) and when the credentials must be refreshed
        (`credentials_need_refresh`)."""
        url = entry.source_url
        bucket, key = parse_bucket_url(url, "s3")
        route = self.route(bucket)
        if route is None:
            return None
        version = entry.metadata.get("version_id")
        path = route.prefix + quote(key, safe="/~")  # what botocore sends for a key
        query = f"versionId={quote(version, safe='-_.~')}" if version else ""
        headers = self._sign(route, path, query)
        headers["If-Match"] = f'"{entry.file_hash}"'
        if entry.size != 0:  # a Range on an empty object is unsatisfiable (as in `_get`)
            headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        headers["User-Agent"] = self._user_agent
        target = f"{path}?{query}" if query else path
        return SignedGet(entry, url, bucket, version, route, target, headers, offset, length)

    def _finish(
        self, request: SignedGet, connection: _Connection, response: http.client.HTTPResponse
    ) -> bytes | None:
        """The answer's bytes (`_answer`); a connection whose answer was not read whole, or
        that failed, is closed and dropped, and so is the answer: after `Connection: close`
        the socket is the answer's, and one left to the garbage collector (an exception's
        traceback keeps it) would leave the server sending into it."""
        try:
            data = self._answer(request, response)
        except BaseException:
            response.close()
            self._drop(connection)
            raise
        if data is None:  # its answer was not read
            response.close()
            self._drop(connection)
        return data

    def _sign(self, route: Route, path: str, query: str) -> dict[str, str]:
        credentials = self._credentials.get_frozen_credentials()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        cache_key = (credentials.secret_key, amz_date[:8], route.region)
        with self._lock:
            key = self._keys.get(cache_key)
        if key is None:
            key = signing_key(*cache_key)
            with self._lock:
                if len(self._keys) > 64:  # days and rotated secrets pile up otherwise
                    self._keys.clear()
                self._keys[cache_key] = key
        return sign_get(
            host=route.host,
            path=path,
            query=query,
            region=route.region,
            access_key=credentials.access_key,
            token=credentials.token,
            amz_date=amz_date,
            key=key,
        )

    def _send(
        self, route: Route, target: str, headers: dict[str, str], url: str
    ) -> tuple[_Connection, http.client.HTTPResponse]:
        for attempt in (1, 2):
            connection, reused = self._connection(route)
            if connection.sock is None:
                self._connect(connection, route, url)
            stale: tuple[type[BaseException], ...] = _STALE_ON_SEND
            try:
                connection.request("GET", target, headers=headers)
                stale = _STALE_ON_ANSWER
                return connection, connection.getresponse()
            except _NETWORK_ERRORS as exc:
                self._drop(connection)
                # A connection shut down by the deadline fails the same way: never resend then.
                if attempt == 1 and reused and isinstance(exc, stale) and not deadline_passed():
                    log.debug("%s: kept-alive connection was closed, resending: %s", url, exc)
                    continue
                raise TransientSourceError(f"{url}: cannot read: {_describe(exc)}") from None
            except BaseException:
                self._drop(connection)
                raise
        raise AssertionError("unreachable")

    def _connect(self, connection: _Connection, route: Route, url: str) -> None:
        """Connect a new connection before its request (http.client would, as it sends), so
        that a failure to reach the server at all is told apart (`ConnectFailedError`) from a
        server that took the connection and then closed or reset it."""
        try:
            connection.connect()
        except _NETWORK_ERRORS as exc:
            self._drop(connection)
            if _failed_to_connect(exc) and not _cut_off_by_deadline(exc):
                endpoint = f"{route.scheme}://{route.host}"
                raise ConnectFailedError(
                    f"{url}: cannot reach {endpoint}: {_describe(exc)}", endpoint
                ) from None
            raise TransientSourceError(f"{url}: cannot read: {_describe(exc)}") from None
        except BaseException:
            self._drop(connection)
            raise

    def _answer(self, request: SignedGet, response: http.client.HTTPResponse) -> bytes | None:
        """The body of a 200/206 that is the tracked object, the error another answer means,
        or None for an answer left to botocore (the bucket is then boto3's from now on)."""
        entry, bucket, version = request.entry, request.bucket, request.version
        url = entry.source_url
        status = response.status
        # Cut off in its headers, an answer can look whole (http.client takes the end of the
        # stream for the end of the headers): nothing in it can be trusted.
        check_deadline()
        if status in (200, 206):
            problem = identity_problem(
                entry,
                version,
                response.getheader("ETag", ""),
                response.getheader("x-amz-version-id"),
            )
            if problem is not None:
                raise SourceChangedError(url, problem)
            note_encryption(entry, response.getheader("x-amz-server-side-encryption"))
            try:
                data = response.read()  # http.client raises IncompleteRead on a short body
            except _NETWORK_ERRORS as exc:  # reset, cut short or cut off mid-body
                raise TransientSourceError(f"{url}: read interrupted: {_describe(exc)}") from None
            check_deadline()  # cut off by the deadline, a body may look whole: never trust it
            declared = response.getheader("Content-Length")
            if declared is not None and declared.isdigit() and len(data) != int(declared):
                raise TransientSourceError(
                    f"{url}: read interrupted: {len(data)} of {declared} bytes"
                )
            # Without a Content-Length (`Connection: close`), a body cut short just ends.
            expected = expected_body_length(entry, request.offset, request.length, status)
            if declared is None and expected is not None and len(data) < expected:
                raise TransientSourceError(
                    f"{url}: read interrupted: {len(data)} of {expected} bytes"
                )
            return data
        if status in _MAPPED_STATUSES:
            try:
                body = response.read(_MAX_ERROR_BODY)
            except _NETWORK_ERRORS as exc:
                raise TransientSourceError(f"{url}: cannot read: {_describe(exc)}") from None
            check_deadline()
            found = _CODE_RE.search(body)
            code = found.group(1).decode("utf-8", "replace") if found else str(status)
            raise error_for_code(url, code, f"{code} (HTTP {status})", self.endpoint())
        # A redirect to the bucket's region, a malformed-authorization 400, something new:
        # botocore knows what to do, for this request and the bucket's next ones.
        log.info("%s: HTTP %d to a signed GET: this bucket is read through boto3", url, status)
        with self._lock:
            self._routes[bucket] = None
        return None

    def endpoint(self) -> str:
        """The endpoint the client was set up with (`AWS_ENDPOINT_URL`, else AWS's)."""
        return str(self._client.meta.endpoint_url)

    def credentials_need_refresh(self) -> bool:
        """Whether signing would first refresh the credentials (a blocking call: an STS or
        instance-metadata request). Static credentials never need it."""
        refresh_needed = getattr(self._credentials, "refresh_needed", None)
        return bool(refresh_needed()) if callable(refresh_needed) else False

    def refresh_credentials(self) -> None:
        self._credentials.get_frozen_credentials()

    # -- connections ---------------------------------------------------------------------------

    def _connection(self, route: Route, lane: int = 0) -> tuple[_Connection, bool]:
        """This thread's connection to the route's host in `lane` (`read_many` sends on
        several at once), and whether it was used before (is connected now); its timeouts
        set to what is left of the thread's deadline."""
        connections: dict[tuple[str, str, int], _Connection] | None = getattr(
            self._local, "connections", None
        )
        if connections is None:
            connections = self._local.connections = {}
        connect_timeout, read_timeout = timeout_within_deadline(CONNECT_TIMEOUT, READ_TIMEOUT)
        slot = (route.scheme, route.host, lane)
        connection: _Connection | None = connections.get(slot)
        if connection is None:
            if route.scheme == "https":
                connection = _HTTPSConnection(
                    route.hostname, route.port, timeout=connect_timeout, context=self.tls_context()
                )
            else:
                connection = _HTTPConnection(route.hostname, route.port, timeout=connect_timeout)
            connections[slot] = connection
        connection.timeout = connect_timeout
        connection.read_timeout = read_timeout
        reused = connection.sock is not None
        if reused:
            connection.sock.settimeout(read_timeout)
        return connection, reused

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        connections = getattr(self._local, "connections", {})
        for slot, kept in list(connections.items()):
            if kept is connection:
                del connections[slot]

    def tls_context(self) -> ssl.SSLContext:
        """Verification as the client's HTTP session does it (`AWS_CA_BUNDLE`, `verify=`).
        Loads the CA bundle the first time (file I/O), then returns the same context."""
        with self._lock:
            if self._tls is None:
                from botocore.httpsession import get_cert_path

                verify = self._client._endpoint.http_session._verify
                if verify is False:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                else:
                    where = get_cert_path(verify)
                    if where and os.path.isdir(where):
                        context = ssl.create_default_context(capath=where)
                    else:
                        context = ssl.create_default_context(cafile=where)
                self._tls = context
            return self._tls

    # -- routes --------------------------------------------------------------------------------

    def knows_route(self, bucket: str) -> bool:
        """Whether `route(bucket)` answers without asking botocore (which may block)."""
        with self._lock:
            return bucket in self._routes

    def route(self, bucket: str) -> Route | None:
        """Where the bucket's GETs go, learnt from botocore the first time; None: boto3's."""
        with self._lock:
            if bucket in self._routes:
                return self._routes[bucket]
        route, settled = self._discover(bucket)
        if not settled:
            return None
        with self._lock:
            # A bucket marked boto3's meanwhile (by an answer) stays boto3's.
            return self._routes.setdefault(bucket, route)

    def _discover(self, bucket: str) -> tuple[Route | None, bool]:
        """Let botocore prepare and sign a GetObject of the bucket (stopped before it is
        sent), and take the route from it. Also whether that is settled: a probe that failed
        (credentials that could not be refreshed, say) is tried again by the next read."""
        from botocore.utils import get_environ_proxies

        self._probing.active = True
        try:
            self._client.get_object(Bucket=bucket, Key=PROBE_KEY)
        except _Probed as stopped:
            probe = stopped
        except Exception as exc:  # botocore cannot prepare it now: boto3 reports its error
            log.info("s3://%s: read through boto3 this time (%s)", bucket, _describe(exc))
            return None, False
        else:
            return None, True  # sent after all: someone else's handler answered before ours
        finally:
            self._probing.active = False
        try:
            session = self._client._endpoint.http_session
            proxied = session._proxy_config.proxy_url_for(probe.url) or get_environ_proxies(
                probe.url
            ).get(urlsplit(probe.url).scheme)
            client_cert = session._cert_file is not None
        except AttributeError as exc:  # botocore's internals moved: cannot tell, boto3's
            log.warning("S3 reads go through boto3: %s", exc)
            return None, True
        route = None
        if not proxied and not client_cert:
            route = route_from_request(probe.url, probe.headers)
        if route is None:
            log.info(
                "s3://%s: read through boto3 (a proxy, a client certificate, or a GET that "
                "botocore signs otherwise than by plain SigV4)",
                bucket,
            )
        return route, True

    def _stop_probe(self, request: Any, **kwargs: Any) -> None:
        if getattr(self._probing, "active", False):
            raise _Probed(request.url, request.headers)
