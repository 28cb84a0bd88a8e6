"""Small S3 objects read by tasks of a trio loop (`artifactfs/sources/s3_loop.py`), and the
reader's prefetch batches read that way (`artifactfs/fs/loop_batches.py`), against real
servers: `rclone serve s3` checks signatures, moto behind the fault proxy plays the failures.

What must hold: the bytes that come back are the tracked ones; anything else (a fault, an
answer not understood, another object) comes back None, within the time given, so that the
reader fetches that file alone, the way that retries and says why; and nothing that would
block (building the client, learning a bucket's route) runs on the loop.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from artifactfs.cache import ChunkCache
from artifactfs.entries import TYPE_S3, ArtifactFileData
from artifactfs.fs.loop_batches import LoopBatches
from artifactfs.reader import Reader, ReadError
from artifactfs.sources import reset_sources, s3_loop, source_for_type
from artifactfs.sources import s3 as s3_module
from artifactfs.sources.s3_get import LeanGetter
from tests.conftest import S3Bucket
from tests.support.faultproxy import fault_proxy
from tests.support.s3_helpers import (
    AWKWARD_KEYS,
    TLS_BODY,
    RcloneBucket,
    behind_a_closing_proxy,
    body_of,
    boto3_gets,
    point_at,
    tls_server_with_one_object,
    track,
)
from tests.support.servers import ScriptedHttpServer

pytestmark = pytest.mark.s3


def read_on_loop(entries: Sequence[ArtifactFileData], seconds: float = 10.0) -> list[Any] | None:
    source = source_for_type("S3")
    return trio.run(source.read_many_on_loop, entries, seconds)


# -- rclone: signatures checked -------------------------------------------------------------------


def test_objects_come_back_whole_on_kept_connections_and_a_rewritten_one_does_not(
    rclone: RcloneBucket,
) -> None:
    bodies = {key: body_of(2000 + 13 * i, i) for i, key in enumerate(AWKWARD_KEYS)}
    bodies |= {f"more/{i}.bin": body_of(16 * 1024, 50 + i) for i in range(4)}
    for key, body in bodies.items():
        rclone.put(key, body)
    entries = track(rclone.url())
    rclone.put("more/2.bin", body_of(16 * 1024, 999))  # same size, other bytes
    keys = sorted(bodies)
    batch = [entries[key] for key in keys]
    source = source_for_type("S3")

    async def twice() -> tuple[Any, Any, set[int], set[int]]:
        first = await source.read_many_on_loop(batch, 10.0)
        kept_first = {
            id(stream) for streams in s3_loop._idle_connections().values() for stream in streams
        }
        again = await source.read_many_on_loop(batch, 10.0)
        kept_again = {
            id(stream) for streams in s3_loop._idle_connections().values() for stream in streams
        }
        return first, again, kept_first, kept_again

    with boto3_gets() as sent:
        first, again, kept_first, kept_again = trio.run(twice)
    assert sent[0] == 0, "boto3 sent GetObjects: the signed GETs were not used"
    for key, one, two in zip(keys, first, again, strict=True):
        expected = None if key == "more/2.bin" else bodies[key]
        assert one == expected, key
        assert two == expected, key
        assert rclone.gets(key) == 2, key  # one GET per object and batch, none resent
    # Every answer was read whole, so every connection was kept, and the second batch went
    # out on those same connections.
    assert len(kept_first) == len(keys)
    assert kept_again == kept_first


def test_building_the_client_and_learning_the_route_run_off_the_loop(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("first.bin", body_of(5000, 7))
    entry = track(rclone.url("first.bin"))["first.bin"]
    reset_sources()  # no client, no route known: as in a daemon just started
    threads: dict[str, int] = {}
    real_client, real_route = s3_module.s3_client, LeanGetter.route

    def client() -> Any:
        threads.setdefault("client", threading.get_ident())
        return real_client()

    def route(self: LeanGetter, bucket: str) -> Any:
        if threading.get_ident() in loop_threads and not self.knows_route(bucket):
            threads["botocore asked on the loop"] = threading.get_ident()
        threads.setdefault("route", threading.get_ident())
        return real_route(self, bucket)

    monkeypatch.setattr(s3_module, "s3_client", client)
    monkeypatch.setattr(LeanGetter, "route", route)

    loop_threads: set[int] = set()
    # A bucket whose route cannot be learnt (botocore refuses its name): asked again by the
    # reader's thread, never on the loop.
    unroutable = ArtifactFileData("x", "0" * 32, TYPE_S3, 10, {"file_path": "s3://bad_name!/x"})

    async def main() -> Any:
        loop_threads.add(threading.get_ident())
        return await source_for_type("S3").read_many_on_loop([entry, unroutable], 10.0)

    assert trio.run(main) == [body_of(5000, 7), None]
    assert set(threads) == {"client", "route"}
    assert not loop_threads & set(threads.values()), threads


def test_a_kept_alive_connection_closed_by_the_server_is_resent_on_a_new_one(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("kept.bin", body_of(10_000, 4))
    entry = track(rclone.url("kept.bin"))["kept.bin"]
    with behind_a_closing_proxy(rclone, monkeypatch) as proxy:
        source = source_for_type("S3")

        async def six() -> list[Any]:
            return [await source.read_many_on_loop([entry], 10.0) for _ in range(6)]

        # Each batch after the first finds its kept connection closed: resent, not lost.
        assert trio.run(six) == [[body_of(10_000, 4)]] * 6
        assert proxy.answered == 6


def test_https_is_verified_against_the_clients_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tls_server_with_one_object(tmp_path, monkeypatch) as (entry, log):
        assert read_on_loop([entry]) == [TLS_BODY]

        # Without the bundle the certificate is not trusted: no bytes.
        monkeypatch.delenv("AWS_CA_BUNDLE")
        reset_sources()
        assert read_on_loop([entry]) == [None]
    assert log.read_text().count("GET OBJECT Bucket: tls Object: x y.bin") == 1


def test_the_switch_leaves_batches_to_threads(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("off.bin", b"x" * 100)
    entry = track(rclone.url("off.bin"))["off.bin"]
    monkeypatch.setenv("ARTIFACTFS_S3_LEAN_GET", "0")
    reset_sources()
    assert read_on_loop([entry]) is None  # the reader then reads the batch on a thread


# -- moto behind the fault proxy: failures ---------------------------------------------------------

FAULTS = {
    "500": {"fault": "status", "status": 500},
    "403": {"fault": "status", "status": 403},
    "reset": {"fault": "reset"},
    "reset-mid-body": {"fault": "reset_mid"},
    "cut-short": {"fault": "cut"},
    "stall": {"fault": "stall", "seconds": 60.0},
    "trickle": {"fault": "trickle", "piece": 10, "interval": 0.5},
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_leaves_that_object_to_the_reader_and_holds_up_no_other(
    fault: str, s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = {f"f/{i}.bin": body_of(3000 + i, 200 + i) for i in range(8)}
    for key, body in bodies.items():
        s3.put(key, body)
    entries = track(s3.url("f"))
    keys = sorted(bodies)
    with fault_proxy(s3_endpoint) as proxy:
        options = dict(FAULTS[fault])
        proxy.add(str(options.pop("fault")), f"GET /{s3.name}/{keys[3]} ", **options)
        point_at(monkeypatch, proxy.url, "testing", "testing")
        started = time.monotonic()
        got = read_on_loop([entries[key] for key in keys], seconds=5.0)
        took = time.monotonic() - started
    assert got is not None
    assert got[3] is None
    assert got[:3] + got[4:] == [bodies[key] for key in keys[:3] + keys[4:]]
    assert took < 10.0, took  # the time limit (5 s) holds, whatever the server does


class ScriptedServer(ScriptedHttpServer):
    """Answers every request on a connection with `answer(body)`, as given: answers no S3
    server should send, to see that none of them is taken for the object's bytes."""

    def __init__(self, answer: Callable[[bytes], bytes], body: bytes) -> None:
        self._answer = answer
        self._body = body
        super().__init__()

    def answer(self, request: str) -> bytes:
        return self._answer(self._body)


