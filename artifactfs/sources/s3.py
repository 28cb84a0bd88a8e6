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
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, ClassVar

from artifactfs.entries import TYPE_S3, ArtifactFileData
from artifactfs.errors import (
    ArtifactfsError,
    CredentialsError,
    NotFoundError,
    SourceChangedError,
    TransientSourceError,
)
from artifactfs.sources.base import (
    STREAM_CHUNK,
    ProgressCallback,
    Source,
    check_deadline,
    deadline_passed,
    parse_bucket_url,
    watched_pool_classes,
)
from artifactfs.sources.s3_get import LeanGetter, clean_etag, error_for_code, lean_get_enabled

log = logging.getLogger(__name__)

_client_lock = threading.Lock()
_client: Any = None
_lean: LeanGetter | None = None  # the reader's GETs, on the client's credentials and routes


def s3_client() -> Any:
    """One boto3 client per process (clients are thread-safe; creating them is not)."""
    global _client, _lean
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session()
            credentials = session.get_credentials()  # the client gets this very object
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
            _client = session.client("s3", config=config)
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


def parse_s3_url(url: str) -> tuple[str, str]:
    return parse_bucket_url(url, "s3")


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _format_time(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class S3Source(Source):
    type_name: ClassVar[str] = TYPE_S3
    reads_many: ClassVar[bool] = True

    def list_location(
        self, location: str, on_progress: ProgressCallback | None = None
    ) -> Iterator[ArtifactFileData]:
        bucket, key = parse_s3_url(location)
        client = s3_client()
        versioned = self._is_versioned(client, bucket)
        if key and not key.endswith("/"):
            single = self._head(client, bucket, key)
            if single is not None:
                name = key.rsplit("/", 1)[-1]
                return iter([self._entry(bucket, key, name, single, versioned)])
        prefix = key.rstrip("/") + "/" if key else ""
        return self._list_prefix(client, bucket, prefix, versioned, on_progress, location)

    @staticmethod
    def _is_versioned(client: Any, bucket: str) -> bool:
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
                raise NotFoundError(f"no such S3 bucket: {bucket}") from None
            if code in ("AccessDenied", "NotImplemented"):
                return False  # cannot tell: track ETags only
            raise ArtifactfsError(f"S3 bucket {bucket}: {exc}") from None
        return status in ("Enabled", "Suspended")

    @staticmethod
    def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ArtifactfsError(f"s3://{bucket}/{key}: {exc}") from None
        return {
            "ETag": head["ETag"],
            "Size": head["ContentLength"],
            "LastModified": head["LastModified"],
            "VersionId": head.get("VersionId"),
        }

    def _list_prefix(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        versioned: bool,
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
            raise NotFoundError(f"no objects at {location}")

    @staticmethod
    def _iter_objects(
        client: Any, bucket: str, prefix: str, versioned: bool
    ) -> Iterator[dict[str, Any]]:
        """Objects under prefix, one page at a time (never the whole listing in memory)."""
        if not versioned:
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            ):
                yield from page.get("Contents", [])
            return
        for page in client.get_paginator("list_object_versions").paginate(
            Bucket=bucket, Prefix=prefix
        ):
            deleted = {m["Key"] for m in page.get("DeleteMarkers", []) if m.get("IsLatest")}
            for version in page.get("Versions", []):
                if version.get("IsLatest") and version["Key"] not in deleted:
                    yield version

    @staticmethod
    def _entry(
        bucket: str, key: str, file_path: str, obj: dict[str, Any], versioned: bool
    ) -> ArtifactFileData:
        url = f"s3://{bucket}/{key}"
        metadata = {
            "file_path": url,
            "location": url,
            "last_modified": _format_time(obj["LastModified"]),
        }
        version_id = obj.get("VersionId")
        if versioned and version_id and version_id != "null":
            metadata["version_id"] = version_id
        return ArtifactFileData(file_path, clean_etag(obj["ETag"]), TYPE_S3, obj["Size"], metadata)

    # -- reading ----------------------------------------------------------------------------

    def _get(self, entry: ArtifactFileData, offset: int, length: int | None) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

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
        except BotoCoreError as exc:  # connection errors and timeouts, after botocore's retries
            raise TransientSourceError(f"{entry.source_url}: cannot read: {exc}") from None
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
        return response

    @staticmethod
    def _changed(entry: ArtifactFileData, exc: Exception) -> ArtifactfsError:
        return error_for_code(entry.source_url, _error_code(exc), str(exc))

    def open_stream(
        self, entry: ArtifactFileData, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        if length == 0:
            return iter(())
        response = self._get(entry, offset, length)
        return _iter_body(response["Body"], entry.source_url)

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
        return _read_body(response["Body"], entry.source_url)

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

    def check(self, entry: ArtifactFileData) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = parse_s3_url(entry.source_url)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if "version_id" in entry.metadata:
            args["VersionId"] = entry.metadata["version_id"]
        try:
            head = s3_client().head_object(**args)
        except ClientError as exc:
            raise self._changed(entry, exc) from None
        except BotoCoreError as exc:
            raise TransientSourceError(f"{entry.source_url}: cannot read: {exc}") from None
        etag = clean_etag(head.get("ETag", ""))
        if etag != entry.file_hash:
            raise SourceChangedError(entry.source_url, f"ETag is {etag}, tracked {entry.file_hash}")
        if entry.size is not None and head["ContentLength"] != entry.size:
            raise SourceChangedError(
                entry.source_url, f"size is {head['ContentLength']} bytes, tracked {entry.size}"
            )


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


def _iter_body(body: Any, url: str) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError
    from urllib3.exceptions import HTTPError

    try:
        for piece in body.iter_chunks(STREAM_CHUNK):
            check_deadline()  # a trickle: each piece arrives in time, the whole never does
            yield piece
        check_deadline()  # a body cut off where its length was unknown just ends
    except (BotoCoreError, HTTPError, OSError) as exc:  # reset, cut short or cut off mid-body
        raise TransientSourceError(f"{url}: read interrupted: {exc}") from None
    finally:
        body.close()
