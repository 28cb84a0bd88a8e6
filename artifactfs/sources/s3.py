"""S3 (and S3-compatible) objects: ETags as hashes, ranged reads conditional on the ETag.

The client honours the standard AWS variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_PROFILE`, ...). Some S3-compatible servers ignore `If-Match`, so every response's ETag is
compared with the tracked one as well. In a versioned bucket the entry records the `version_id`
it saw, and reads fetch exactly that version. Inside a `RequestDeadline` (the reader's chunk
fetches), the client's connections are cut off when the deadline passes.

The reader's chunk fetches (`read_range`) do not go through boto3: its per-request CPU bounds
small-file reads, so they are signed and sent by `s3_get` on the client's credentials and
routes; everything else (listing, HEAD, `check`, `open_stream`) is boto3's, and so is a read
of any bucket `s3_get` cannot route (`ARTIFACTFS_S3_LEAN_GET=0`: every read).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from cachetools import TTLCache

from artifactfs.entries import TYPE_S3, ArtifactFileData, format_time
from artifactfs.errors import (
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
    current_deadline,
    deadline_passed,
    nothing_at,
    parse_bucket_url,
    warn_object_is_also_a_folder,
    watched_pool_classes,
    within_current_deadline,
)
from artifactfs.sources.s3_get import (
    LeanGetter,
    bucket_not_found,
    clean_etag,
    error_for_code,
    expected_body_length,
    lean_get_enabled,
    note_encryption,
)

log = logging.getLogger(__name__)

_client_lock = threading.Lock()
_client: Any = None
_lean: LeanGetter | None = None  # the reader's GETs, on the client's credentials and routes

# Buckets the endpoint said it has, for a while: `verify` of many deleted objects would ask
# for their bucket once per object. Only that answer is kept: a missing bucket may be made.
BUCKET_MEMORY = 60.0
_buckets_lock = threading.Lock()
_buckets_seen: TTLCache[str, bool] = TTLCache(maxsize=1024, ttl=BUCKET_MEMORY)


def s3_client() -> Any:
    """One boto3 client per process (clients are thread-safe; creating them is not)."""
    global _client, _lean
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError

            try:
                # A missing profile, a failing credential_process, half a key pair: all here.
                session = boto3.session.Session()
                credentials = session.get_credentials()  # the client gets this very object
            except BotoCoreError as exc:
                raise _credentials_error(exc) from None
            if credentials is None:
                raise CredentialsError(
                    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    "or AWS_PROFILE with ~/.aws/credentials"
                )
            config = Config(
                connect_timeout=5,
                read_timeout=10,
                # Few attempts: the reader retries transient failures within its own deadline.
                retries={"max_attempts": 2, "mode": "standard"},
                max_pool_connections=32,
                # S3-compatible servers often lack the new default checksums on ranged GETs.
                response_checksum_validation="when_required",
                request_checksum_calculation="when_required",
            )
            try:
                client = session.client("s3", config=config)
            except BotoCoreError as exc:  # a bad region or endpoint in the config, say
                raise ArtifactfsError(f"cannot set up the S3 client: {exc}") from None
            _client = client
            _watch_connections(_client)
            _lean = LeanGetter(_client, credentials) if lean_get_enabled() else None
        return _client


def lean_getter() -> LeanGetter | None:
    """The process's signed-GET path for reads (None when switched off)."""
    s3_client()
    return _lean


def _watch_connections(client: Any) -> None:
    """Make the client's connections report to the read deadline (`RequestDeadline`), so that
    a stalled or trickling answer is cut off when it passes. botocore has no public hook for
    its connection classes: its HTTP session keeps them in `_pool_classes_by_scheme`, a dict
    shared with every pool manager it makes (proxies too), so it is updated in place."""
    try:
        classes = client._endpoint.http_session._pool_classes_by_scheme
    except AttributeError:
        log.warning("cannot watch S3 connections: a read may outlast its deadline")
        return
    classes.update(watched_pool_classes(classes))


def reset_client() -> None:
    """Forget the process's client (tests that change the environment call this)."""
    global _client, _lean
    with _client_lock:
        _client = None
        _lean = None  # its routes and credentials came from the client's environment
    with _buckets_lock:
        _buckets_seen.clear()  # they were another endpoint's


