"""Faults between the mount and its backend: real mounts reading S3 (moto_server) and GCS (the
emulator) through a fault-injecting proxy on 127.0.0.1 (`tests/support/faultproxy.py`).

Tracking talks to the real server; only the mount's daemon is pointed at the proxy (it inherits
`AWS_ENDPOINT_URL` / `STORAGE_EMULATOR_HOST` from `artifactfs mount`). For every fault a read
must either return the right bytes after retries, or fail with EIO within the read deadline
(`READ_BOUND`, well under a minute); no partial or wrong chunk may ever be cached; and the
daemon must keep serving other files meanwhile. Each test asserts all three.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.cache import chunk_key
from artifactfs.cache.chunks import unpack_chunk
from artifactfs.entries import ArtifactFileData
from artifactfs.reader import DEFAULT_DEADLINE, FAILURE_MEMORY, NOT_RETRIED
from tests.support.faultproxy import FaultProxy, fault_proxy
from tests.support.mounts import Mount, artifact_args, pid_alive, start_mount, supervised
from tests.support.relay import SwitchableRelay

KiB = 1024
MiB = 1024 * 1024
CHUNK = MiB
# A read that cannot be served must fail within the reader's retry deadline plus one attempt
# in flight when it passes: 45 s with the default 30 s deadline, "well under a minute".
READ_BOUND = DEFAULT_DEADLINE + 15.0
HEALTHY_BOUND = 10.0  # a healthy file read while other files are failing
DOWN_DEADLINE = 4.0  # --read-deadline of the tests with an endpoint down
FAIL_FAST = 2.5  # a read from an endpoint known to refuse connections fails within this


# -- shared helpers (also used by the other reliability tests) --------------------------------


@dataclass
class Outcome:
    errno: int | None
    data: bytes | None
    seconds: float

    def describe(self, expected: bytes) -> str:
        if self.errno is not None:
            return f"{errno.errorcode.get(self.errno, self.errno)} after {self.seconds:.1f}s"
        assert self.data is not None
        state = "right" if self.data == expected else f"WRONG ({len(self.data)} bytes)"
        return f"{state} bytes after {self.seconds:.1f}s"


def read_file(path: Path, direct: bool = False) -> bytes:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        pieces = []
        for _ in range(1 << 20):  # bounded: 1 MiB reads of files of at most a few MiB
            piece = os.read(fd, MiB)
            if not piece:
                break
            pieces.append(piece)
        return b"".join(pieces)
    finally:
        os.close(fd)


def timed(read: Callable[[], bytes]) -> Outcome:
    start = time.monotonic()
    try:
        data = read()
    except OSError as exc:
        return Outcome(exc.errno, None, time.monotonic() - start)
    return Outcome(None, data, time.monotonic() - start)


class Readers:
    """Reads in threads, each bounded by a join timeout (a hung read is reported, not waited)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._started: dict[str, float] = {}

    def start(self, name: str, read: Callable[[], bytes]) -> None:
        def run() -> None:
            self.outcomes[name] = timed(read)

        thread = threading.Thread(target=run, daemon=True, name=f"read-{name}")
        self._started[name] = time.monotonic()
        self._threads[name] = thread
        thread.start()

    def wait(self, timeout: float) -> list[str]:
        """Join all; the names of reads still running after `timeout` seconds."""
        give_up = time.monotonic() + timeout
        for thread in self._threads.values():
            thread.join(max(0.0, give_up - time.monotonic()))
        return [name for name, t in self._threads.items() if t.is_alive()]

    def running(self) -> list[str]:
        return [name for name, t in self._threads.items() if t.is_alive()]


