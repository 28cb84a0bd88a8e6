"""S3 helpers shared by the tests of the signed-GET paths (`s3_get`, `s3_loop`)."""

from __future__ import annotations

import datetime
import http.client
import random
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from artifactfs.entries import ArtifactFileData
from artifactfs.sources import reset_sources, source_for_type
from artifactfs.sources.s3 import s3_client
from tests.support.servers import accepted, rclone_s3

if TYPE_CHECKING:
    from tests.conftest import SigningS3Server

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


def point_at(monkeypatch: pytest.MonkeyPatch, url: str, key: str, secret: str) -> None:
    """Point the environment (and the process's S3 client) at this server and identity."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reset_sources()


def client_for(url: str, key: str, secret: str, **options: Any) -> Any:
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


def new_rclone_bucket(server: SigningS3Server, monkeypatch: pytest.MonkeyPatch) -> RcloneBucket:
    """A fresh bucket on `rclone serve s3`, with the environment pointed at it."""
    point_at(monkeypatch, server.url, server.access_key, server.secret_key)
    client = client_for(server.url, server.access_key, server.secret_key)
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


def self_signed(directory: Path) -> tuple[Path, Path]:
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


@contextmanager
def behind_a_closing_proxy(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ClosesIdleConnections]:
    """The environment pointed at `rclone` through a `ClosesIdleConnections` proxy."""
    proxy = ClosesIdleConnections(int(rclone.server.url.rsplit(":", 1)[1]))
    try:
        server = rclone.server
        point_at(
            monkeypatch, f"http://127.0.0.1:{proxy.port}", server.access_key, server.secret_key
        )
        yield proxy
    finally:
        proxy.close()


TLS_BODY = random.Random(5).randbytes(9000)


@contextmanager
def tls_server_with_one_object(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ArtifactFileData, Path]]:
    """`rclone serve s3` over HTTPS with a self-signed certificate, trusted through
    AWS_CA_BUNDLE, holding `s3://tls/x y.bin` (TLS_BODY): its entry, and the server's log."""
    cert, key = self_signed(directory)
    access, secret = "artifactfstls", "artifactfs-tls-secret"
    log = directory / "rclone.log"
    with rclone_s3(log, directory / "data", access, secret, (cert, key)) as url:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        point_at(monkeypatch, url, access, secret)
        client = client_for(url, access, secret, verify=str(cert))
        client.create_bucket(Bucket="tls")
        client.put_object(Bucket="tls", Key="x y.bin", Body=TLS_BODY)
        yield track("s3://tls/x y.bin")["x y.bin"], log