def parse_s3_url(url: str) -> tuple[str, str]:
    return parse_bucket_url(url, "s3")


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _where_credentials_come_from() -> str:
    """The variables and files botocore took its credentials from, for an error message."""
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    config = os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    named = f"profile {profile!r} (AWS_PROFILE)" if profile else "the default profile"
    return f"{named} in {config} (AWS_CONFIG_FILE) or {shared} (AWS_SHARED_CREDENTIALS_FILE)"


def _credentials_error(exc: Exception) -> CredentialsError:
    """botocore's failure to find or load credentials, saying where it looked."""
    from botocore.exceptions import PartialCredentialsError, ProfileNotFound

    if isinstance(exc, PartialCredentialsError):
        # botocore names the missing variable ("missing: aws_secret_access_key").
        return CredentialsError(
            f"incomplete AWS credentials: {exc}: set both AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or neither and use a profile"
        )
    if isinstance(exc, ProfileNotFound):
        return CredentialsError(
            f"AWS credentials: {exc}: looked for {_where_credentials_come_from()}"
        )
    # A failing credential_process says nothing after its colon: no dangling one.
    problem = str(exc).rstrip(": ")
    return CredentialsError(
        f"cannot get AWS credentials: {problem} (they come from the AWS_* variables, or "
        f"{_where_credentials_come_from()})"
    )


def _endpoint() -> str:
    client = _client
    return str(client.meta.endpoint_url) if client is not None else "the S3 endpoint"


