"""`RequestDeadline` cuts off the S3 and GCS clients' requests when it passes, however slowly the
server answers (no moto, no emulator: a local server that trickles its answer, headers or body,
one byte at a time, which never trips a socket timeout).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from artifactfs.cache import ChunkCache
from artifactfs.entries import ArtifactFileData
from artifactfs.errors import TransientSourceError
from artifactfs.reader import Reader, ReadError
from artifactfs.sources import base as base_module
from artifactfs.sources import gcs as gcs_module
from artifactfs.sources import reset_sources
from artifactfs.sources import s3 as s3_module
from artifactfs.sources import s3_get as s3_get_module
from artifactfs.sources.base import DeadlinePassedError, RequestDeadline
from tests.support.servers import accepted

BODY = b"x" * 1000
ETAG = hashlib.md5(BODY).hexdigest()
HEADERS = (
    f'HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nETag: "{ETAG}"\r\n'
    "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
).encode()
INTERVAL = 0.1  # between two bytes of a trickle: far below any socket timeout
SERVER_LIMIT = 20.0  # no connection is served longer than this, whatever the client does


class TrickleServer:
    """Answers every request with BODY: the headers at once and the body byte by byte
    (`mode="body"`), or all of it byte by byte (`mode="headers"`), or at once (`mode="fast"`).
    Records when each connection ended (the client closed it, or cut it off)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.ended: list[float] = []
        self.connections: list[float] = []  # when each connection was accepted
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        for client in accepted(self._listener, self._stop):
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        self.connections.append(time.monotonic())
        give_up = time.monotonic() + SERVER_LIMIT
        with client:
            client.settimeout(1.0)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                try:
                    piece = client.recv(4096)
                except OSError:
                    return
                if not piece:
                    return
                request += piece
            answer = HEADERS + BODY
            if self.mode == "body":
                client.sendall(HEADERS)
                answer = BODY
            elif self.mode == "fast":
                client.sendall(answer)
                answer = b""
            try:
                for index in range(len(answer)):
                    if self._stop.is_set() or time.monotonic() > give_up:
                        return
                    client.sendall(answer[index : index + 1])
                    self._stop.wait(INTERVAL)
            except OSError:
                pass  # the client went away
            finally:
                self.ended.append(time.monotonic())


@contextmanager
def trickle_server(mode: str) -> Iterator[TrickleServer]:
    server = TrickleServer(mode)
    try:
        yield server
    finally:
        server.stop()


def entry_for(url: str, kind: str) -> ArtifactFileData:
    metadata = {"file_path": url, "location": url}
    return ArtifactFileData("f.bin", ETAG, kind, len(BODY), metadata)


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reset_sources()
    yield
    reset_sources()


