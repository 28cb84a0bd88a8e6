"""Google Cloud Storage objects: MD5 (or CRC32C for composite ones) as hashes, generations pinned.

The client honours `STORAGE_EMULATOR_HOST` (then no credentials are needed) and the usual
application-default credentials otherwise. Reads ask for the tracked generation *and* check the
identity each response carries (`x-goog-generation`, and the whole-object hash in
`x-goog-hash`), because not every server honours a generation pin. Inside a `RequestDeadline`
(the reader's chunk fetches), the client's connections are cut off when the deadline passes,
and the metadata request a read may make is not retried by the client library (its default
retry would keep at it for 120 s): the reader retries within its own deadline. Listings (when
tracking) and checks (`verify`) retry transient answers for CHECK_DEADLINE, and an endpoint that
cannot be connected to at all CONNECT_ATTEMPTS times, as botocore does for S3: a wrong
`STORAGE_EMULATOR_HOST` or no network is one line in seconds, not half a minute or two of
silence and urllib3's internals.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from typing import Any, ClassVar
from urllib.parse import quote

from artifactfs.entries import TYPE_GCS, ArtifactFileData, format_time
from artifactfs.errors import (
    AccessDeniedError,
    ArtifactfsError,
    ConnectFailedError,
    CredentialsError,
    NotFoundError,
    SourceChangedError,
    TransientSourceError,
)
from artifactfs.sources.base import (
    CHECK_DEADLINE,
    STREAM_CHUNK,
    ProgressCallback,
    RequestDeadline,
    Source,
    check_deadline,
    deadline_passed,
    nothing_at,
    parse_bucket_url,
    timeout_within_deadline,
    warn_object_is_also_a_folder,
    watched_pool_classes,
    within_current_deadline,
)
from artifactfs.verification import GCS_HASH_KEY

log = logging.getLogger(__name__)

TIMEOUT = (10, 30)  # connect, read (seconds)
# Tries to connect to an endpoint that refuses (or no such host) within CONNECT_WINDOW seconds,
# for one listing or check: scattered failures over a long listing do not add up.
CONNECT_ATTEMPTS = 3
CONNECT_WINDOW = 10.0
# HTTP answers a listing retries (as the client library's default retry does)
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
METADATA_RECHECK_SECONDS = 60.0

_client_lock = threading.Lock()
_client: Any = None


def gcs_client() -> Any:
    global _client
    with _client_lock:
        if _client is None:
            from google.auth.exceptions import DefaultCredentialsError
            from google.cloud import storage

            try:
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    from google.auth.credentials import AnonymousCredentials

                    project = os.environ.get("GOOGLE_CLOUD_PROJECT", "artifactfs")
                    _client = storage.Client(project=project, credentials=AnonymousCredentials())
                else:
                    _client = storage.Client()
            except (DefaultCredentialsError, OSError) as exc:  # OSError: a key file unread
                raise _credentials_error(exc) from None
            _watch_connections(_client)
        return _client


def _credentials_error(exc: Exception) -> CredentialsError:
    """Why no client could be made: the key file GOOGLE_APPLICATION_CREDENTIALS names, if it
    names one (it is what google-auth loads then), else no credentials anywhere."""
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key_file:
        return _key_file_error(key_file, exc)
    if isinstance(exc, OSError):
        return CredentialsError(f"cannot load GCS credentials: {exc}")
    return CredentialsError(
        "no GCS credentials found: set GOOGLE_APPLICATION_CREDENTIALS to a key file "
        "or run 'gcloud auth application-default login' "
        "(or STORAGE_EMULATOR_HOST for an emulator)"
    )


def _key_file_error(key_file: str, exc: Exception) -> CredentialsError:
    """What is wrong with the key file that google-auth could not load: gone, unreadable, or
    not a key file (its own words, in one line)."""
    named = f"GOOGLE_APPLICATION_CREDENTIALS names {key_file}, which"
    try:
        with open(key_file, "rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        return CredentialsError(f"{named} does not exist")
    except OSError as failed:
        return CredentialsError(f"{named} cannot be read: {failed.strerror or failed}")
    # google-auth wraps the reason: ('Failed to load ... from PATH', MalformedError('...')).
    reasons = [arg for arg in exc.args if isinstance(arg, BaseException)]
    reason = " ".join(str(reasons[-1] if reasons else exc).split())
    return CredentialsError(f"{named} is not a valid key file: {reason}")


def _watch_connections(client: Any) -> None:
    """Make the client's connections report to the read deadline (`RequestDeadline`), so that
    a stalled or trickling answer is cut off when it passes. The client sends everything
    through one requests session (`_http`, made here rather than on first use); each of its
    adapters gets pool classes of its own (the default ones are urllib3's module-wide dict,
    never changed). Connections through an HTTP(S) proxy are not watched: requests makes
    those pools itself."""
    adapters = getattr(client._http, "adapters", {})
    managers = [getattr(adapter, "poolmanager", None) for adapter in adapters.values()]
    if not any(managers):
        log.warning("cannot watch GCS connections: a read may outlast its deadline")
    for manager in managers:
        if manager is not None:
            manager.pool_classes_by_scheme = watched_pool_classes(manager.pool_classes_by_scheme)


def reset_client() -> None:
    global _client
    with _client_lock:
        _client = None


def parse_gs_url(url: str) -> tuple[str, str]:
    return parse_bucket_url(url, "gs")


def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _format_time(value: datetime | None) -> str:
    if value is None:
        return ""
    return format_time(value)


def _carries_identity(headers: Any) -> bool:
    return bool(headers.get("x-goog-generation") or headers.get("x-goog-hash"))


def _hashes_in_header(header: str) -> dict[str, str]:
    """`crc32c=AAA==,md5=BBB==` -> {"crc32c": hex, "md5": hex}."""
    found = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name and value:
            try:
                found[name] = _b64_to_hex(value)
            except ValueError:
                continue
    return found


class GCSSource(Source):
    type_name: ClassVar[str] = TYPE_GCS

    def __init__(self) -> None:
        self._checked: dict[tuple[str, str, str], float] = {}
        self._checked_lock = threading.Lock()

    def list_location(
        self, location: str, on_progress: ProgressCallback | None = None
    ) -> Iterator[ArtifactFileData]:
        from google.api_core.exceptions import GoogleAPIError, NotFound
        from requests.exceptions import RequestException

        bucket_name, name = parse_gs_url(location)
        bucket = gcs_client().bucket(bucket_name)
        try:
            if name and not name.endswith("/"):
                blob = bucket.get_blob(name, timeout=TIMEOUT, retry=_bounded_retry())
                if blob is not None:
                    if _is_a_folder_too(bucket, name):
                        warn_object_is_also_a_folder(location)
                    return iter([self._entry(blob, name.rsplit("/", 1)[-1])])
        except NotFound:
            raise NotFoundError(f"no such GCS bucket: {bucket_name}") from None
        except (GoogleAPIError, RequestException) as exc:
            raise ArtifactfsError(f"{location}: {_request_problem(exc, 'list')}") from None
        prefix = name.rstrip("/") + "/" if name else ""
        return self._list_prefix(bucket, prefix, location, on_progress)

    def _list_prefix(
        self, bucket: Any, prefix: str, location: str, on_progress: ProgressCallback | None
    ) -> Iterator[ArtifactFileData]:
        from google.api_core.exceptions import GoogleAPIError, NotFound
        from requests.exceptions import RequestException

        count = 0
        try:
            # The iterator fetches one page at a time, each with the retry.
            blobs = bucket.list_blobs(prefix=prefix, timeout=TIMEOUT, retry=_bounded_retry())
            for blob in blobs:
                if blob.name.endswith("/"):
                    continue  # folder placeholders
                count += 1
                if on_progress:
                    on_progress(count)
                yield self._entry(blob, blob.name[len(prefix) :])
        except NotFound:
            raise NotFoundError(f"no such GCS bucket: {bucket.name}") from None
        except (GoogleAPIError, RequestException) as exc:
            raise ArtifactfsError(f"{location}: {_request_problem(exc, 'list')}") from None
        if count == 0:
            raise nothing_at(location)

    @staticmethod
    def _entry(blob: Any, file_path: str) -> ArtifactFileData:
        url = f"gs://{blob.bucket.name}/{blob.name}"
        metadata = {
            "file_path": url,
            "location": url,
            "last_modified": _format_time(blob.updated),
            "generation": str(blob.generation),
        }
        if blob.md5_hash:
            file_hash = _b64_to_hex(blob.md5_hash)
        elif blob.crc32c:
            # Composite objects have no MD5; say which hash this is.
            file_hash = _b64_to_hex(blob.crc32c)
            metadata[GCS_HASH_KEY] = "crc32c"
        else:
            raise ArtifactfsError(f"{url}: the object has neither an MD5 nor a CRC32C")
        return ArtifactFileData(file_path, file_hash, TYPE_GCS, int(blob.size or 0), metadata)

    # -- reading ----------------------------------------------------------------------------

    def _identity_problem(self, entry: ArtifactFileData, headers: Any) -> str | None:
        generation = headers.get("x-goog-generation")
        tracked_generation = entry.metadata.get("generation")
        if generation and tracked_generation and generation != tracked_generation:
            return f"object changed since it was tracked (generation {generation})"
        algorithm = entry.metadata.get(GCS_HASH_KEY, "md5")
        served = _hashes_in_header(headers.get("x-goog-hash", "")).get(algorithm)
        if served and served != entry.file_hash:
            return f"object changed since it was tracked ({algorithm} {served})"
        return None

    def _metadata_problem(self, entry: ArtifactFileData) -> str | None:
        """For servers whose responses carry no identity (some emulators ignore generation
        pins too): ask for the object's metadata, at most once a minute per object."""
        key = (entry.source_url, entry.metadata.get("generation", ""), entry.file_hash)
        now = time.monotonic()
        with self._checked_lock:
            if now - self._checked.get(key, -1e9) < METADATA_RECHECK_SECONDS:
                return None
        try:
            # No retry by the client library: the reader retries, within its deadline.
            self._check(entry, retry=None)
        except SourceChangedError as exc:
            return exc.reason
        with self._checked_lock:
            self._checked[key] = now
        return None

    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        if length == 0 or entry.size == 0:
            return iter(())
        client = gcs_client()
        bucket, name = parse_gs_url(entry.source_url)
        # A raw media GET, since the library's download helpers hide the response headers.
        url = (
            f"{client._connection.API_BASE_URL}/download/storage/v1/b/{quote(bucket, safe='')}"
            f"/o/{quote(name, safe='')}"
        )
        params = {"alt": "media"}
        if entry.metadata.get("generation"):
            params["generation"] = entry.metadata["generation"]
        headers = {"Accept-Encoding": "identity"}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        try:
            response = client._http.get(
                url,
                params=params,
                headers=headers,
                stream=True,
                timeout=timeout_within_deadline(*TIMEOUT),
            )
        except OSError as exc:  # requests' connection errors and timeouts are OSErrors
            if _connect_failed(exc):
                unreached = _request_problem(exc, "read")
                raise ConnectFailedError(f"{entry.source_url}: {unreached}", _endpoint()) from None
            raise TransientSourceError(f"{entry.source_url}: cannot read: {exc}") from None
        if deadline_passed():
            # Cut off in its headers, an answer can look whole (http.client takes the end of
            # the stream for the end of the headers): nothing in it can be trusted.
            response.close()
            check_deadline()
        if response.status_code not in (200, 206):
            response.close()
            raise _status_error(entry, response.status_code)
        problem = self._identity_problem(entry, response.headers)
        if problem is not None:
            response.close()
            raise SourceChangedError(entry.source_url, problem)
        if _carries_identity(response.headers):
            return _iter_response(response, entry.source_url)
        return self._checked_by_metadata(entry, response)

    def _checked_by_metadata(self, entry: ArtifactFileData, response: Any) -> Iterator[bytes]:
        """The pieces of an answer that said nothing of which object it is, the last one held
        back until the object's metadata says it is the tracked one: no caller has the whole
        answer before that. Asked once the answer is read, not before: a server that answers
        one request at a time (the emulator) would not take the metadata request while this
        answer's body waits unread, past what the sockets' buffers hold (~4 MiB here)."""
        held: bytes | None = None
        try:
            for piece in _iter_response(response, entry.source_url):
                if held is not None:
                    yield held
                held = piece
        finally:
            response.close()  # now, not when the reading generator is collected
        problem = self._metadata_problem(entry)
        if problem is not None:
            raise SourceChangedError(entry.source_url, problem)
        if held is not None:
            yield held

    def check(self, entry: ArtifactFileData, stop: threading.Event | None = None) -> int:
        # As a read's, the metadata answer must come whole in time (one trickled a byte at a
        # time never trips a socket timeout), and the library's retries end with it: every
        # request after the deadline fails at once.
        with RequestDeadline(within_current_deadline(CHECK_DEADLINE), entry.source_url):
            return self._check(entry, retry=_bounded_retry())

    def _check(self, entry: ArtifactFileData, retry: Any) -> int:
        """`check` with the client library's `retry` (None: one attempt)."""
        from google.api_core.exceptions import Forbidden, GoogleAPIError, Unauthorized
        from requests.exceptions import RequestException

        bucket_name, name = parse_gs_url(entry.source_url)
        generation = entry.metadata.get("generation")
        try:
            blob = (
                gcs_client()
                .bucket(bucket_name)
                .get_blob(
                    name,
                    generation=int(generation) if generation else None,
                    timeout=timeout_within_deadline(*TIMEOUT),
                    retry=retry,
                )
            )
        except (Forbidden, Unauthorized) as exc:
            raise _status_error(entry, exc.code or 403) from None
        except (GoogleAPIError, RequestException, OSError) as exc:
            # Without a retry, connection errors and timeouts come as they are from requests.
            check_deadline()  # cut off at the deadline: say so, not what the cut-off caused
            problem = f"{entry.source_url}: {_request_problem(exc, 'read')}"
            if _connect_failed(exc):
                raise ConnectFailedError(problem, _endpoint()) from None
            raise TransientSourceError(problem) from None
        check_deadline()  # an answer cut off at the deadline is not the object's metadata
        if blob is None:
            raise SourceChangedError(entry.source_url, "object no longer exists")
        if generation and str(blob.generation) != generation:
            raise SourceChangedError(
                entry.source_url, f"generation is {blob.generation}, tracked {generation}"
            )
        # The hash the entry was tracked with (an object may carry both).
        algorithm = entry.metadata.get(GCS_HASH_KEY, "md5")
        served = blob.crc32c if algorithm == "crc32c" else blob.md5_hash
        current_hash = _b64_to_hex(served) if served else "none"
        if current_hash != entry.file_hash:
            raise SourceChangedError(
                entry.source_url, f"{algorithm} is {current_hash}, tracked {entry.file_hash}"
            )
        if blob.size is None:  # the size of a file tracked without one comes from here
            raise TransientSourceError(f"{entry.source_url}: the object's metadata has no size")
        size = int(blob.size)
        if entry.size is not None and size != entry.size:
            raise SourceChangedError(
                entry.source_url, f"size is {size} bytes, tracked {entry.size}"
            )
        return size