def _etag(body: bytes) -> str:
    return hashlib.md5(body).hexdigest()


ANSWERS: dict[str, Callable[[bytes], bytes]] = {
    "a proper answer": lambda b: (
        f'HTTP/1.1 200 OK\r\nETag: "{_etag(b)}"\r\nContent-Length: {len(b)}\r\n\r\n'.encode() + b
    ),
    "chunked": lambda b: (
        f'HTTP/1.1 200 OK\r\nETag: "{_etag(b)}"\r\nTransfer-Encoding: chunked\r\n\r\n'
        f"{len(b):x}\r\n".encode()
        + b
        + b"\r\n0\r\n\r\n"
    ),
    "two ETags": lambda b: (
        f'HTTP/1.1 200 OK\r\nETag: "{_etag(b)}"\r\nETag: "{_etag(b"x")}"\r\n'
        f"Content-Length: {len(b)}\r\n\r\n".encode()
        + b
    ),
    "body cut short": lambda b: (
        f'HTTP/1.1 200 OK\r\nETag: "{_etag(b)}"\r\nContent-Length: {len(b)}\r\n\r\n'.encode()
        + b[:-10]
    ),
    "no length, ends at close": lambda b: (
        f'HTTP/1.0 200 OK\r\nETag: "{_etag(b)}"\r\n\r\n'.encode() + b
    ),
    "more bytes than the length": lambda b: (
        f'HTTP/1.1 200 OK\r\nETag: "{_etag(b)}"\r\nContent-Length: {len(b) - 10}\r\n\r\n'.encode()
        + b
    ),
    "a redirect": lambda b: (
        b"HTTP/1.1 301 Moved Permanently\r\nLocation: http://elsewhere/\r\n"
        b"Content-Length: 0\r\n\r\n"
    ),
    "not HTTP": lambda b: b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "headers never end": lambda b: (
        b"HTTP/1.1 200 OK\r\n" + b"X-Filler: aaaaaaaaaaaaaaaa\r\n" * 8000
    ),
}


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_an_answer_not_certainly_the_object_is_not_taken(
    answer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = body_of(4000, 11)
    server = ScriptedServer(ANSWERS[answer], body)
    try:
        point_at(monkeypatch, server.url, "testing", "testing")
        url = "s3://scripted/obj.bin"
        entry = ArtifactFileData("obj.bin", _etag(body), TYPE_S3, len(body), {"file_path": url})
        got = read_on_loop([entry], seconds=5.0)
    finally:
        server.close()
    assert got == ([body] if answer == "a proper answer" else [None])


# -- the reader's prefetch batches on a loop ------------------------------------------------------


def test_prefetch_batches_run_on_the_loop_and_other_bytes_are_never_served(
    s3: S3Bucket, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount's set-up: every batch is read by tasks of the loop, none on a thread; each
    file is checked and cached; one whose answer has a byte flipped under the right ETag
    (the loop takes it: headers and length are right) fails the reader's hash check and is
    never served."""
    bodies = {f"p/{i:02d}.bin": body_of(16 * 1024, 400 + i) for i in range(20)}
    for key, body in bodies.items():
        s3.put(key, body)
    entries = track(s3.url("p"))
    keys = sorted(bodies)
    reader = Reader(ChunkCache(tmp_path / "cache", 64 * 1024 * 1024, free_floor_bytes=0))
    on_threads: list[int] = []
    monkeypatch.setattr(reader, "_fetch_batch", lambda batch: on_threads.append(len(batch)))
    try:
        with fault_proxy(s3_endpoint) as proxy:
            proxy.add("flip", f"GET /{s3.name}/{keys[5]} ", flip_at=100)  # every time
            point_at(monkeypatch, proxy.url, "testing", "testing")

            async def prefetch_all() -> None:
                async with trio.open_nursery() as nursery:
                    token = trio.lowlevel.current_trio_token()
                    reader.batch_starter = LoopBatches(nursery, token)
                    assert reader.prefetch([entries[key] for key in keys]) == len(keys)
                    with trio.fail_after(30):
                        while any(reader.fetch_under_way(entries[k], 0, 16 * 1024) for k in keys):
                            await trio.sleep(0.01)

            trio.run(prefetch_all)
            reader.batch_starter = None
            assert on_threads == []
            assert reader.cache.snapshot()["fetched_bytes"] == 20 * 16 * 1024

            def gets_of_the_good_ones() -> int:
                return len([seen for seen in proxy.seen if keys[5] not in seen.text])

            gets_before = gets_of_the_good_ones()
            for index, key in enumerate(keys):
                if index == 5:
                    with pytest.raises(ReadError, match="hash"):
                        reader.read(entries[key], 0, 16 * 1024)
                else:
                    assert reader.read(entries[key], 0, 16 * 1024) == bodies[key], key
            assert gets_of_the_good_ones() == gets_before  # the nineteen came from the cache
    finally:
        reader.close()
