"""Sources against servers and files that misbehave: what a user sees.

`verify` ends within its deadline however slowly a server answers; answers S3 servers should not
send (a HEAD without Content-Length, a redirect without a region, a body cut short with no
length) end in one clear line naming the object, or in a retry that gets the right bytes;
credentials that cannot be had and endpoints out of reach are one line, exit 2, nothing
recorded; an unreadable local file is refused by `track` and reported by `verify`.

Real servers (moto_server, the GCS emulator) behind the fault proxy where it can play the fault;
a small scripted S3 server here where it cannot (answers without Content-Length).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.cache import ChunkCache
from artifactfs.checks import verify_entries
from artifactfs.entries import ArtifactFileData
from artifactfs.reader import NOT_RETRIED, Reader, ReadError
from artifactfs.sources import reset_sources, s3_get, source_for_type
from artifactfs.sources.s3 import s3_client
from tests.conftest import CliResult, GCSBucket, S3Bucket, make_tree
from tests.support.faultproxy import fault_proxy
from tests.support.relay import SwitchableRelay
from tests.support.servers import ScriptedHttpServer
from tests.support.stores import make_local_store, store_counts

CHECK_DEADLINE = 3.0  # the check deadline these tests set (30 s by default)
BOUND = 15.0  # a check cut off at CHECK_DEADLINE ends well within this


# -- helpers ----------------------------------------------------------------------------------


def one_line(result: CliResult, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def in_time(work: Callable[[], Any], bound: float) -> tuple[Any, float]:
    """`work()` in a thread, its result and how long it took; fails if it is still running
    after `bound` seconds (a hang is reported, not waited for)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # reported by the test below
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    took = time.monotonic() - started
    assert not thread.is_alive(), f"still running after {bound:.0f}s"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0], took


def s3_entry(url: str, body: bytes) -> ArtifactFileData:
    return ArtifactFileData(
        url.rsplit("/", 1)[-1],
        hashlib.md5(body).hexdigest(),
        "S3",
        len(body),
        {"file_path": url, "location": url, "last_modified": "2025-01-01 00:00:00"},
    )


def unsized_entry(entry: ArtifactFileData) -> ArtifactFileData:
    """The entry as an import without a size records it."""
    return ArtifactFileData(entry.file_path, entry.file_hash, entry.type, None, entry.metadata)


@pytest.fixture
def short_check_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from artifactfs.sources import gcs, s3

    monkeypatch.setattr(s3, "CHECK_DEADLINE", CHECK_DEADLINE)
    monkeypatch.setattr(gcs, "CHECK_DEADLINE", CHECK_DEADLINE)