def _is_a_folder_too(bucket: Any, name: str) -> bool:
    """Whether objects below `name/` exist besides a folder marker (`name/` itself). Only for
    a warning: a listing that fails says no."""
    try:
        # No retry: the library's own would try for up to two minutes, for a warning.
        listed = bucket.list_blobs(prefix=f"{name}/", max_results=2, timeout=TIMEOUT, retry=None)
        return any(blob.name != f"{name}/" for blob in listed)
    except Exception as exc:  # the object is tracked either way
        log.info("gs://%s/%s: cannot tell whether it is a folder too: %s", bucket.name, name, exc)
        return False


def _bounded_retry() -> Any:
    """The client library's retry for one listing or check: transient errors for up to
    CHECK_DEADLINE (its default is 120 s), but a failure to connect at all only until it has
    happened CONNECT_ATTEMPTS times within CONNECT_WINDOW seconds."""
    from google.api_core.exceptions import GoogleAPICallError
    from google.api_core.retry import Retry
    from google.auth.exceptions import TransportError
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout

    failed_connects: deque[float] = deque()  # when each recent one happened

    def retried(exc: Exception) -> bool:
        if _never_connected(exc):
            now = time.monotonic()
            failed_connects.append(now)
            while now - failed_connects[0] > CONNECT_WINDOW:
                failed_connects.popleft()
            return len(failed_connects) < CONNECT_ATTEMPTS
        if isinstance(exc, GoogleAPICallError):
            return exc.code in RETRIED_STATUSES
        return isinstance(exc, (RequestsConnectionError, Timeout, TransportError))

    return Retry(predicate=retried, initial=0.25, maximum=8.0, timeout=CHECK_DEADLINE)