def _call_failed(url: str, exc: Exception) -> ArtifactfsError:
    """What a botocore call that ended in anything but an error answer (ClientError) means:
    credentials that cannot be had, a server out of reach, a redirect loop, a cut-off."""
    from botocore.exceptions import (
        ConnectTimeoutError,
        CredentialRetrievalError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(exc, ArtifactfsError):
        return exc  # ours already (s3_client's CredentialsError): said as it is, not retried
    deadline = current_deadline()
    if deadline is not None and deadline.expired:
        return TransientSourceError(deadline.message())  # cut off: nothing else is meant
    credentials = (
        NoCredentialsError,
        PartialCredentialsError,
        CredentialRetrievalError,
        ProfileNotFound,
    )
    if isinstance(exc, credentials):
        return _credentials_error(exc)
    if _is_redirect_loop(exc):
        # botocore follows a 301/307 without a region header by asking the bucket's region,
        # which is redirected again, and so on: no retry can help.
        return ArtifactfsError(
            f"{url}: {_endpoint()} keeps redirecting (HTTP 301/307 without a region): "
            "check AWS_ENDPOINT_URL and AWS_DEFAULT_REGION"
        )
    # Never connected (refused, no such host, connect timed out). Not ReadTimeoutError nor
    # ConnectionClosedError (HTTPClientErrors): a server took those connections.
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
        return ConnectFailedError(f"{url}: cannot reach {_endpoint()}: {exc}", _endpoint())
    return TransientSourceError(f"{url}: cannot read: {type(exc).__name__}: {exc}")


def _is_redirect_loop(exc: BaseException) -> bool:
    """A RecursionError, as it is or wrapped by botocore (HTTPClientError(error=...))."""
    seen: list[BaseException] = []
    found: BaseException | None = exc
    while found is not None and found not in seen and len(seen) < 8:
        if isinstance(found, RecursionError):
            return True
        seen.append(found)
        wrapped = getattr(found, "kwargs", {}).get("error")
        found = wrapped if isinstance(wrapped, BaseException) else found.__context__
    return False


def _latest_versions(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        deleted = {m["Key"] for m in page.get("DeleteMarkers", []) if m.get("IsLatest")}
        for version in page.get("Versions", []):
            if version.get("IsLatest") and version["Key"] not in deleted:
                yield version


def _no_such_bucket(bucket: str) -> NotFoundError:
    """Tracking from a bucket the endpoint does not have: as reads say it (a wrong endpoint
    is a likelier cause than a typo in a bucket the user just wrote to)."""
    return NotFoundError(
        f"no such S3 bucket: {bucket} at {_endpoint()} (is AWS_ENDPOINT_URL right?)"
    )


def _listing_failed(url: str, bucket: str, exc: Exception) -> ArtifactfsError:
    if _error_code(exc) == "NoSuchBucket":
        return _no_such_bucket(bucket)
    return ArtifactfsError(f"{url}: {exc}")


_HEADER_OF = {"ContentLength": "Content-Length", "LastModified": "Last-Modified"}


def _required(answer: dict[str, Any], name: str, url: str) -> Any:
    """A field of an S3 answer the entry depends on; some servers leave one out (a HEAD
    without Content-Length): a clear error, worth a retry, rather than a KeyError."""
    value = answer.get(name)
    if value is None:
        raise TransientSourceError(
            f"{url}: the S3 server's answer has no {_HEADER_OF.get(name, name)}"
        )
    return value


class S3Source(Source):
    type_name: ClassVar[str] = TYPE_S3
    reads_many: ClassVar[bool] = True

    def list_location(
        self, location: str, on_progress: ProgressCallback | None = None
    ) -> Iterator[ArtifactFileData]:
        bucket, key = parse_s3_url(location)
        client = s3_client()
        versioned = self._is_versioned(client, bucket, location)
        if key and not key.endswith("/"):
            single = self._head(client, bucket, key)
            if single is not None:
                if self._is_a_folder_too(client, bucket, key):
                    warn_object_is_also_a_folder(location)
                name = key.rsplit("/", 1)[-1]
                return iter([self._entry(bucket, key, name, single, versioned)])
        prefix = key.rstrip("/") + "/" if key else ""
        return self._list_prefix(client, bucket, prefix, versioned, on_progress, location)

    @staticmethod
    def _is_a_folder_too(client: Any, bucket: str, key: str) -> bool:
        """Whether keys below `key/` exist besides a folder marker (`key/` itself). Only for
        a warning: a listing that fails says no."""
        try:
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{key}/", MaxKeys=2)
        except Exception as exc:  # the object is tracked either way
            log.info("s3://%s/%s: cannot tell whether it is a folder too: %s", bucket, key, exc)
            return False
        return any(item.get("Key") != f"{key}/" for item in listed.get("Contents", []))

    @staticmethod
    def _is_versioned(client: Any, bucket: str, location: str) -> bool | None:
        """Whether the bucket keeps versions (then entries pin theirs); None when it may but
        will not say (GetBucketVersioning denied): the objects' own version ids tell then."""
        from botocore.exceptions import ClientError, NoCredentialsError

        try:
            status = client.get_bucket_versioning(Bucket=bucket).get("Status")
        except NoCredentialsError:
            raise CredentialsError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchBucket":
                raise _no_such_bucket(bucket) from None
            if code == "AccessDenied":
                return None
            if code == "NotImplemented":
                return False  # a server without versions
            raise ArtifactfsError(f"S3 bucket {bucket}: {exc}") from None
        except Exception as exc:  # botocore's own failures, a RecursionError too
            raise _call_failed(location, exc) from None
        return status in ("Enabled", "Suspended")

    @staticmethod
    def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        url = f"s3://{bucket}/{key}"
        try:
            head: dict[str, Any] = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ArtifactfsError(f"{url}: {exc}") from None
        except Exception as exc:  # botocore's own failures, a RecursionError too
            raise _call_failed(url, exc) from None
        return {
            "ETag": _required(head, "ETag", url),
            "Size": _required(head, "ContentLength", url),
            "LastModified": _required(head, "LastModified", url),
            "VersionId": head.get("VersionId"),
        }

    def _list_prefix(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        versioned: bool | None,
        on_progress: ProgressCallback | None,
        location: str,
    ) -> Iterator[ArtifactFileData]:
        count = 0
        for obj in self._iter_objects(client, bucket, prefix, versioned):
            key = obj["Key"]
            if key.endswith("/"):
                continue  # folder markers made by consoles
            count += 1
            if on_progress:
                on_progress(count)
            yield self._entry(bucket, key, key[len(prefix) :], obj, versioned)
        if count == 0:
            raise nothing_at(location)

    @staticmethod
    def _iter_objects(
        client: Any, bucket: str, prefix: str, versioned: bool | None
    ) -> Iterator[dict[str, Any]]:
        """Objects under prefix, one page at a time (never the whole listing in memory): their
        latest versions where the bucket is versioned or may be (`versioned` None), unless
        listing versions is denied too (then without version ids)."""
        from botocore.exceptions import ClientError

        url = f"s3://{bucket}/{prefix}"
        yielded = False
        try:
            if versioned is not False:
                for version in _latest_versions(client, bucket, prefix):
                    yielded = True
                    yield version
                return
        except ClientError as exc:
            if yielded or versioned or _error_code(exc) != "AccessDenied":
                raise _listing_failed(url, bucket, exc) from None
            log.warning("%s: cannot list versions (%s): no version ids recorded", url, exc)
        except Exception as exc:  # botocore's own failures, a RecursionError too
            raise _call_failed(url, exc) from None
        try:
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            ):
                yield from page.get("Contents", [])
        except ClientError as exc:
            raise _listing_failed(url, bucket, exc) from None
        except Exception as exc:  # botocore's own failures, a RecursionError too
            raise _call_failed(url, exc) from None

    @staticmethod
    def _entry(
        bucket: str, key: str, file_path: str, obj: dict[str, Any], versioned: bool | None
    ) -> ArtifactFileData:
        url = f"s3://{bucket}/{key}"
        metadata = {
            "file_path": url,
            "location": url,
            "last_modified": format_time(_required(obj, "LastModified", url)),
        }
        version_id = obj.get("VersionId")
        # A bucket that may be versioned (None) is pinned by the version the object has.
        if versioned is not False and version_id and version_id != "null":
            metadata["version_id"] = version_id
        etag = clean_etag(_required(obj, "ETag", url))
        return ArtifactFileData(file_path, etag, TYPE_S3, _required(obj, "Size", url), metadata)

    # -- reading ----------------------------------------------------------------------------

    def _get(self, entry: ArtifactFileData, offset: int, length: int | None) -> dict[str, Any]:
        from botocore.exceptions import ClientError

        bucket, key = parse_s3_url(entry.source_url)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "IfMatch": f'"{entry.file_hash}"'}
        if "version_id" in entry.metadata:
            args["VersionId"] = entry.metadata["version_id"]
        # A Range on an empty object is unsatisfiable: ask for the whole (empty) body.
        if entry.size != 0 and (offset or length is not None):
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            response: dict[str, Any] = s3_client().get_object(**args)
        except ClientError as exc:
            raise self._changed(entry, exc) from None
        except Exception as exc:  # connection errors and timeouts (after botocore's retries),
            # credentials, a redirect loop (RecursionError)
            raise _call_failed(entry.source_url, exc) from None
        if deadline_passed():
            # Cut off in its headers, an answer can look whole (http.client takes the end of
            # the stream for the end of the headers): nothing in it can be trusted.
            response["Body"].close()
            check_deadline()
        etag = clean_etag(response.get("ETag", ""))
        if etag != entry.file_hash:
            response["Body"].close()
            raise SourceChangedError(
                entry.source_url, f"object changed since it was tracked (ETag {etag})"
            )
        note_encryption(entry, response.get("ServerSideEncryption"))
        return response

    @staticmethod
    def _changed(entry: ArtifactFileData, exc: Exception) -> ArtifactfsError:
        return error_for_code(entry.source_url, _error_code(exc), str(exc), _endpoint())

    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        if length == 0:
            return iter(())
        response = self._get(entry, offset, length)
        expected = _unsaid_length(response, entry, offset, length)
        return _iter_body(response["Body"], entry.source_url, expected)

    def read_range(self, entry: ArtifactFileData, offset: int, length: int) -> bytes:
        """One ranged GET, its body read in one call: measured against `rclone serve s3`, an
        8 MiB body read whole comes at 750 MB/s on one thread, read in 1 MiB pieces at 420.
        A stall or a trickle cannot hold the read: the request deadline cuts the connection.
        The GET is `s3_get`'s (about 3x boto3's rate for small reads); boto3's for a bucket or
        an answer it leaves to botocore."""
        if length == 0:
            return b""
        lean = lean_getter()
        if lean is not None:
            data = lean.read_range(entry, offset, length)
            if data is not None:
                return data
        response = self._get(entry, offset, length)
        data = _read_body(response["Body"], entry.source_url)
        _check_length(entry.source_url, len(data), _unsaid_length(response, entry, offset, length))
        return data

    def read_many(self, entries: Sequence[ArtifactFileData]) -> list[bytes | None]:
        """Small objects whole, their GETs sent together from one thread (`s3_get`)."""
        lean = lean_getter()
        return lean.read_many(entries) if lean is not None else super().read_many(entries)

    async def read_many_on_loop(
        self, entries: Sequence[ArtifactFileData], seconds: float
    ) -> list[bytes | None] | None:
        """Small objects whole, by tasks of the calling trio loop (`s3_loop`); None when
        reads go through boto3 (`ARTIFACTFS_S3_LEAN_GET=0`)."""
        import trio

        from artifactfs.sources import s3_loop

        if _client is None:  # importing boto3 and building the client blocks: not on the loop
            await trio.to_thread.run_sync(s3_client)
        lean = _lean
        if lean is None:
            return None
        return await s3_loop.read_many(lean, entries, seconds)

    def check(self, entry: ArtifactFileData, stop: threading.Event | None = None) -> int:
        from botocore.exceptions import ClientError

        bucket, key = parse_s3_url(entry.source_url)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if "version_id" in entry.metadata:
            args["VersionId"] = entry.metadata["version_id"]
        # As a read's, the HEAD's answer must come whole in time: one trickled a byte at a
        # time never trips botocore's read timeout.
        with RequestDeadline(within_current_deadline(CHECK_DEADLINE), entry.source_url):
            try:
                head = s3_client().head_object(**args)
            except ClientError as exc:
                problem = self._changed(entry, exc)
                if _error_code(exc) in ("404", "NotFound") and not self._bucket_exists(bucket):
                    problem = bucket_not_found(entry.source_url, _endpoint())
                raise problem from None
            except Exception as exc:  # botocore's own failures, a RecursionError too
                raise _call_failed(entry.source_url, exc) from None
            check_deadline()  # an answer cut off in its headers can look whole
        etag = clean_etag(head.get("ETag", ""))
        if etag != entry.file_hash:
            raise SourceChangedError(entry.source_url, f"ETag is {etag}, tracked {entry.file_hash}")
        size: int = _required(head, "ContentLength", entry.source_url)
        if entry.size is not None and size != entry.size:
            raise SourceChangedError(
                entry.source_url, f"size is {size} bytes, tracked {entry.size}"
            )
        note_encryption(entry, head.get("ServerSideEncryption"))
        return size

    @staticmethod
    def _bucket_exists(bucket: str) -> bool:
        """Whether the endpoint has the bucket, for a HEAD of an object answered 404 (a HEAD
        answer has no body, so no error code tells a missing bucket from a missing object).
        True unless it says 404 itself: a bucket it will not tell about (403) or a failure
        leaves the object missing, as the HEAD said."""
        from botocore.exceptions import ClientError

        with _buckets_lock:
            if bucket in _buckets_seen:
                return True
        try:
            s3_client().head_bucket(Bucket=bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return False
            if _error_code(exc) not in ("403", "AccessDenied"):
                return True  # unsure (a 5xx, say): not remembered
        except Exception:  # botocore's own failures: the object's 404 stands
            return True
        with _buckets_lock:  # it answered, or refused to say about a bucket it has (403)
            _buckets_seen[bucket] = True
        return True


def _unsaid_length(
    response: dict[str, Any], entry: ArtifactFileData, offset: int, length: int | None
) -> int | None:
    """The body length a GetObject answer must have, where it does not say (no Content-Length:
    botocore checks one it has): without one, a body cut short just ends."""
    metadata = response.get("ResponseMetadata", {})
    if "content-length" in metadata.get("HTTPHeaders", {}):
        return None
    status = metadata.get("HTTPStatusCode")
    return expected_body_length(entry, offset, length, status if isinstance(status, int) else None)


def _check_length(url: str, got: int, expected: int | None) -> None:
    """A body shorter than the range asked for was cut short (the server said no length)."""
    if expected is not None and got < expected:
        raise TransientSourceError(f"{url}: read interrupted: {got} of {expected} bytes")


def _read_body(body: Any, url: str) -> bytes:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    try:
        data: bytes = body.read()  # botocore checks it against the Content-Length
        check_deadline()  # cut off by the deadline, a body may look whole: never trust it
    except (BotoCoreError, HTTPError, OSError) as exc:  # reset, cut short or cut off mid-body
        raise TransientSourceError(f"{url}: read interrupted: {exc}") from None
    finally:
        body.close()
    return data


def _iter_body(body: Any, url: str, expected: int | None) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    got = 0
    try:
        for piece in body.iter_chunks(STREAM_CHUNK):
            check_deadline()  # a trickle: each piece arrives in time, the whole never does
            got += len(piece)
            yield piece
        check_deadline()  # a body cut off where its length was unknown just ends
        _check_length(url, got, expected)
    except (BotoCoreError, HTTPError, OSError) as exc:  # reset, cut short or cut off mid-body
        raise TransientSourceError(f"{url}: read interrupted: {exc}") from None
    finally:
        body.close()