def point_s3_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """S3 reads go to `endpoint`, with made-up credentials (a scripted server checks none)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reset_sources()


class ScriptedS3(ScriptedHttpServer):
    """A plain-HTTP S3 look-alike for one bucket `bkt` and object `obj` (path style), one
    request per connection. `head_length`: whether a HEAD says the object's Content-Length;
    `cut_gets`: how many GETs of the object get a body cut in half, with no Content-Length
    and `Connection: close` (the answers after those are whole)."""

    BUCKET = "bkt"
    KEY = "obj"

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.etag = hashlib.md5(body).hexdigest()
        self.head_length = True
        self.cut_gets = 0
        self.gets = 0
        super().__init__()

    def answer(self, request: str) -> bytes:
        lines = request.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        if method == "GET" and target.startswith(f"/{self.BUCKET}?versioning"):
            xml = b'<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>'
            return self._head("200 OK", len(xml)) + xml
        if target.split("?")[0] != f"/{self.BUCKET}/{self.KEY}":
            return self._head("404 Not Found", 0)
        if method == "HEAD":
            return self._head("200 OK", len(self.body) if self.head_length else None)
        self.gets += 1
        status, part, extra = "200 OK", self.body, ""
        if "range" in headers:
            first, last = headers["range"].split("=")[1].split("-")
            start, end = int(first), min(int(last or len(self.body) - 1), len(self.body) - 1)
            status, part = "206 Partial Content", self.body[start : end + 1]
            extra = f"Content-Range: bytes {start}-{end}/{len(self.body)}\r\n"
        if self.gets <= self.cut_gets:
            return self._head(status, None, extra) + part[: len(part) // 2]
        return self._head(status, len(part), extra) + part

    def _head(self, status: str, length: int | None, extra: str = "") -> bytes:
        said = f"Content-Length: {length}\r\n" if length is not None else ""
        return (
            f'HTTP/1.1 {status}\r\nETag: "{self.etag}"\r\n'
            f"Last-Modified: Wed, 01 Jan 2025 00:00:00 GMT\r\n{extra}{said}"
            "Connection: close\r\n\r\n"
        ).encode()

    def object_url(self) -> str:
        return f"s3://{self.BUCKET}/{self.KEY}"


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Any:
    body = os.urandom(100_000)
    server = ScriptedS3(body)
    point_s3_at(monkeypatch, server.url)
    try:
        yield server
    finally:
        server.close()


# -- verify ends within its deadline ----------------------------------------------------------


@pytest.mark.s3
def test_verify_of_an_s3_object_whose_head_answer_trickles_ends_at_the_deadline(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, short_check_deadline: None
) -> None:
    s3.put("slow.bin", b"tracked bytes")
    entry = s3_entry(s3.url("slow.bin"), b"tracked bytes")
    with fault_proxy(s3_endpoint) as proxy:
        # One byte of the answer's headers every half second: no socket timeout ever trips.
        proxy.add("trickle", f"HEAD /{s3.name}/slow.bin", piece=1, interval=0.5)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_sources()
        problems, took = in_time(lambda: verify_entries([entry], show_progress=False), BOUND)
    assert list(problems) == ["slow.bin"]
    assert s3.url("slow.bin") in problems["slow.bin"].reason
    assert "deadline" in problems["slow.bin"].reason
    assert not problems["slow.bin"].changed  # it could not be checked: not "changed"
    assert CHECK_DEADLINE - 0.5 < took < CHECK_DEADLINE + 5, took


@pytest.mark.gcs
def test_verify_of_a_gcs_object_whose_metadata_answer_trickles_ends_at_the_deadline(
    gcs: GCSBucket, gcs_host: str, monkeypatch: pytest.MonkeyPatch, short_check_deadline: None
) -> None:
    gcs.put("slow.bin", b"tracked bytes")
    (entry,) = source_for_type("GCS").list_location(gcs.url("slow.bin"))
    with fault_proxy(gcs_host, gcs=True) as proxy:
        proxy.add("trickle", f"GET /storage/v1/b/{gcs.name}/o/slow.bin?", piece=1, interval=0.5)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        reset_sources()
        problems, took = in_time(lambda: verify_entries([entry], show_progress=False), BOUND)
    assert list(problems) == ["slow.bin"]
    assert gcs.url("slow.bin") in problems["slow.bin"].reason
    assert "deadline" in problems["slow.bin"].reason
    assert not problems["slow.bin"].changed
    assert CHECK_DEADLINE - 0.5 < took < CHECK_DEADLINE + 5, took


# -- answers S3 servers should not send -------------------------------------------------------


@pytest.mark.s3
def test_a_head_answer_without_content_length_is_one_line_in_track_and_verify(
    scripted: ScriptedS3, cli: Any, tmp_path: Path
) -> None:
    tracked = cli("--project", "p", "track", "f", scripted.object_url())
    assert tracked.returncode == 0, tracked.stderr
    run_id = tracked.last_line
    before = store_counts()

    scripted.head_length = False
    refused = one_line(cli("--project", "p", "track", "g", scripted.object_url()), code=2)
    assert scripted.object_url() in refused
    assert "Content-Length" in refused
    assert store_counts() == before

    verified = cli("verify", run_id)
    assert verified.returncode == 1, (verified.stdout, verified.stderr)
    assert "Traceback" not in verified.stderr
    output = verified.stdout + verified.stderr
    assert scripted.object_url() in output
    assert "Content-Length" in output


@pytest.mark.s3
@pytest.mark.parametrize("path", ["signed-get", "boto3"])
def test_a_body_cut_short_without_content_length_is_fetched_again_whole(
    scripted: ScriptedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: str
) -> None:
    """A 206 that says no length and ends half-way (`Connection: close`) is not the range:
    the read is retried, and the download gets every byte."""
    if path == "boto3":
        monkeypatch.setenv("ARTIFACTFS_S3_LEAN_GET", "0")
        reset_sources()
    run = artifactfs.init_run(project="ml/cls")
    run["data"].track_files(scripted.object_url())
    scripted.cut_gets = 1
    run["data"].download(destination=str(tmp_path / "out"))
    assert (tmp_path / "out" / "obj").read_bytes() == scripted.body
    assert scripted.gets >= 2  # the cut answer, then a whole one


@pytest.mark.s3
def test_a_server_redirecting_without_a_region_is_one_line_naming_the_object(
    s3: S3Bucket, s3_endpoint: str, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore follows a 307 without a region header by asking the bucket's region, which is
    redirected too, and so on: a RecursionError that must not escape."""
    s3.put("ds/a.bin", b"redirected bytes")
    run = artifactfs.init_run(project="p")
    run["data"].track_files(s3.url("ds"))
    (entry,) = run["data"].fetch_files_list()
    run.stop()
    url = s3.url("ds/a.bin")
    before = store_counts()
    with fault_proxy(s3_endpoint) as proxy:
        proxy.add("status", "", status=307)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_sources()

        started = time.monotonic()
        refused = one_line(cli("--project", "p", "track", "f", url), code=2)
        assert url in refused and "redirect" in refused
        assert store_counts() == before

        failed = one_line(cli("download", run.id, "data", str(tmp_path / "out")), code=1)
        assert url in failed and "redirect" in failed
        assert not (tmp_path / "out" / "a.bin").exists()

        verified = cli("verify", run.id)
        assert verified.returncode == 1, (verified.stdout, verified.stderr)
        assert "Traceback" not in verified.stderr
        assert url in verified.stdout + verified.stderr
        assert time.monotonic() - started < 120

        with pytest.raises(artifactfs.ArtifactfsError, match="redirect"):
            source_for_type("S3").read_range(entry, 0, 4)


