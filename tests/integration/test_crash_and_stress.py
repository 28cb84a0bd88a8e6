"""Crashes, a full disk and load, on real mounts of S3 objects (moto_server on 127.0.0.1).

- A cache on a tiny file system (a tmpfs the test mounts): reads return the right bytes or EIO
  while it fills up and is full, the byte limit holds, no chunk is wrong, the daemon survives.
- `kill -9` of the daemon at random moments during fetches (slowed by the fault proxy), 12
  times (`ARTIFACTFS_KILLS=N`: N): after each, `artifactfs unmount` recovers the mount point
  and `cache fsck` drops nothing; after every restart every read is right.
- Stress: 16 reader threads at random offsets and lengths over 20 files for a bounded time:
  no wrong byte, no error, the daemon's memory stays under a stated bound and no descriptor
  leaks. `ARTIFACTFS_LONG_STRESS=1` runs it for 10 minutes instead of 30 s (or
  `ARTIFACTFS_STRESS_SECONDS=N` for N seconds).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.fs.daemon import is_mounted
from tests.integration.test_faults import (
    Backend,
    backend,
    check_cache,
    entry_keys,
    leftover_temp_files,
    read_file,
    track_field,
)
from tests.support.cache_files import chunk_bytes
from tests.support.mounts import (
    artifact_args,
    force_unmount,
    mounted,
    pid_alive,
    settled_figure,
    start_mount,
    wait_gone,
)

pytestmark = pytest.mark.s3

KiB = 1024
MiB = 1024 * 1024


def body_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "artifactfs", *args], capture_output=True, text=True, timeout=timeout
    )


def fsck_dropped(cache: Path) -> int:
    result = cli("cache", "fsck", "--cache-dir", str(cache))
    match = re.search(r"dropped (\d+)", result.stdout)
    assert match, result
    dropped = int(match.group(1))
    assert result.returncode == (1 if dropped else 0), result  # 1: damage found and dropped
    return dropped


def pread_exact(fd: int, offset: int, length: int) -> bytes:
    pieces = []
    for _ in range(64):  # bounded: a short read is followed by at most a few more
        if length <= 0:
            break
        piece = os.pread(fd, length, offset)
        if not piece:
            break
        pieces.append(piece)
        offset += len(piece)
        length -= len(piece)
    return b"".join(pieces)


def put_files(
    s3: Any, prefix: str, bodies: dict[str, bytes], project: str, chunk_size: int = MiB
) -> tuple[str, dict[bytes, bytes]]:
    """Upload, track in a new run's `data`; (run id, every chunk key -> its bytes)."""
    for name, body in bodies.items():
        s3.put(f"{prefix}/{name}", body)
    run = artifactfs.init_run(project=project)
    entries = {e.file_path: e for e in track_field(run, "data", s3.url(prefix))}
    run.stop()
    expected: dict[bytes, bytes] = {}
    for name, body in bodies.items():
        expected.update(entry_keys(entries[name], body, chunk_size))
    return run.id, expected


# -- a cache on a tiny file system ---------------------------------------------------------------

