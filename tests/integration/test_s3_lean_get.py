"""S3 reads by the signed-GET path (`artifactfs/sources/s3_get.py`), against real servers.

`rclone serve s3` checks every request's SigV4 signature (moto does not), so a read it answers
with the right bytes was signed right: awkward keys, ranges, HTTPS. It ignores `If-Match`: the
answer's ETag is what catches an object rewritten after tracking. moto plays what rclone
cannot: versioned buckets and keys with empty path segments (`a//b`). Every test also shows
that the signed path served the reads, not boto3 (`boto3_gets`), so a fallback that silently
took over would fail them.
"""

from __future__ import annotations

import datetime
import http.client
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from artifactfs.entries import ArtifactFileData
from artifactfs.errors import SourceChangedError
from artifactfs.sources import reset_sources, source_for_type
from artifactfs.sources.base import RequestDeadline
from artifactfs.sources.s3 import lean_getter, s3_client
from tests.conftest import S3Bucket, SigningS3Server
from tests.support.faultproxy import fault_proxy
from tests.support.servers import accepted, rclone_s3

pytestmark = pytest.mark.s3

AWKWARD_KEYS = [
    "sp ace/with space.bin",
    "plus+eq=amp&.bin",
    "tilde~x.bin",
    "pct%41%2Fz.bin",
    "ünï/文字 ✓.bin",
    "ends.",
    "q?x#y;z,@!$'()*.bin",
    "deep/er/key.bin",
]


def _env(monkeypatch: pytest.MonkeyPatch, url: str, key: str, secret: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reset_sources()


def _client(url: str, key: str, secret: str, **options: Any) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        response_checksum_validation="when_required", request_checksum_calculation="when_required"
    )
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=config,
        **options,
    )


@dataclass
class RcloneBucket:
    server: SigningS3Server
    client: Any
    name: str

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def gets(self, key: str) -> int:
        """GETs of the key that the server answered (its log has a line for each)."""
        line = f"GET OBJECT Bucket: {self.name} Object: {key}\n"
        return self.server.log.read_text(encoding="utf-8", errors="replace").count(line)


@pytest.fixture
def rclone(rclone_s3_server: SigningS3Server, monkeypatch: pytest.MonkeyPatch) -> RcloneBucket:
    """A fresh bucket on `rclone serve s3`, with the environment pointed at it."""
    server = rclone_s3_server
    _env(monkeypatch, server.url, server.access_key, server.secret_key)
    client = _client(server.url, server.access_key, server.secret_key)
    name = f"lean-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return RcloneBucket(server, client, name)


def track(url: str) -> dict[str, ArtifactFileData]:
    """Entries of every object under the location, by key."""
    source = source_for_type("S3")
    return {e.metadata["file_path"].split("/", 3)[3]: e for e in source.list_location(url)}


def read(entry: ArtifactFileData, offset: int = 0, length: int | None = None) -> bytes:
    size = entry.size or 0
    return source_for_type("S3").read_range(entry, offset, size if length is None else length)


@contextmanager
def boto3_gets() -> Iterator[list[int]]:
    """How many GetObject requests boto3 sends meanwhile ([count]). The signed path learns a
    bucket's route from a GetObject that botocore prepares but never sends (stopped at
    `before-send` by a handler registered when the client was made): that handler comes first,
    so this one, registered later, counts only the requests that are sent."""
    sent = [0]

    def count(**kwargs: Any) -> None:
        sent[0] += 1

    events = s3_client().meta.events
    events.register("before-send.s3.GetObject", count, unique_id="test-count-gets")
    try:
        yield sent
    finally:
        events.unregister("before-send.s3.GetObject", unique_id="test-count-gets")


def body_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- rclone: signatures checked ---------------------------------------------------------------