# -- credentials and endpoints while tracking -------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("profile", "nope"),
        ("credential_process", "AWS_CONFIG_FILE"),
        ("key_without_secret", "AWS_SECRET_ACCESS_KEY"),
        ("unreachable_endpoint", "http://127.0.0.1:1"),
    ],
)
def test_credentials_and_endpoints_that_fail_are_one_line_and_record_nothing(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, named: str
) -> None:
    make_local_store(cli, tmp_path)
    before = store_counts()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    if setting == "profile":
        monkeypatch.setenv("AWS_PROFILE", "nope")
    elif setting == "credential_process":
        config = Path(os.environ["AWS_CONFIG_FILE"])
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text("[default]\ncredential_process = /bin/false\n")
    elif setting == "key_without_secret":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")

    message = one_line(cli("--project", "p", "track", "f", "s3://bkt/ds"), code=2)
    assert named in message
    assert store_counts() == before


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [("http://127.0.0.1:1", "Connection refused"), ("http://nosuchhost.invalid:1", "")],
)
def test_an_unreachable_gcs_endpoint_is_one_line_in_seconds_and_records_nothing(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, endpoint: str, reason: str
) -> None:
    # The client library's own retry kept at it for 120 s, then printed its internals.
    make_local_store(cli, tmp_path)
    before = store_counts()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    for location in ("gs://bkt/ds", "gs://bkt/ds/"):  # an object first, or only a prefix
        started = time.monotonic()
        message = one_line(cli("--project", "p", "track", "f", location), code=2)
        assert f"{location}: cannot reach {endpoint}: {reason}" in message
        assert time.monotonic() - started < 60  # tried a few times, not for two minutes
    assert store_counts() == before