def entry_keys(entry: ArtifactFileData, body: bytes, chunk_size: int = CHUNK) -> dict[bytes, bytes]:
    """Chunk key -> the payload that key must hold, for every chunk of the entry."""
    count = max(1, -(-len(body) // chunk_size))
    return {
        chunk_key(entry.type, entry.file_hash, entry.size, chunk_size, index): body[
            index * chunk_size : (index + 1) * chunk_size
        ]
        for index in range(count)
    }


def cache_chunk_files(cache_dir: Path) -> list[Path]:
    chunks = cache_dir / "data" / "chunks"
    return sorted(p for p in chunks.glob("*/*") if p.is_file()) if chunks.is_dir() else []


def check_cache(cache_dir: Path, expected: dict[bytes, bytes]) -> set[bytes]:
    """Every chunk file is whole, has a valid header, is named by a known key and holds exactly
    that chunk's bytes. Returns the keys present. Anything else is a partial or wrong chunk."""
    problems = []
    present = set()
    for path in cache_chunk_files(cache_dir):
        raw = path.read_bytes()
        try:
            key = bytes.fromhex(path.name)
        except ValueError:
            problems.append(f"{path.name}: not a chunk name")
            continue
        if key not in expected:
            problems.append(f"{path.name}: no tracked chunk has this key")
            continue
        payload = unpack_chunk(raw, key)  # every checksum and the header checked
        if payload is None:
            problems.append(f"{path.name}: bad header, or a payload that does not match it")
        elif payload != expected[key]:
            problems.append(
                f"{path.name}: {len(payload)} bytes that are not the tracked chunk "
                f"({len(expected[key])} bytes)"
            )
        else:
            present.add(key)
    assert not problems, "bad chunks in the cache: " + "; ".join(problems)
    return present


def leftover_temp_files(cache_dir: Path) -> list[Path]:
    tmp = cache_dir / "data" / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


def track_field(run: Any, field: str, url: str) -> list[ArtifactFileData]:
    run[field].track_files(url)
    return list(run[field].fetch_files_list())


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class Backend:
    """One bucket on a real server, a proxy in front of it, and what the mount must use."""

    kind: str  # s3 | gcs
    bucket: Any
    proxy: FaultProxy
    env_name: str

    def put(self, key: str, body: bytes) -> None:
        self.bucket.put(key, body)

    def url(self, key: str = "") -> str:
        return str(self.bucket.url(key))

    def request_match(self, key: str, range_start: int | None = None) -> tuple[str, ...]:
        """What the proxy sees in a ranged read of `key` (from `range_start`), and nothing else."""
        if self.kind == "s3":
            found = (f"GET /{self.bucket.name}/{key} ",)
        else:
            found = (f"/b/{self.bucket.name}/o/{key.replace('/', '%2F')}?alt=media",)
        return found if range_start is None else (*found, f" bytes={range_start}-")

    def metadata_match(self, key: str) -> tuple[str, ...]:
        """The JSON API request for `key`'s metadata (GCS reads check it when the answer to a
        ranged read carries no identity, as the emulator's do)."""
        assert self.kind == "gcs"
        return (f"GET /storage/v1/b/{self.bucket.name}/o/{key.replace('/', '%2F')}?",)


@contextmanager
def backend(kind: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    if kind == "s3":
        bucket = request.getfixturevalue("s3")
        upstream = request.getfixturevalue("s3_endpoint")
        env_name = "AWS_ENDPOINT_URL"
    else:
        bucket = request.getfixturevalue("gcs")
        upstream = request.getfixturevalue("gcs_host")
        env_name = "STORAGE_EMULATOR_HOST"
    with fault_proxy(upstream, gcs=kind == "gcs") as proxy:
        yield Backend(kind, bucket, proxy, env_name)


@pytest.fixture(
    params=[pytest.param("s3", marks=pytest.mark.s3), pytest.param("gcs", marks=pytest.mark.gcs)]
)
def remote(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with backend(request.param, request) as found:
        yield found


@contextmanager
def mount_through_proxy(
    monkeypatch: pytest.MonkeyPatch,
    backends: list[Backend],
    mountpoint: Path,
    *args: str,
) -> Iterator[Mount]:
    """Mount with the daemon pointed at the proxies; unmounted whatever happens (as `mounted`).

    Only the daemon gets the proxies' addresses: the test's own clients keep the real servers.
    """
    with monkeypatch.context() as patch:
        for item in backends:
            patch.setenv(item.env_name, item.proxy.url)
        mount = start_mount(mountpoint, *args)
    with supervised(mount):
        yield mount


def body_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- transient faults: retried to the right bytes -----------------------------------------------

# name -> (fault, options): each hits the first two reads of its own object, then passes.
TRANSIENT = {
    "http-500": ("status", {"status": 500}),
    "http-503": ("status", {"status": 503}),
    "throttled": ("status", {"status": 503, "code": "SlowDown"}),
    "reset-before-body": ("reset", {}),
    "reset-mid-body": ("reset_mid", {}),
    "body-cut-short": ("cut", {"fraction": 0.3}),
    "slow-trickle": ("trickle", {"piece": 32 * KiB, "interval": 0.02}),
}


def test_transient_faults_are_retried_to_the_right_bytes(
    remote: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults = TRANSIENT
    if remote.kind == "gcs":  # GCS throttles with 429
        faults = {**TRANSIENT, "throttled": ("status", {"status": 429})}
    bodies = {f"{name}.bin": body_of(2 * MiB + 12_345, i) for i, name in enumerate(faults)}
    bodies["healthy.bin"] = body_of(3 * MiB, 99)
    for name, body in bodies.items():
        remote.put(f"t/{name}", body)
    run = artifactfs.init_run(project="faults/transient")
    entries = {e.file_path: e for e in track_field(run, "data", remote.url("t"))}
    run.stop()
    expected: dict[bytes, bytes] = {}
    for name, body in bodies.items():
        expected.update(entry_keys(entries[name], body))
    for name, (fault, options) in faults.items():
        remote.proxy.add(fault, remote.request_match(f"t/{name}.bin"), times=2, **options)

    cache = tmp_path / "cache"
    with mount_through_proxy(
        monkeypatch,
        [remote],
        tmp_path / "mnt",
        *artifact_args(run.id, "data", cache),
        "--chunk-size",
        "1M",
    ) as mount:
        readers = Readers()
        for name in bodies:
            readers.start(name, lambda name=name: read_file(mount.path / name))
        hung = readers.wait(READ_BOUND + 30)
        report = {
            name: readers.outcomes[name].describe(body)
            for name, body in bodies.items()
            if name in readers.outcomes
        }
        assert not hung, f"reads still running after {READ_BOUND + 30:.0f}s: {hung}; {report}"
        wrong = {
            name: report[name]
            for name, body in bodies.items()
            if readers.outcomes[name].data != body or readers.outcomes[name].seconds > READ_BOUND
        }
        assert not wrong, f"expected the right bytes within {READ_BOUND:.0f}s: {wrong}"
        for name in faults:
            assert remote.proxy.faults_applied(match=remote.request_match(f"t/{name}.bin")), name
        assert pid_alive(mount.pid)
        for name, body in bodies.items():
            assert int(mount.xattr(name, "cached")) == len(body), name
    present = check_cache(cache, expected)
    assert present == set(expected), "every chunk read must be cached whole"
    assert leftover_temp_files(cache) == []


# -- persistent faults: EIO in time, nothing cached, other files still served -------------------

PERSISTENT = {
    "http-500": ("status", {"status": 500}),
    "throttled": ("status", {"status": 503, "code": "SlowDown"}),
    "reset-before-body": ("reset", {}),
    "reset-mid-body": ("reset_mid", {}),
    "body-cut-short": ("cut", {"fraction": 0.3}),
    "stall": ("stall", {"seconds": 240.0}),  # longer than the 30 s read timeout
    "endless-trickle": ("trickle", {"piece": 1, "interval": 2.0}),  # never times out a recv
}
PERSISTENT_GCS = {**PERSISTENT, "throttled": ("status", {"status": 429})}
# The media reads pass; the metadata check the GCS source then makes fails for good.
PERSISTENT_GCS_METADATA = {"metadata-503": ("status", {"status": 503})}
# Not a transient error: no retry can help, so it must fail at once.
DENIED = {"denied-403": ("status", {"status": 403})}
PERMANENT_BOUND = 10.0  # measured 0-0.5 s; far below the 30 s a retried error takes
FAULTY_SIZE = 300_000  # one chunk: one fetch (one worker) per faulty file


@pytest.mark.s3
@pytest.mark.gcs
def test_persistent_faults_fail_with_eio_in_time_and_other_files_are_still_served(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both backends at once (one daemon per group of faults, so that no group waits for a
    fetch worker another holds), to keep the run time to one read deadline. A permanent error
    (403) must fail within `PERMANENT_BOUND`, the others within `READ_BOUND`."""
    with backend("s3", request) as s3, backend("gcs", request) as gcs:
        setups = [
            ("s3", s3, PERSISTENT, "media", READ_BOUND),
            ("gcs", gcs, PERSISTENT_GCS, "media", READ_BOUND),
            ("gcs-metadata", gcs, PERSISTENT_GCS_METADATA, "metadata", READ_BOUND),
            ("s3-denied", s3, DENIED, "media", PERMANENT_BOUND),
            ("gcs-denied", gcs, DENIED, "media", PERMANENT_BOUND),
        ]
        _check_persistent_faults(setups, tmp_path, monkeypatch)


@dataclass
class Plan:
    label: str
    remote: Backend
    faulty: dict[str, bytes]
    healthy: dict[str, bytes]
    expected: dict[bytes, bytes]  # every chunk key of every file -> its bytes
    faulty_keys: set[bytes]
    which: str  # the request the faults hit: "media" (ranged reads) or "metadata"
    bound: float  # seconds within which each faulty read must end

    def key(self, name: str) -> str:
        return f"p-{self.label}/{name}"

    def match(self, name: str) -> tuple[str, ...]:
        if self.which == "metadata":
            return self.remote.metadata_match(self.key(name))
        return self.remote.request_match(self.key(name))


def _check_persistent_faults(
    setups: list[tuple[str, Backend, dict[str, tuple[str, dict[str, Any]]], str, float]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = artifactfs.init_run(project="faults/persistent")
    plans = []
    for label, remote, faults, which, bound in setups:
        faulty = {f"{name}.bin": body_of(FAULTY_SIZE, i) for i, name in enumerate(faults)}
        healthy = {f"healthy-{i}.bin": body_of(2 * MiB + i, 100 + i) for i in range(3)}
        plan = Plan(label, remote, faulty, healthy, {}, set(), which, bound)
        for name, body in {**faulty, **healthy}.items():
            remote.put(plan.key(name), body)
        entries = {e.file_path: e for e in track_field(run, label, remote.url(f"p-{label}"))}
        for name, body in {**faulty, **healthy}.items():
            keys = entry_keys(entries[name], body)
            plan.expected.update(keys)
            if name in faulty:
                plan.faulty_keys.update(keys)
        for name, (fault, options) in faults.items():
            remote.proxy.add(fault, plan.match(f"{name}.bin"), **options)
        plans.append(plan)
    run.stop()

    with ExitStack() as stack:
        mounts = [
            stack.enter_context(
                mount_through_proxy(
                    monkeypatch,
                    [plan.remote],
                    tmp_path / f"mnt-{plan.label}",
                    *artifact_args(run.id, plan.label, tmp_path / f"cache-{plan.label}"),
                    "--chunk-size",
                    "1M",
                )
            )
            for plan in plans
        ]
        for plan in plans:  # first on the way out: ends stalls and trickles, so daemons can exit
            stack.callback(plan.remote.proxy.stop)
        readers = Readers()
        for mount, plan in zip(mounts, plans, strict=True):
            for name in plan.faulty:
                readers.start(f"{plan.label}/{name}", lambda p=mount.path / name: read_file(p))
        # While every faulty read is in flight, the daemons serve a healthy file at once.
        time.sleep(1.0)
        in_flight = readers.running()
        during = {}
        for mount, plan in zip(mounts, plans, strict=True):
            name, body = next(iter(plan.healthy.items()))
            outcome = timed(lambda p=mount.path / name: read_file(p))
            if outcome.data != body or outcome.seconds > HEALTHY_BOUND:
                during[f"{plan.label}/{name}"] = outcome.describe(body)

        hung = readers.wait(READ_BOUND + 5)
        results: dict[str, str] = {}
        bad: dict[str, str] = {}
        for mount, plan in zip(mounts, plans, strict=True):
            log = mount.log()
            for name, body in plan.faulty.items():
                label = f"{plan.label}/{name}"
                outcome = readers.outcomes.get(label)
                requests = len(plan.remote.proxy.requests(plan.match(name)))
                # How often the daemon answered EIO so far: more than once for one read means
                # the kernel asked again after the first EIO.
                answered = log.count(f"EIO: {plan.remote.url(plan.key(name))}")
                results[label] = (
                    outcome.describe(body) if outcome else f"still running at {READ_BOUND + 5:.0f}s"
                ) + f" ({requests} requests, daemon answered EIO {answered}x)"
                if outcome is None:
                    bad[label] = f"{results[label]}, bound {plan.bound:.0f}s"
                elif outcome.data is not None and outcome.data != body:
                    bad[label] = "WRONG BYTES"
                elif outcome.errno not in (None, errno.EIO) or outcome.seconds > plan.bound:
                    bad[label] = f"{results[label]}, bound {plan.bound:.0f}s"

        # After the faulty reads, the daemons are alive, serve every healthy file, cached
        # nothing of the failing ones and logged each failure with the file's source.
        after: dict[str, str] = {}
        for mount, plan in zip(mounts, plans, strict=True):
            assert pid_alive(mount.pid), f"the {plan.label} daemon died"
            for name, body in plan.healthy.items():
                outcome = timed(lambda p=mount.path / name: read_file(p))
                if outcome.data != body:
                    after[f"{plan.label}/{name}"] = outcome.describe(body)
            log = mount.log()
            for name in plan.faulty:
                outcome = readers.outcomes.get(f"{plan.label}/{name}")
                if outcome is not None and outcome.errno == errno.EIO:
                    assert f"EIO: {plan.remote.url(plan.key(name))}" in log, f"no EIO line: {name}"
                assert mount.xattr(name, "cached") == "0", f"{plan.label}/{name} cached"
            for name in plan.faulty:
                applied = plan.remote.proxy.faults_applied(match=plan.match(name))
                assert applied, f"{plan.label}/{name}: the proxy never applied its fault"

        # The figures, for the record (`pytest -s` or `-rP` shows them).
        print("persistent faults:", *(f"{k}: {v}" for k, v in results.items()), sep="\n  ")
        assert not during, (
            f"healthy files read while {len(in_flight)} faulty reads were in flight "
            f"(bound {HEALTHY_BOUND:.0f}s): {during}"
        )
        assert not after, f"healthy files after the faults: {after}"
        assert not hung and not bad, (
            f"every fault must end in EIO within its bound (or the right bytes); "
            f"failing: {bad}; all: {results}"
        )
    for plan in plans:
        present = check_cache(tmp_path / f"cache-{plan.label}", plan.expected)
        assert not present & plan.faulty_keys, f"{plan.label}: a failing file was cached"


@pytest.mark.s3
def test_read_deadline_option_bounds_a_stalled_read(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mount --read-deadline 3`: a read the server never answers fails with EIO after about
    3 s rather than the default 30 s, and the kernel's retry right after fails at once."""
    with backend("s3", request) as s3:
        body = body_of(FAULTY_SIZE, 7)
        s3.put("deadline/stalled.bin", body)
        run = artifactfs.init_run(project="faults/deadline")
        track_field(run, "data", s3.url("deadline"))
        run.stop()
        s3.proxy.add("stall", s3.request_match("deadline/stalled.bin"), seconds=240.0)
        with mount_through_proxy(
            monkeypatch,
            [s3],
            tmp_path / "mnt",
            *artifact_args(run.id, "data", tmp_path / "cache"),
            "--read-deadline",
            "3",
        ) as mount:
            try:
                first = timed(lambda: read_file(mount.path / "stalled.bin"))
                again = timed(lambda: read_file(mount.path / "stalled.bin"))
            finally:
                s3.proxy.stop()  # ends the stall, so that the daemon can exit
            assert first.errno == errno.EIO, first.describe(body)
            assert 2.5 < first.seconds < DEFAULT_DEADLINE / 2, first.describe(body)
            assert again.errno == errno.EIO and again.seconds < 1.0, again.describe(body)
            assert int(mount.xattr("stalled.bin", "cached")) == 0
            assert "stalled.bin" in mount.log() and "deadline" in mount.log()


@pytest.mark.s3
def test_an_endpoint_that_is_down_costs_each_file_one_refused_connection_until_it_is_back(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the S3 endpoint down, every file paid the whole read deadline in turn (`cp -r` of
    64 files: one EIO every 26-35 s). Now the reads that give up at the deadline open the
    breaker, and a read after them fails after one refused connection, saying so in its log
    line; once the endpoint is back, reads succeed without a remount."""
    s3 = request.getfixturevalue("s3")
    bodies = {f"f{i:02d}.bin": body_of(2000 + i, i) for i in range(8)}
    for name, body in bodies.items():
        s3.put(f"down/{name}", body)
    run = artifactfs.init_run(project="faults/down")
    track_field(run, "data", s3.url("down"))
    run.stop()
    names = sorted(bodies)
    with SwitchableRelay(request.getfixturevalue("s3_endpoint")) as relay:  # down for now
        with monkeypatch.context() as patch:
            patch.setenv("AWS_ENDPOINT_URL", relay.url)
            mount = start_mount(
                tmp_path / "mnt",
                *artifact_args(run.id, "data", tmp_path / "cache"),
                "--read-deadline",
                str(DOWN_DEADLINE),
            )
        with supervised(mount):
            first = timed(lambda: read_file(mount.path / names[0]))
            assert first.errno == errno.EIO, first.describe(bodies[names[0]])
            assert first.seconds < DOWN_DEADLINE + 5, first.describe(bodies[names[0]])
            time.sleep(FAILURE_MEMORY + 0.5)  # past the memory of the failed fetches
            for name in names[1:]:
                later = timed(lambda name=name: read_file(mount.path / name))
                assert later.errno == errno.EIO, later.describe(bodies[name])
                assert later.seconds < FAIL_FAST, later.describe(bodies[name])
                said = [line for line in mount.log().splitlines() if f"down/{name}:" in line]
                assert any(line.endswith(f"({relay.url} {NOT_RETRIED})") for line in said), said
            relay.up()
            time.sleep(FAILURE_MEMORY + 0.5)
            for name in names:
                assert read_file(mount.path / name) == bodies[name], name


# -- wrong bytes from the backend ---------------------------------------------------------------


@pytest.mark.parametrize("size", [300_000, 2 * MiB + 5000], ids=["one-chunk", "three-chunks"])
@pytest.mark.parametrize("fault", ["flip", "replace"], ids=["one-byte-flipped", "stale-etag"])
def test_bytes_that_do_not_match_the_tracked_hash_are_never_served_or_cached(
    remote: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, fault: str
) -> None:
    """The proxy answers with other bytes under the tracked identity: `flip` inverts one byte,
    `replace` all of them (an object replaced behind a stale ETag), always for the last chunk.

    First a reader that reads chunk by chunk (O_DIRECT, so each read reaches the daemon) and
    pauses after the first read, so that read-ahead fetches the bad chunk before anyone asks
    for it: every read must be the right bytes or EIO, the bad chunk's always EIO. Then a
    whole-file read through the page cache: EIO. Wrong bytes never reach the disk cache. Then
    the backend behaves again: every read is the right bytes or EIO, never the bad bytes from
    wherever they might still be remembered (disk cache, memory, the kernel's page cache)."""
    body = body_of(size, 7)
    other = body_of(MiB, 8)
    remote.put("w/x.bin", body)
    remote.put("w/other.bin", other)
    run = artifactfs.init_run(project="faults/wrong")
    entries = {e.file_path: e for e in track_field(run, "data", remote.url("w"))}
    run.stop()
    expected = {**entry_keys(entries["x.bin"], body), **entry_keys(entries["other.bin"], other)}
    last_chunk = (size - 1) // CHUNK
    remote.proxy.add(fault, remote.request_match("w/x.bin", last_chunk * CHUNK), flip_at=1234)

    cache = tmp_path / "cache"
    with mount_through_proxy(
        monkeypatch,
        [remote],
        tmp_path / "mnt",
        *artifact_args(run.id, "data", cache),
        "--chunk-size",
        "1M",
    ) as mount:
        path = mount.path / "x.bin"
        by_chunk = []
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for index in range(last_chunk + 1):
                outcome = timed(lambda index=index: os.pread(fd, CHUNK, index * CHUNK))
                part = body[index * CHUNK : (index + 1) * CHUNK]
                by_chunk.append(f"chunk {index}: {outcome.describe(part)}")
                if outcome.data is not None and outcome.data != part:
                    by_chunk[-1] += " <- served"
                if index == 0:
                    time.sleep(1.0)  # read-ahead fetches (and checks) the rest meanwhile
        finally:
            os.close(fd)
        assert remote.proxy.faults_applied(fault), "the proxy never served the bad bytes"
        served = [line for line in by_chunk if line.endswith("<- served")]
        assert not served and by_chunk[-1].split(": ")[1].startswith("EIO"), (
            f"chunk by chunk: {by_chunk}"
        )
        whole = timed(lambda: read_file(path))
        assert whole.errno == errno.EIO, f"whole-file read: {whole.describe(body)}"
        assert whole.seconds <= READ_BOUND
        assert f"EIO: {remote.url('w/x.bin')}" in mount.log(), "no log line names the file"
        assert mount.root_figure("errors") >= 1
        check_cache(cache, expected)  # whatever is cached is right: never the bad chunk
        remote.proxy.clear()
        for direct in (True, False):
            again = timed(lambda direct=direct: read_file(path, direct=direct))
            assert again.errno == errno.EIO or again.data == body, (
                f"read after the fault (O_DIRECT={direct}): {again.describe(body)}"
            )
        assert read_file(mount.path / "other.bin") == other
        assert pid_alive(mount.pid)
    check_cache(cache, expected)
    assert leftover_temp_files(cache) == []