def test_awkward_keys_read_back_whole_and_ranged_through_signed_gets(rclone: RcloneBucket) -> None:
    bodies = {key: body_of(3000 + 17 * i, i) for i, key in enumerate(AWKWARD_KEYS)}
    for key, body in bodies.items():
        rclone.put(key, body)
    entries = track(rclone.url())
    assert set(entries) == set(bodies)
    with boto3_gets() as sent:
        for key, body in bodies.items():
            assert read(entries[key]) == body, key
            assert read(entries[key], 1000, 777) == body[1000:1777], key
            assert read(entries[key], len(body) - 5, 5) == body[-5:], key
    assert sent[0] == 0, "boto3 sent GetObjects: the signed path was not used"
    for key in bodies:
        assert rclone.gets(key) == 3, key  # one request per read: no retries, no fallback


def test_an_empty_object_reads_back_empty(rclone: RcloneBucket) -> None:
    rclone.put("empty.bin", b"")
    entry = track(rclone.url("empty.bin"))["empty.bin"]
    with boto3_gets() as sent:
        assert source_for_type("S3").read_range(entry, 0, 1) == b""
    assert sent[0] == 0


def test_a_wrong_secret_key_is_access_denied_and_never_bytes(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("secret.bin", b"secret bytes" * 100)
    entry = track(rclone.url("secret.bin"))["secret.bin"]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    reset_sources()
    with boto3_gets() as sent, pytest.raises(SourceChangedError, match="access denied"):
        read(entry)
    assert sent[0] == 0, "the signed path must report the denial itself"


def test_an_object_rewritten_after_tracking_is_changed_though_the_server_ignores_if_match(
    rclone: RcloneBucket,
) -> None:
    rclone.put("model.bin", body_of(5000, 1))
    entry = track(rclone.url("model.bin"))["model.bin"]
    rclone.put("model.bin", body_of(5000, 2))  # same size, other bytes
    with boto3_gets() as sent:
        with pytest.raises(SourceChangedError, match="changed since it was tracked"):
            read(entry)
        with pytest.raises(SourceChangedError, match="changed since it was tracked"):
            read(entry, 100, 10)
    assert sent[0] == 0
    assert rclone.gets("model.bin") == 2  # answered despite If-Match: the ETag caught it


def test_every_read_is_one_signed_get_and_the_switch_sends_them_through_boto3(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("small.bin", body_of(16 * 1024, 3))
    entry = track(rclone.url("small.bin"))["small.bin"]
    with boto3_gets() as sent:
        for _ in range(25):
            assert read(entry) == body_of(16 * 1024, 3)
    assert sent[0] == 0
    assert rclone.gets("small.bin") == 25

    monkeypatch.setenv("ARTIFACTFS_S3_LEAN_GET", "0")
    reset_sources()
    with boto3_gets() as sent:  # the same count, made to see boto3's requests: it does
        for _ in range(5):
            assert read(entry) == body_of(16 * 1024, 3)
    assert sent[0] == 5
    assert rclone.gets("small.bin") == 30


def test_reads_from_many_threads_each_get_their_bytes(rclone: RcloneBucket) -> None:
    bodies = {f"t/{i:02d}.bin": body_of(20_000 + i, i) for i in range(16)}
    for key, body in bodies.items():
        rclone.put(key, body)
    entries = track(rclone.url("t"))
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            key = rng.choice(list(bodies))
            start = rng.randrange(0, 20_000)
            length = rng.randrange(1, 5000)
            try:
                got = read(entries[key], start, length)
            except Exception as exc:
                failures.append(f"{key} [{start}, +{length}): {exc!r}")
                continue
            if got != bodies[key][start : start + length]:
                failures.append(f"{key} [{start}, +{length}): wrong bytes")

    with boto3_gets() as sent:
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not failures
    assert not any(thread.is_alive() for thread in threads)
    assert sent[0] == 0


class ClosesIdleConnections:
    """A proxy to a real server that answers one request per connection and then closes it
    without saying so (no `Connection: close`): what a server does to a kept-alive connection
    it found idle too long, just before the client sends its next request on it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.answered = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        for client in accepted(self._listener, self._stop):
            with client:
                client.settimeout(10)
                with suppress(OSError):
                    self._answer(client)

    def _answer(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            piece = client.recv(4096)
            if not piece:
                return
            head += piece
        request_line, *lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
        try:
            upstream.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for line in lines:
                name, _, value = line.partition(":")
                upstream.putheader(name, value.strip())
            upstream.endheaders()
            response = upstream.getresponse()
            body = response.read()
            headers = [
                f"{name}: {value}"
                for name, value in response.getheaders()
                if name.lower() not in ("connection", "content-length", "transfer-encoding")
            ]
        finally:
            upstream.close()
        status = f"HTTP/1.1 {response.status} {response.reason}"
        answer = "\r\n".join([status, *headers, f"Content-Length: {len(body)}", "", ""])
        # Counted before sending: the client may check the count as soon as it has the answer.
        self.answered += 1
        client.sendall(answer.encode("latin-1") + body)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()


def test_a_kept_alive_connection_closed_by_the_server_is_replaced_not_an_error(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("kept.bin", body_of(10_000, 4))
    entry = track(rclone.url("kept.bin"))["kept.bin"]
    port = int(rclone.server.url.rsplit(":", 1)[1])
    proxy = ClosesIdleConnections(port)
    try:
        _env(monkeypatch, f"http://127.0.0.1:{proxy.port}", rclone.server.access_key,
             rclone.server.secret_key)  # fmt: skip
        with boto3_gets() as sent:
            for _ in range(6):  # each read after the first finds its connection closed
                assert read(entry) == body_of(10_000, 4)
        assert sent[0] == 0
        assert proxy.answered == 6
    finally:
        proxy.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_is_verified_against_the_clients_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    access, secret = "artifactfstls", "artifactfs-tls-secret"
    with rclone_s3(tmp_path / "rclone.log", tmp_path / "data", access, secret, (cert, key)) as url:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        _env(monkeypatch, url, access, secret)
        client = _client(url, access, secret, verify=str(cert))
        client.create_bucket(Bucket="tls")
        client.put_object(Bucket="tls", Key="x y.bin", Body=body_of(9000, 5))
        entry = track("s3://tls/x y.bin")["x y.bin"]
        with boto3_gets() as sent:
            assert read(entry, 10, 8000) == body_of(9000, 5)[10:8010]
        assert sent[0] == 0
        log = (tmp_path / "rclone.log").read_text()
        assert log.count("GET OBJECT Bucket: tls Object: x y.bin") == 1

        # Without the bundle the certificate is not trusted: no bytes, by either path.
        monkeypatch.delenv("AWS_CA_BUNDLE")
        reset_sources()
        with pytest.raises(Exception, match=r"(?i)certificate"):
            read(entry)


# -- moto: what rclone cannot play --------------------------------------------------------------


def test_keys_with_empty_segments_are_sent_as_they_are(s3: S3Bucket) -> None:
    bodies = {"a//b": b"double slash", "x//y//": b"trailing", "//lead": b"leading", "d.": b"dot"}
    for key, body in bodies.items():
        s3.put(key, body)
    entries = track(s3.url())
    with boto3_gets() as sent:
        for key, body in bodies.items():
            if key.endswith("/"):
                assert key not in entries  # a folder marker, never tracked
                continue
            assert read(entries[key]) == body, key
    assert sent[0] == 0


def test_a_stalled_answer_in_a_batch_holds_up_no_other(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answers of a batch are read as they arrive: the first object's server never
    answers, the other seven come back whole at once, and the silent one is given up at the
    deadline (None: its reader then reads it alone)."""
    bodies = {f"stall/{i}.bin": body_of(2000 + i, 300 + i) for i in range(8)}
    for key, body in bodies.items():
        s3.put(key, body)
    entries = track(s3.url("stall"))
    keys = sorted(bodies)
    with fault_proxy(s3_endpoint) as proxy:
        proxy.add("stall", f"GET /{s3.name}/{keys[0]} ", seconds=60.0)
        _env(monkeypatch, proxy.url, "testing", "testing")
        source = source_for_type("S3")
        lean = lean_getter()
        assert lean is not None
        answered: dict[str, float] = {}  # when each answer was read, by URL
        real_finish = lean._finish

        def finish(request: Any, connection: Any, response: Any) -> bytes | None:
            answered[request.url] = time.monotonic() - start
            return real_finish(request, connection, response)

        monkeypatch.setattr(lean, "_finish", finish)
        start = time.monotonic()
        with RequestDeadline(4.0, "s3://batch"):
            got = source.read_many([entries[key] for key in keys])
        took = time.monotonic() - start
    assert got[0] is None
    assert got[1:] == [bodies[key] for key in keys[1:]]
    # The seven were read before the stalled one was given up, not after it.
    assert len(answered) == 7 and max(answered.values()) < 2.0, answered
    assert 3.5 < took < 8.0, took


def test_a_pinned_version_is_read_by_its_version_id(s3: S3Bucket) -> None:
    s3.client.put_bucket_versioning(Bucket=s3.name, VersioningConfiguration={"Status": "Enabled"})
    s3.put("v.bin", b"first version " * 50)
    entry = track(s3.url("v.bin"))["v.bin"]
    assert "version_id" in entry.metadata
    s3.put("v.bin", b"first version " * 50)  # the same bytes again: same ETag, new version
    with boto3_gets() as sent:
        assert read(entry, 6, 7) == b"version"
    assert sent[0] == 0
    s3.client.delete_object(Bucket=s3.name, Key="v.bin", VersionId=entry.metadata["version_id"])
    with boto3_gets() as sent, pytest.raises(SourceChangedError, match="no longer exists"):
        read(entry)
    assert sent[0] == 0


def test_an_answer_left_to_botocore_makes_the_bucket_boto3s(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("r.bin", b"redirected " * 100)
    entry = track(s3.url("r.bin"))["r.bin"]
    with fault_proxy(s3_endpoint) as proxy:
        # What S3 says to a request signed for the wrong region.
        proxy.add(
            "status", f"GET /{s3.name}/r.bin", times=1, status=400,
            code="AuthorizationHeaderMalformed",
        )  # fmt: skip
        _env(monkeypatch, proxy.url, "testing", "testing")
        with boto3_gets() as sent:
            assert read(entry) == b"redirected " * 100  # the same read, by boto3
            assert sent[0] == 1
            assert read(entry) == b"redirected " * 100
            assert sent[0] == 2  # and the bucket's next reads too
        texts = [seen.text for seen in proxy.seen]
    assert len([t for t in texts if re.match(rf"GET /{s3.name}/r.bin\b", t)]) == 3


def test_many_objects_read_together_come_back_whole_and_a_rewritten_one_does_not(
    rclone: RcloneBucket,
) -> None:
    """`read_many` (the prefetcher's batches) sends the GETs of a batch together, each on a
    connection of its own, then reads the answers: every object comes back whole; one
    rewritten after tracking comes back None (its reader then reads it alone, and fails)."""
    bodies = {f"batch/{i:02d}.bin": body_of(1000 + 37 * i, 100 + i) for i in range(12)}
    for key, body in bodies.items():
        rclone.put(key, body)
    entries = track(rclone.url("batch"))
    rclone.put("batch/05.bin", body_of(1000 + 37 * 5, 999))  # same size, other bytes
    keys = sorted(bodies)
    source = source_for_type("S3")
    with boto3_gets() as sent:
        first = source.read_many([entries[key] for key in keys])
        again = source.read_many([entries[key] for key in keys])  # on the kept connections
    assert sent[0] == 0, "boto3 sent GetObjects: the signed path was not used"
    for key, one, two in zip(keys, first, again, strict=True):
        expected = None if key == "batch/05.bin" else bodies[key]
        assert one == expected, key
        assert two == expected, key
    for key in keys:
        assert rclone.gets(key) == 2, key  # one GET per object and batch, none resent