@pytest.mark.gcs
def test_verify_of_a_gcs_object_on_an_unreachable_endpoint_is_one_line_in_seconds(
    cli: Any, gcs: GCSBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify's check retried a refused connection for 30 s (18 s here), then printed
    urllib3's internals; a listing already said it in one line."""
    gcs.put("ds/a.txt", b"first")
    run_id = cli("--project", "p", "track", "f", gcs.url("ds"), check=True).last_line
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    started = time.monotonic()
    verified = cli("verify", run_id)
    assert time.monotonic() - started < 15, verified
    assert verified.returncode == 1, verified
    assert verified.stdout.strip() == (
        f"UNCHECKED f/a.txt: {gcs.url('ds/a.txt')}: "
        "cannot reach http://127.0.0.1:1: Connection refused"
    )


@pytest.mark.gcs
def test_a_gcs_listing_retries_transient_answers(
    cli: Any, gcs: GCSBucket, gcs_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = {"a.txt": b"first", "sub/b.txt": b"second"}
    for name, body in bodies.items():
        gcs.put(f"ds/{name}", body)
    with fault_proxy(gcs_host, gcs=True) as proxy:
        proxy.add("status", f"GET /storage/v1/b/{gcs.name}/o?", times=2, status=503)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        tracked = cli("--project", "p", "track", "f", gcs.url("ds"))
        assert tracked.returncode == 0, tracked.stderr
        assert proxy.faults_applied("status") == 2
    run_id = tracked.stdout.strip().splitlines()[-1]
    listed = cli("--project", "p", "files", run_id, "f", "--json", check=True)
    hashes = {item["file_path"]: item["file_hash"] for item in json.loads(listed.stdout)}
    assert hashes == {name: hashlib.md5(body).hexdigest() for name, body in bodies.items()}


@pytest.mark.gcs
def test_a_gcs_listing_that_keeps_failing_ends_at_the_deadline_in_one_line(
    gcs: GCSBucket, gcs_host: str, monkeypatch: pytest.MonkeyPatch, short_check_deadline: None
) -> None:
    gcs.put("ds/a.txt", b"first")
    with fault_proxy(gcs_host, gcs=True) as proxy:
        proxy.add("status", f"GET /storage/v1/b/{gcs.name}/o?", status=503)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        reset_sources()
        with pytest.raises(artifactfs.ArtifactfsError) as failed:
            in_time(lambda: list(source_for_type("GCS").list_location(gcs.url("ds/"))), BOUND)
        assert proxy.faults_applied("status") >= 2  # retried, then given up
    message = str(failed.value)
    assert message.startswith(f"{gcs.url('ds/')}: cannot list: 503 ")
    assert message.endswith(f"(retried for {CHECK_DEADLINE:.0f} s)")
    assert "\n" not in message


# -- an unreadable local file -----------------------------------------------------------------


def unprivileged() -> list[str]:
    """A prefix that runs a command without the capability to read any file whatever its
    mode (root has it: a chmod 000 file would be read anyway)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes do not apply")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


def cli_unprivileged(*args: str) -> CliResult:
    process = subprocess.run(
        [*unprivileged(), sys.executable, "-m", "artifactfs", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return CliResult(process.returncode, process.stdout, process.stderr)


def test_an_unreadable_local_file_is_refused_by_track_and_reported_by_verify(
    cli: Any, tmp_path: Path
) -> None:
    data = make_tree(tmp_path / "d", {"ok.txt": b"ok", "secret.txt": b"secret"})
    secret = data / "secret.txt"
    make_local_store(cli, tmp_path)
    before = store_counts()
    secret.chmod(0)
    try:
        refused = one_line(cli_unprivileged("--project", "p", "track", "f", str(data)), code=2)
        assert str(secret) in refused and "cannot read" in refused
        assert store_counts() == before

        secret.chmod(0o644)
        tracked = cli("--project", "p", "track", "f", str(data))
        assert tracked.returncode == 0, tracked.stderr
        secret.chmod(0)
        os.utime(secret)  # a new mtime: the hash cache no longer vouches for it

        verified = cli_unprivileged("verify", tracked.last_line)
        assert verified.returncode == 1, (verified.stdout, verified.stderr)
        assert "Traceback" not in verified.stderr
        output = verified.stdout + verified.stderr
        assert "secret.txt" in output and "cannot read" in output
        assert "UNCHECKED f/secret.txt" in verified.stdout  # it may be as tracked
        assert "ok.txt" not in output
    finally:
        secret.chmod(0o644)


@pytest.mark.s3
def test_verify_tells_a_source_it_could_not_check_from_one_that_changed(
    cli: Any, s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file whose object changed is CHANGED; while the server is out of reach, the files are
    UNCHECKED (they may be as tracked): both exit 1, each said for what it is."""
    s3.put("v/a.bin", b"a as tracked")
    s3.put("v/b.bin", b"b as tracked")
    tracked = cli("--project", "p", "track", "f", s3.url("v"))
    assert tracked.returncode == 0, tracked.stderr
    run_id = tracked.last_line
    s3.put("v/b.bin", b"b overwritten")

    changed = cli("verify", run_id)
    (line,) = changed.stdout.splitlines()
    assert line.startswith(f"CHANGED f/b.bin: {s3.url('v/b.bin')}: ")
    summary = one_line(changed, 1)
    assert summary.endswith(f"1 of 2 file(s) in {run_id} no longer match what was tracked")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    unreachable = cli("verify", run_id)
    lines = unreachable.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["UNCHECKED f/a.bin", "UNCHECKED f/b.bin"]
    assert all("127.0.0.1:1" in line for line in lines)
    assert one_line(unreachable, 1).endswith(f"2 of 2 file(s) in {run_id} could not be checked")


@pytest.mark.s3
def test_credentials_that_cannot_be_had_fail_a_check_at_once_as_themselves(
    s3: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing profile is no reason to retry: `verify` says UNCHECKED with the credentials
    message as it is, and a read of a file tracked without a size fails at once."""
    s3.put("creds/a.bin", b"tracked bytes")
    entry = s3_entry(s3.url("creds/a.bin"), b"tracked bytes")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    reset_sources()
    problems, took = in_time(lambda: verify_entries([entry], show_progress=False), BOUND)
    assert took < 5.0, took  # not retried until a deadline
    (problem,) = problems.values()
    assert not problem.changed and "no-such-profile" in problem.reason
    assert "cannot read" not in problem.reason  # not passed off as a transient failure
    unsized = unsized_entry(entry)
    reader = Reader(ChunkCache(Path(os.environ["HOME"]) / "cache", 1 << 26), deadline=20.0)
    try:
        started = time.monotonic()
        with pytest.raises(ReadError, match="no-such-profile"):
            reader.read(unsized, 0, 5)
        assert time.monotonic() - started < 5.0  # not retried until the deadline
    finally:
        reader.close()
        reader.cache.close()


def test_a_read_that_fails_for_want_of_gcs_credentials_names_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount logs a failed read's message as the reason for its EIO, and the line must
    name the file: the credentials message alone said which variable to set, not for what."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server to ask
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login
    reset_sources()
    url = "gs://bkt/creds/a.bin"
    metadata = {"file_path": url, "location": url, "last_modified": "2025-01-01 00:00:00"}
    entry = ArtifactFileData("a.bin", "0" * 32, "GCS", 13, {**metadata, "generation": "1"})
    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26), deadline=20.0)
    try:
        with pytest.raises(ReadError) as failed:
            in_time(lambda: reader.read(entry, 0, 5), BOUND)
    finally:
        reader.close()
        reader.cache.close()
    message = str(failed.value)
    assert message.startswith(f"{url}: no GCS credentials found"), message
    assert message.count(url) == 1


@pytest.mark.s3
def test_a_size_that_cannot_be_learned_fails_at_once_for_a_while_and_within_the_deadline(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file tracked without a size, its server trickling the HEAD that says the size: the
    read fails within the reader's deadline (not the 30 s of a check), and every stat or
    read right after fails at once instead of asking again."""
    s3.put("unsized/slow.bin", b"tracked bytes")
    entry = unsized_entry(s3_entry(s3.url("unsized/slow.bin"), b"tracked bytes"))
    with fault_proxy(s3_endpoint) as proxy:
        proxy.add("trickle", f"HEAD /{s3.name}/unsized/slow.bin", piece=1, interval=0.5)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_sources()
        reader = Reader(ChunkCache(Path(os.environ["HOME"]) / "cache", 1 << 26), deadline=3.0)
        try:
            started = time.monotonic()
            with pytest.raises(ReadError):
                in_time(lambda: reader.read(entry, 0, 5), BOUND)
            assert time.monotonic() - started < 3.0 + 5  # the read's deadline, not a check's
            heads = len(proxy.requests(f"HEAD /{s3.name}/unsized/slow.bin"))
            started = time.monotonic()
            for _ in range(3):
                with pytest.raises(ReadError):
                    reader.read(entry, 0, 5)
            assert time.monotonic() - started < 1.0
            assert len(proxy.requests(f"HEAD /{s3.name}/unsized/slow.bin")) == heads
        finally:
            reader.close()
            reader.cache.close()


@pytest.mark.s3
def test_every_failed_read_names_the_file_also_when_a_remembered_failure_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel retries a failed read at once, and the reader answers it with the failure it
    remembered: that second EIO line said `no AWS credentials found: ...` for no file."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata to ask
    reset_sources()
    url = "s3://bkt/creds/a.bin"
    entry = s3_entry(url, b"tracked bytes")
    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26), deadline=20.0)
    messages = []
    try:
        for _ in range(3):
            with pytest.raises(ReadError) as failed:
                in_time(lambda: reader.read(entry, 0, 5), BOUND)
            messages.append(str(failed.value))
    finally:
        reader.close()
        reader.cache.close()
    for message in messages:
        assert message.startswith(f"{url}: no AWS credentials found: "), messages
        assert message.count(url) == 1, message
    # A file of the same content elsewhere shares the chunk, and its failure: said as its own.
    twin_url = "s3://bkt/creds/twin.bin"
    twin = s3_entry(twin_url, b"tracked bytes")
    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26), deadline=20.0)
    try:
        with pytest.raises(ReadError):
            in_time(lambda: reader.read(entry, 0, 5), BOUND)
        with pytest.raises(ReadError) as failed:
            in_time(lambda: reader.read(twin, 0, 5), BOUND)
    finally:
        reader.close()
        reader.cache.close()
    assert str(failed.value).startswith(f"{twin_url}: {url}: no AWS credentials found"), failed