def wait_for(condition: Any, seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while not condition() and time.monotonic() < give_up:
        time.sleep(0.02)
    return bool(condition())


def timed_failure(call: Any) -> tuple[BaseException, float]:
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        call()
    return info.value, time.monotonic() - start


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_an_s3_read_is_cut_off_at_the_deadline(
    s3_endpoint: None, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    with trickle_server(mode) as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        source = s3_module.S3Source()
        entry = entry_for("s3://bucket/f.bin", "S3")
        # Made before the deadline's scope: on a loaded machine making the client alone can
        # take the whole second, and the read would then be cut off before it is sent.
        s3_module.s3_client()
        s3_module.lean_getter()
        with RequestDeadline(1.0, entry.source_url):
            error, seconds = timed_failure(lambda: source.read_range(entry, 0, len(BODY)))
        assert isinstance(error, TransientSourceError), repr(error)
        assert "s3://bucket/f.bin" in str(error)
        assert server.connections, "the read never reached the server"
        # Cut off near the 1 s deadline, not left to trickle on: botocore may make its second
        # attempt (which fails before it is sent) after up to 1 s; a loaded machine adds more.
        assert 0.9 < seconds < 8.0, seconds
        # The connection was shut down, not left to trickle on: the server notices at its
        # next byte or two.
        assert wait_for(lambda: len(server.ended) > 0, 2.0), "the server still trickles"


def test_an_s3_read_that_times_out_closes_its_socket_at_once(
    s3_endpoint: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that fails on its own (here a socket timeout shorter than the trickle's pauses,
    before any deadline) closes the socket there and then: after `Connection: close` the
    socket belongs to the answer, which the error's traceback keeps alive."""
    with trickle_server("body") as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        monkeypatch.setattr(s3_get_module, "READ_TIMEOUT", INTERVAL / 4)
        source = s3_module.S3Source()
        entry = entry_for("s3://bucket/f.bin", "S3")
        error, seconds = timed_failure(lambda: source.read_range(entry, 0, len(BODY)))
        assert isinstance(error, TransientSourceError), repr(error)
        assert "timed out" in str(error) and seconds < 5.0, (error, seconds)
        # `error` is still held: the server notices at its next byte or two all the same.
        assert wait_for(lambda: len(server.ended) > 0, 2.0), "the server still trickles"


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_a_gcs_read_is_cut_off_at_the_deadline(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    with trickle_server(mode) as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        reset_sources()
        try:
            source = gcs_module.GCSSource()
            # The answer carries no identity: the source would ask for the metadata, which is
            # not what this test is about.
            monkeypatch.setattr(source, "_metadata_problem", lambda entry: None)
            entry = entry_for("gs://bucket/f.bin", "GCS")
            gcs_module.gcs_client()  # made before the scope, as for S3 above
            with RequestDeadline(1.0, entry.source_url):
                error, seconds = timed_failure(lambda: source.read_range(entry, 0, len(BODY)))
        finally:
            reset_sources()
        assert isinstance(error, TransientSourceError), repr(error)
        assert "gs://bucket/f.bin" in str(error)
        assert server.connections, "the read never reached the server"
        assert 0.9 < seconds < 8.0, seconds
        assert wait_for(lambda: len(server.ended) > 0, 2.0), "the server still trickles"


def test_a_fast_answer_is_not_disturbed_and_outside_a_scope_nothing_is_watched(
    s3_endpoint: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trickle_server("fast") as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        source = s3_module.S3Source()
        entry = entry_for("s3://bucket/f.bin", "S3")
        with RequestDeadline(5.0, entry.source_url):
            assert source.read_range(entry, 0, len(BODY)) == BODY
        assert source.read_range(entry, 0, len(BODY)) == BODY


def test_a_request_started_after_the_deadline_fails_before_it_is_sent() -> None:
    connection = SimpleNamespace(sock=None)
    # Passed as it starts: refused at once, whether or not the watchdog has come round yet.
    with RequestDeadline(0.0, "s3://bucket/late.bin") as scope:
        assert scope.expired
        with pytest.raises(DeadlinePassedError) as info:
            scope.watch(connection)
        assert "s3://bucket/late.bin" in str(info.value)
        with pytest.raises(TransientSourceError):
            scope.check()


def test_the_reader_gives_eio_within_its_deadline_and_remembers_it(
    s3_endpoint: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A read of an endlessly trickling object: ReadError naming the file after about the
    deadline; the kernel's retry right after gets it at once."""
    with trickle_server("headers") as server:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        cache = ChunkCache(tmp_path / "cache", 1 << 26, free_floor_bytes=0)
        reader = Reader(cache, deadline=1.5)
        try:
            entry = entry_for("s3://bucket/slow.bin", "S3")
            error, seconds = timed_failure(lambda: reader.read(entry, 0, 100))
            assert isinstance(error, ReadError), repr(error)
            assert "s3://bucket/slow.bin" in str(error) and "deadline" in str(error)
            assert 1.4 < seconds < 8.0, seconds
            retry, again = timed_failure(lambda: reader.read(entry, 0, 100))
            assert isinstance(retry, ReadError) and again < 0.5
            assert reader.cached_bytes(entry) == 0
        finally:
            reader.close()


def test_scopes_expire_on_time_without_a_thread_each() -> None:
    """Thousands of chunk fetches a second each open a scope: one watchdog thread expires
    them all, in deadline order, and a scope that ended is never expired."""
    before = threading.active_count()
    ended = []
    for _ in range(500):
        with RequestDeadline(0.05, "s3://b/ended") as scope:
            ended.append(scope)
    late = RequestDeadline(3.0, "s3://b/late").__enter__()
    soon = RequestDeadline(0.1, "s3://b/soon").__enter__()
    assert threading.active_count() <= before + 1
    # Expired by the watchdog, not only by the clock; the margins allow a loaded machine.
    assert wait_for(lambda: soon._expired, 2.5)
    assert not late._expired
    assert wait_for(lambda: late._expired, 10.0)
    soon.__exit__(None, None, None)
    late.__exit__(None, None, None)
    assert not any(scope._expired for scope in ended)


def test_ended_scopes_do_not_pile_up_until_their_deadlines() -> None:
    """Each chunk fetch opens a scope with a 30 s deadline and ends it within milliseconds:
    at thousands of fetches a second the watchdog must not keep them all for 30 s."""
    live = RequestDeadline(30.0, "s3://b/live").__enter__()
    for _ in range(20_000):
        with RequestDeadline(30.0, "s3://b/quick"):
            pass
    pending = base_module._watchdog._pending
    assert len(pending) <= 2 * base_module.COMPACT_AFTER_ENDED + 100, len(pending)
    assert any(item[2] is live for item in pending)  # a scope still open is kept
    live.__exit__(None, None, None)