def _never_connected(exc: BaseException) -> bool:
    """Whether `exc` is a failure to open a connection (refused, no such host, unreachable):
    urllib3's NewConnectionError, somewhere in what requests raised."""
    from urllib3.exceptions import NewConnectionError

    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, NewConnectionError):
            return True
        pending += [current.__cause__, current.__context__]
        pending += [arg for arg in current.args if isinstance(arg, BaseException)]
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError
        if isinstance(reason, BaseException):
            pending.append(reason)
    return False


def _connect_failed(exc: BaseException) -> bool:
    """Whether a request failed before it reached a server: no connection could be made
    (refused, no such host, connect timed out), and not because the read deadline passed."""
    from requests.exceptions import ConnectTimeout

    return not deadline_passed() and (isinstance(exc, ConnectTimeout) or _never_connected(exc))


def _endpoint() -> str:
    """Where requests go: the emulator, else Google's."""
    return os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"


def _request_problem(exc: BaseException, doing: str) -> str:
    """One line for a listing or check (`doing`: "list", "read") that failed, retries over."""
    from google.api_core.exceptions import RetryError
    from requests.exceptions import ConnectTimeout

    if isinstance(exc, RetryError) and exc.cause is not None:
        return f"{_request_problem(exc.cause, doing)} (retried for {CHECK_DEADLINE:.0f} s)"
    endpoint = _endpoint()
    if isinstance(exc, ConnectTimeout):
        return f"cannot reach {endpoint}: timed out"
    if _never_connected(exc):
        errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
        reason = errno_text.group(1).strip() if errno_text else "cannot connect"
        return f"cannot reach {endpoint}: {reason}"
    return f"cannot {doing}: {exc}"


def _status_error(entry: ArtifactFileData, status: int) -> ArtifactfsError:
    """What an HTTP error answer means for a read: permanent (no retry can help) or not."""
    if status == 404:
        return SourceChangedError(entry.source_url, "object no longer exists")
    if status == 412:
        return SourceChangedError(entry.source_url, "object changed since it was tracked")
    if status == 416:
        return SourceChangedError(entry.source_url, "object is shorter than tracked")
    if status in (401, 403):
        return AccessDeniedError(entry.source_url, f"access denied: HTTP {status}")
    return TransientSourceError(f"{entry.source_url}: cannot read: HTTP {status}")


def _iter_response(response: Any, url: str) -> Iterator[bytes]:
    from requests.exceptions import RequestException

    try:
        for piece in response.iter_content(STREAM_CHUNK):
            check_deadline()  # a trickle: each piece arrives in time, the whole never does
            yield piece
        check_deadline()  # a body cut off where its length was unknown just ends
    except (RequestException, OSError) as exc:  # reset, cut short or cut off mid-body
        raise TransientSourceError(f"{url}: read interrupted: {exc}") from None
    finally:
        response.close()