# -- a bucket the endpoint does not have -----------------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("path", ["signed-get", "boto3"])
def test_a_bucket_not_found_at_the_endpoint_fails_a_read_at_once_saying_where(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: str
) -> None:
    """NoSuchBucket was taken for a transient error: each read retried it for the whole
    deadline (26 s) where a missing key fails at once. The usual cause is a wrong endpoint."""
    if path == "boto3":
        monkeypatch.setenv("ARTIFACTFS_S3_LEAN_GET", "0")
        reset_sources()
    bucket = f"{s3.name}-elsewhere"
    url = f"s3://{bucket}/ds/a.bin"
    entry = s3_entry(url, b"tracked bytes")
    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26), deadline=20.0)
    try:
        for _ in range(2):  # the kernel's retry too
            started = time.monotonic()
            with pytest.raises(ReadError) as failed:
                in_time(lambda: reader.read(entry, 0, 5), BOUND)
            assert time.monotonic() - started < 5.0  # not retried until the deadline
            assert str(failed.value) == (
                f"{url}: bucket {bucket} not found at {s3_endpoint} (is AWS_ENDPOINT_URL right?)"
            )
    finally:
        reader.close()
        reader.cache.close()


@pytest.mark.s3
def test_verify_says_unchecked_for_a_bucket_not_found_and_changed_for_an_object_gone(
    cli: Any, s3: S3Bucket, s3_endpoint: str
) -> None:
    """A HEAD's 404 has no error code: a missing bucket (most often a wrong AWS_ENDPOINT_URL)
    was reported as `CHANGED ...: object no longer exists`. The bucket is asked after it."""
    s3.put("v/a.bin", b"a as tracked")
    s3.put("v/b.bin", b"b as tracked")
    run_id = cli("--project", "p", "track", "f", s3.url("v"), check=True).last_line
    s3.client.delete_object(Bucket=s3.name, Key="v/b.bin")

    gone = cli("verify", run_id)
    assert gone.stdout.splitlines() == [
        f"CHANGED f/b.bin: {s3.url('v/b.bin')}: object no longer exists"
    ], gone

    s3.client.delete_object(Bucket=s3.name, Key="v/a.bin")
    s3.client.delete_bucket(Bucket=s3.name)
    missing = cli("verify", run_id)
    not_found = f"bucket {s3.name} not found at {s3_endpoint} (is AWS_ENDPOINT_URL right?)"
    assert missing.stdout.splitlines() == [
        f"UNCHECKED f/a.bin: {s3.url('v/a.bin')}: {not_found}",
        f"UNCHECKED f/b.bin: {s3.url('v/b.bin')}: {not_found}",
    ], missing
    assert one_line(missing, 1).endswith(f"2 of 2 file(s) in {run_id} could not be checked")


