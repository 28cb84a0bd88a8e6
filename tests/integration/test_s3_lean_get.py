"""S3 reads by the signed-GET path (`artifactfs/sources/s3_get.py`), against real servers.

`rclone serve s3` checks every request's SigV4 signature (moto does not), so a read it answers
with the right bytes was signed right: awkward keys, ranges, HTTPS. It ignores `If-Match`: the
answer's ETag is what catches an object rewritten after tracking. moto plays what rclone
cannot: versioned buckets and keys with empty path segments (`a//b`). Every test also shows
that the signed path served the reads, not boto3 (`boto3_gets`), so a fallback that silently
took over would fail them.
"""

from __future__ import annotations

import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from artifactfs.errors import SourceChangedError
from artifactfs.sources import reset_sources, source_for_type
from artifactfs.sources.base import RequestDeadline
from artifactfs.sources.s3 import lean_getter
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
    read,
    tls_server_with_one_object,
    track,
)

pytestmark = pytest.mark.s3


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


def test_a_kept_alive_connection_closed_by_the_server_is_replaced_not_an_error(
    rclone: RcloneBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    rclone.put("kept.bin", body_of(10_000, 4))
    entry = track(rclone.url("kept.bin"))["kept.bin"]
    with behind_a_closing_proxy(rclone, monkeypatch) as proxy, boto3_gets() as sent:
        for _ in range(6):  # each read after the first finds its connection closed
            assert read(entry) == body_of(10_000, 4)
        assert sent[0] == 0
        assert proxy.answered == 6


def test_https_is_verified_against_the_clients_ca_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tls_server_with_one_object(tmp_path, monkeypatch) as (entry, log):
        with boto3_gets() as sent:
            assert read(entry, 10, 8000) == TLS_BODY[10:8010]
        assert sent[0] == 0
        assert log.read_text().count("GET OBJECT Bucket: tls Object: x y.bin") == 1

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
        point_at(monkeypatch, proxy.url, "testing", "testing")
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
    # The seven were read before the stalled one was given up (at the 4 s deadline), not
    # after it; the margin is for a loaded machine.
    assert len(answered) == 7 and max(answered.values()) < 3.5, answered
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
        point_at(monkeypatch, proxy.url, "testing", "testing")
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