FREE_FLOOR = 256 * MiB  # what the cache keeps free on its file system (SEMANTICS.md)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """mount(size) -> a directory on a fresh tmpfs of that many MiB; all unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    made: list[Path] = []

    def make(size_mib: int) -> Path:
        target = tmp_path / f"tmpfs-{len(made)}"
        target.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(target)],
            check=True,
            capture_output=True,
        )
        made.append(target)
        return target

    try:
        yield make
    finally:
        for target in reversed(made):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(directory: Path, limit: int) -> int:
    """Write a filler file until the file system is full (or `limit` bytes); its size."""
    block = b"\xa5" * MiB
    written = 0
    with open(directory / "filler", "wb", buffering=0) as out:
        for _ in range(limit // MiB + 1):
            try:
                written += out.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
    for size in (64 * KiB, 4 * KiB, 512):  # the last few blocks
        try:
            with open(directory / f"filler-{size}", "wb", buffering=0) as out:
                for _ in range(MiB // size):
                    written += out.write(b"\xa5" * size)
        except OSError:
            pass
    return written


@pytest.mark.parametrize(
    ("tmpfs_mib", "cache_size"),
    [(8, "64M"), (FREE_FLOOR // MiB + 24, "12M")],
    ids=["smaller-than-the-free-floor", "room-for-a-few-chunks"],
)
def test_cache_on_a_tiny_file_system(
    s3: Any, tmp_path: Path, tmpfs: Any, tmpfs_mib: int, cache_size: str
) -> None:
    """A cache directory on a tmpfs: first with the room the free-space floor leaves, then
    with the file system filled to the last byte by someone else, then freed again."""
    limit = int(cache_size[:-1]) * MiB
    bodies = {f"f{i:02d}.bin": body_of(2 * MiB + i * 1000, i) for i in range(10)}
    run_id, expected = put_files(s3, "tiny", bodies, "stress/tiny")
    cache = tmpfs(tmpfs_mib) / "cache"
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        for _ in range(100_000):
            if stop.wait(0.02):
                return
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], chunk_bytes(cache))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with mounted(
            tmp_path / "mnt",
            *artifact_args(run_id, "data", cache),
            "--cache-size",
            cache_size,
            "--chunk-size",
            "1M",
        ) as mount:
            outcomes: dict[str, str] = {}

            def read_all(phase: str) -> None:
                for name, body in bodies.items():
                    try:
                        data = read_file(mount.path / name, direct=True)
                    except OSError as exc:
                        if exc.errno != errno.EIO:
                            outcomes[f"{phase}/{name}"] = f"{exc}"
                        continue
                    if data != body:
                        outcomes[f"{phase}/{name}"] = f"WRONG BYTES ({len(data)})"

            read_all("room")
            fill(cache.parent, 2 * tmpfs_mib * MiB)
            assert os.statvfs(cache).f_bavail == 0, "the tmpfs is not full"
            read_all("full")
            for path in cache.parent.glob("filler*"):
                path.unlink()
            read_all("freed")
            read_all("freed-again")
            assert pid_alive(mount.pid), "the daemon died"
            assert not outcomes, outcomes
            assert mount.root_figure("cache_bytes") <= limit
            assert mount.root_figure("errors") == 0
    finally:
        stop.set()
        watcher.join(10)
    assert peak[0] <= limit, f"{peak[0]} bytes of chunks on disk, limit {limit}"
    if tmpfs_mib * MiB > FREE_FLOOR:
        assert peak[0] > 0, "the cache was never used while there was room"
    else:
        assert peak[0] == 0, "a chunk was written below the free-space floor"
    check_cache(cache, expected)
    assert leftover_temp_files(cache) == []
    assert fsck_dropped(cache) == 0


# -- kill -9 at random moments ---------------------------------------------------------------

# A dozen in CI (each round is ~3.5 s of the suite's run time); more by ARTIFACTFS_KILLS.
KILLS = int(os.environ.get("ARTIFACTFS_KILLS", "12"))


def test_kill_9_during_fetches_a_dozen_times(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon reads through the fault proxy, which trickles every answer (16 KiB every
    20 ms), so that fetches and chunk writes are under way whenever the kill comes."""
    with backend("s3", request) as remote:
        _kill_loop(remote, tmp_path, monkeypatch)


def _kill_loop(remote: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bodies = {f"k{i:02d}.bin": body_of(MiB + 300_000 + i * 7_777, 50 + i) for i in range(12)}
    run_id, expected = put_files(remote.bucket, "kill", bodies, "stress/kill", chunk_size=256 * KiB)
    remote.proxy.add("trickle", "GET /", piece=16 * KiB, interval=0.02)
    names = sorted(bodies)
    cache = tmp_path / "cache"
    mountpoint = tmp_path / "mnt"
    args = (
        *artifact_args(run_id, "data", cache),
        "--cache-size",
        "8M",  # evictions all the time, as well as writes
        "--chunk-size",
        "256K",
    )
    rng = random.Random(20240601)
    wrong: list[str] = []
    fsck_reports: list[str] = []
    unmount_failures: list[str] = []
    interrupted: set[int] = set()  # rounds whose kill landed while reads were in flight
    completed: set[int] = set()  # rounds in which some read completed (and was checked)
    for round_number in range(KILLS):
        with monkeypatch.context() as patch:
            patch.setenv("AWS_ENDPOINT_URL", remote.proxy.url)
            mount = start_mount(mountpoint, *args)
        try:
            barrier = threading.Barrier(5)

            def reader(
                seed: int,
                mount_path: Path = mount.path,
                barrier: threading.Barrier = barrier,
                round_number: int = round_number,
            ) -> None:
                order = random.Random(seed).sample(names, len(names))
                try:
                    barrier.wait(10)
                except threading.BrokenBarrierError:
                    return
                for name in order:
                    try:
                        data = read_file(mount_path / name, direct=seed % 2 == 1)
                    except OSError:
                        interrupted.add(round_number)  # the daemon died under this read
                        return
                    completed.add(round_number)
                    if data != bodies[name]:
                        wrong.append(f"round {round_number}: {name} ({len(data)} bytes)")

            threads = [
                threading.Thread(target=reader, args=(rng.randrange(1 << 30),), daemon=True)
                for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            barrier.wait(10)
            time.sleep(rng.uniform(0.2, 1.5))
            os.kill(mount.pid, signal.SIGKILL)
            assert wait_gone(mount.pid, 10), "the daemon survived SIGKILL"
            for thread in threads:
                thread.join(30)
            assert not any(t.is_alive() for t in threads), "a reader hung after the kill"
            result = cli("unmount", str(mountpoint))
            if result.returncode != 0 or is_mounted(str(mountpoint)):
                unmount_failures.append(f"round {round_number}: {result.stderr.strip()}")
        finally:
            force_unmount(mount.path, mount.pid)
        dropped = fsck_dropped(cache)
        if dropped:
            fsck_reports.append(f"round {round_number}: fsck dropped {dropped}")
        check_cache(cache, expected)  # whole, right chunks only (tmp/ is emptied at start)
    # The test did what it says: most kills hit reads in flight, most rounds checked reads.
    assert len(interrupted) >= KILLS * 3 // 4, f"only {len(interrupted)} kills hit a read"
    assert len(completed) >= KILLS // 2, f"reads completed in only {len(completed)} rounds"
    assert not wrong, wrong
    assert not unmount_failures, unmount_failures
    assert not fsck_reports, fsck_reports
    # A last restart, straight to the server: every file reads right.
    with mounted(mountpoint, *args) as mount:
        for name in names:
            assert read_file(mount.path / name) == bodies[name], name
        assert mount.root_figure("errors") == 0
    check_cache(cache, expected)
    assert leftover_temp_files(cache) == []


# -- stress ---------------------------------------------------------------------------------------

THREADS = 16
FILES = 20
DEFAULT_SECONDS = 30.0  # in CI
LONG_SECONDS = 600.0
# The daemon's peak RSS (VmHWM): the interpreter and its libraries (~100 MiB), the reader's
# memory tier of recent chunks (64 MiB), and chunks in flight (8 fetch workers, 8 prefetch
# workers and 16 FUSE threads, a 1 MiB chunk and a copy or two each): 400 MiB leaves room.
MEMORY_BOUND = 400 * MiB
# Signed-GET connections: one per thread that fetches (fetch, prefetch, FUSE workers) and 8 per
# batch thread (16);
# boto3's pool (listings, HEAD, reads it is left) rarely more than a few.
SOCKET_BOUND = 48


def stress_seconds() -> float:
    if os.environ.get("ARTIFACTFS_STRESS_SECONDS"):
        return float(os.environ["ARTIFACTFS_STRESS_SECONDS"])
    return LONG_SECONDS if os.environ.get("ARTIFACTFS_LONG_STRESS") == "1" else DEFAULT_SECONDS


def daemon_status(pid: int) -> dict[str, int]:
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                found[name] = int(value.split()[0]) * (1024 if name != "Threads" else 1)
    return found


def daemon_fds(pid: int) -> dict[str, list[str]]:
    """The daemon's descriptors by kind: sockets, pipes, files (their paths), other."""
    kinds: dict[str, list[str]] = {"socket": [], "pipe": [], "file": [], "other": []}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            kinds["socket"].append(target)
        elif target.startswith("pipe:"):
            kinds["pipe"].append(target)
        elif target.startswith("/"):
            kinds["file"].append(target)
        else:
            kinds["other"].append(target)
    return kinds


@pytest.mark.timeout(int(stress_seconds()) + 240)
def test_stress_sixteen_readers_over_twenty_files(s3: Any, tmp_path: Path) -> None:
    seconds = stress_seconds()
    # ~100 MiB in all: more than the disk cache (24 MiB) and the reader's memory tier (64 MiB)
    # hold together, so chunks are evicted and fetched again all the time.
    sizes = random.Random(7).sample(range(MiB, 9 * MiB), FILES)
    bodies = {f"s{i:02d}.bin": body_of(size, 200 + i) for i, size in enumerate(sizes)}
    run_id, expected = put_files(s3, "stress", bodies, "stress/readers")
    names = sorted(bodies)
    cache = tmp_path / "cache"
    with mounted(
        tmp_path / "mnt",
        *artifact_args(run_id, "data", cache),
        "--cache-size",
        "24M",  # less than the files: evictions and fetches go on all the time
        "--chunk-size",
        "1M",
    ) as mount:
        for name in names[:4]:  # warm up: clients, pools, threads
            assert read_file(mount.path / name) == bodies[name]
        baseline = daemon_fds(mount.pid)
        counts = {"reads": 0, "bytes": 0}
        problems: list[str] = []
        samples: list[tuple[float, int, int]] = []  # (time, RSS, descriptors)
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds
        done = threading.Event()

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            direct = seed % 2 == 1  # half the readers bypass the page cache
            fds: dict[str, int] = {}
            try:
                for _ in range(10_000_000):
                    if time.monotonic() >= stop_at:
                        return
                    name = rng.choice(names)
                    body = bodies[name]
                    if name not in fds or rng.random() < 0.05:  # reopen now and then
                        if name in fds:
                            os.close(fds.pop(name))
                        fds[name] = os.open(
                            mount.path / name, os.O_RDONLY | (os.O_DIRECT if direct else 0)
                        )
                    if direct:  # O_DIRECT wants aligned offsets
                        offset = rng.randrange(0, len(body), 4096)
                        length = rng.choice([4096, 65536, 1 << 20, 3 << 20])
                    else:
                        offset = rng.randrange(len(body))
                        length = rng.randint(1, 2 * MiB)
                    try:
                        data = pread_exact(fds[name], offset, length)
                    except OSError as exc:
                        with lock:
                            problems.append(f"{name}@{offset}+{length}: {exc}")
                        continue
                    if data != body[offset : offset + length]:
                        with lock:
                            problems.append(f"{name}@{offset}+{length}: wrong bytes")
                    with lock:
                        counts["reads"] += 1
                        counts["bytes"] += len(data)
            except Exception as exc:
                with lock:
                    problems.append(f"reader {seed}: {exc!r}")
            finally:
                for fd in fds.values():
                    os.close(fd)

        def monitor() -> None:
            for _ in range(1_000_000):
                if done.wait(0.5):
                    return
                try:
                    status = daemon_status(mount.pid)
                    fds = sum(len(v) for v in daemon_fds(mount.pid).values())
                except OSError:
                    return
                samples.append((time.monotonic(), status["VmRSS"], fds))

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(THREADS)]
        watcher = threading.Thread(target=monitor, daemon=True)
        watcher.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(seconds + 120)
        done.set()
        watcher.join(10)
        hung = [t.name for t in threads if t.is_alive()]

        # Read-ahead queued by the last reads settles, then the descriptors of its fetches close.
        settled_figure(mount, "fetched_bytes", quiet=2.0, timeout=60.0)
        give_up = time.monotonic() + 30
        while True:
            after = daemon_fds(mount.pid)
            held = str(cache / "data" / "LOCK")  # open for the mount's life, by design
            cache_fds = [
                p for p in after["file"] if p.startswith(str(cache / "data")) and p != held
            ]
            if not cache_fds or time.monotonic() > give_up:
                break
            time.sleep(0.2)
        status = daemon_status(mount.pid)
        errors = mount.root_figure("errors")
        fetched = mount.root_figure("fetched_bytes")
        alive = pid_alive(mount.pid)
    before_counts = {kind: len(found) for kind, found in baseline.items()}
    after_counts = {kind: len(found) for kind, found in after.items()}
    report = (
        f"{counts['reads']} reads, {counts['bytes'] / MiB:.0f} MiB in {seconds:.0f}s; "
        f"{fetched / MiB:.0f} MiB fetched; peak RSS {status['VmHWM'] / MiB:.0f} MiB; "
        f"descriptors before {before_counts}, "
        f"after {after_counts}"
    )
    print(report)
    assert not hung, f"readers hung: {hung}"
    assert alive, "the daemon died"
    assert counts["reads"] > 100, report
    # More fetched than the files hold: the 24M limit made the cache evict and fetch again.
    assert fetched > sum(sizes), report
    assert not problems, f"{len(problems)} bad reads, first: {problems[:5]}; {report}"
    assert errors == 0, report
    assert status["VmHWM"] <= MEMORY_BOUND, report
    assert not cache_fds, f"cache files left open: {cache_fds}"
    assert len(after["file"]) <= len(baseline["file"]) + 2, report
    assert len(after["pipe"]) + len(after["other"]) <= (
        len(baseline["pipe"]) + len(baseline["other"]) + 2
    ), report
    assert len(after["socket"]) <= SOCKET_BOUND, report
    # No growth over the run: the last samples are no higher than those of the first half.
    if len(samples) >= 8:
        half = len(samples) // 2
        assert max(s[2] for s in samples[-3:]) <= max(s[2] for s in samples[:half]) + 8, samples
    check_cache(cache, expected)