@pytest.mark.s3
def test_verify_of_many_deleted_objects_asks_for_their_bucket_once(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each 404 of a HEAD asked the endpoint for the bucket again: a verify of 10,000 deleted
    objects made 10,000 more requests, all with the same answer."""
    entries = [s3_entry(s3.url(f"gone/{n}.bin"), b"deleted %d" % n) for n in range(24)]
    with fault_proxy(s3_endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        reset_sources()
        problems, _ = in_time(lambda: verify_entries(entries, show_progress=False), BOUND)
        bucket_heads = [
            seen.text for seen in proxy.requests("HEAD /") if seen.text.rstrip("/").count("/") == 1
        ]
    assert sorted(problems) == sorted(e.file_path for e in entries)
    assert all(
        p.changed and p.reason.endswith(": object no longer exists") for p in problems.values()
    ), problems
    # Eight checks run at once: the first few may each ask before one answer is kept.
    assert 1 <= len(bucket_heads) <= 8, bucket_heads


# -- an endpoint that is down -----------------------------------------------------------------

DOWN_DEADLINE = 6.0  # the reader's deadline in these tests (30 s by default)
FAIL_FAST = 2.5  # a read from an endpoint known to refuse connections fails within this


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("s3-signed-get", marks=pytest.mark.s3),
        pytest.param("s3-boto3", marks=pytest.mark.s3),
        pytest.param("gcs", marks=pytest.mark.gcs),
    ],
)
def test_an_endpoint_that_is_down_costs_each_file_one_attempt_until_it_is_back(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    """Every file paid the whole retry deadline in turn (`download` of 64 files: 210 s to
    fail). Now the first read gives up at its deadline and every later one after one refused
    connection, until a read succeeds: the endpoint back, reads work with the same reader."""
    bodies = {f"down/f{i}.bin": os.urandom(3000 + i) for i in range(5)}
    if kind == "gcs":
        gcs: GCSBucket = request.getfixturevalue("gcs")
        for name, body in bodies.items():
            gcs.put(name, body)
        listed = sorted(
            source_for_type("GCS").list_location(gcs.url("down/")), key=lambda e: e.file_path
        )
        upstream, variable = request.getfixturevalue("gcs_host"), "STORAGE_EMULATOR_HOST"
    else:
        s3: S3Bucket = request.getfixturevalue("s3")
        for name, body in bodies.items():
            s3.put(name, body)
        listed = [s3_entry(s3.url(name), body) for name, body in bodies.items()]
        upstream, variable = request.getfixturevalue("s3_endpoint"), "AWS_ENDPOINT_URL"
        if kind == "s3-boto3":
            monkeypatch.setenv("ARTIFACTFS_S3_LEAN_GET", "0")
    with SwitchableRelay(upstream) as relay:  # down: nothing listens on its port
        monkeypatch.setenv(variable, relay.url)
        reset_sources()
        reader = Reader(
            ChunkCache(tmp_path / "cache", 1 << 26), deadline=DOWN_DEADLINE, failure_memory=0.5
        )
        try:
            first, *rest = listed
            with pytest.raises(ReadError) as failed:
                in_time(lambda: reader.read(first, 0, 5), BOUND)
            assert "not retried" not in str(failed.value)  # retried until it gave up
            for entry in rest:
                started = time.monotonic()
                with pytest.raises(ReadError) as failed:
                    in_time(lambda entry=entry: reader.read(entry, 0, 5), BOUND)
                assert time.monotonic() - started < FAIL_FAST
                message = str(failed.value)
                assert message.startswith(f"{entry.source_url}: cannot reach "), message
                assert message.endswith(f"({relay.url} {NOT_RETRIED})"), message
            relay.up()
            time.sleep(0.6)  # past the reader's memory of the failures
            for entry in listed:
                got, _ = in_time(lambda entry=entry: reader.read(entry, 0, 1 << 20), BOUND)
                assert got == bodies[f"down/{entry.file_path}"], entry.file_path
        finally:
            reader.close()
            reader.cache.close()


class HangsUp(ScriptedHttpServer):
    """Takes each connection, reads its request, and closes it without a word."""

    def answer(self, request: str) -> bytes:
        return b""


def test_a_server_that_takes_the_connection_and_hangs_up_is_retried_not_taken_for_down(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """http.client drops its socket on a hang-up as on a refused connect: a server that closed
    after taking the request was counted as down, and later reads were not retried."""
    server = HangsUp()
    point_s3_at(monkeypatch, server.url)
    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26), deadline=3.0, failure_memory=0.1)
    try:
        for name in ("a.bin", "b.bin"):
            entry = s3_entry(f"s3://bkt/hang/{name}", b"tracked bytes")
            time.sleep(0.2)  # past the memory of the failure before
            with pytest.raises(ReadError) as failed:
                in_time(lambda entry=entry: reader.read(entry, 0, 5), BOUND)
            message = str(failed.value)
            assert NOT_RETRIED not in message and "cannot reach" not in message, message
            assert "attempt(s)" in message, message  # retried until it gave up
    finally:
        reader.close()
        reader.cache.close()
        server.close()
        reset_sources()


def test_an_endpoint_whose_connects_time_out_is_known_down_after_one_deadline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A firewall that drops packets: each connect times out. The last attempt's connect is
    clipped to the time left and ends as a deadline cut-off, which hid the failures to
    connect before it: the breaker never opened, and every file paid the whole deadline."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    queued = []  # fill its accept queue, never accepted: later connects get no answer
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        queued.append(filler)
    monkeypatch.setattr(s3_get, "CONNECT_TIMEOUT", 2.0)  # then 0.4 s apart, 3 s deadline
    point_s3_at(monkeypatch, f"http://127.0.0.1:{port}")
    # Made off the clock, as a mount that ran a while has it: on a busy machine, making the
    # client ate enough of the first read's 3 s that its one attempt was cut off connecting.
    s3_client()
    reader = Reader(ChunkCache(tmp_path / "cache", 1 << 26), deadline=3.0, failure_memory=0.1)
    try:
        first = s3_entry("s3://bkt/dropped/a.bin", b"tracked bytes")
        with pytest.raises(ReadError) as failed:
            in_time(lambda: reader.read(first, 0, 5), BOUND)
        assert NOT_RETRIED not in str(failed.value)  # retried until the deadline
        time.sleep(0.2)  # past the memory of that failure
        later = s3_entry("s3://bkt/dropped/b.bin", b"other bytes")
        with pytest.raises(ReadError) as failed:
            in_time(lambda: reader.read(later, 0, 5), BOUND)
        message = str(failed.value)
        assert message.startswith("s3://bkt/dropped/b.bin: cannot reach "), message
        assert message.endswith(f"{NOT_RETRIED})"), message
    finally:
        reader.close()
        reader.cache.close()
        for sock in (*queued, listener):
            sock.close()
        reset_sources()
