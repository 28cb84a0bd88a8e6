"""The mount over remote sources, end to end: real mounts through the CLI over S3 (moto_server)
and GCS (gcp-storage-emulator) on 127.0.0.1.

What a user relies on: every byte read is the tracked byte (or the read fails with EIO), hashes,
sizes and mtimes are what was tracked, reads fetch only what they need, the cache stays within
its limit, survives remounts and a killed daemon, heals from a damaged chunk, and concurrent
readers share fetches. Every mount here is unmounted whatever happens (`mounted()`).
"""

from __future__ import annotations

import base64
import calendar
import errno
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import artifactfs
from artifactfs.cache import ChunkCache
from artifactfs.cache.location import chunk_directory
from artifactfs.fs.daemon import is_mounted
from tests.support.cache_files import chunk_bytes, chunk_files
from tests.support.mounts import Mount, mounted, settled_figure, wait_gone

KiB = 1024
MiB = 1024 * 1024
FIELD = "data"


# -- helpers ----------------------------------------------------------------------------------


@dataclass
class Remote:
    """One bucket on S3 or GCS, behind the same two calls."""

    kind: str  # "s3" or "gcs"
    bucket: Any

    def put(self, key: str, body: bytes) -> tuple[str, float]:
        """Upload; returns the hash artifactfs must show and the server's modification time."""
        if self.kind == "s3":
            response = self.bucket.put(key, body)
            head = self.bucket.client.head_object(Bucket=self.bucket.name, Key=key)
            return response["ETag"].strip('"'), head["LastModified"].timestamp()
        blob = self.bucket.put(key, body)
        return base64.b64decode(blob.md5_hash).hex(), blob.updated.timestamp()

    def url(self, key: str = "") -> str:
        return str(self.bucket.url(key))

    @property
    def scheme(self) -> str:
        return "s3://" if self.kind == "s3" else "gs://"


@pytest.fixture(
    params=[
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("gcs", marks=pytest.mark.gcs),
    ]
)
def remote(request: pytest.FixtureRequest) -> Remote:
    return Remote(request.param, request.getfixturevalue(request.param))


def track(url: str) -> str:
    """A new run with `url` tracked in FIELD; returns the run id."""
    run = artifactfs.init_run(project="ml/remote")
    try:
        run[FIELD].track_files(url)
        return run.id
    finally:
        run.stop()


@contextmanager
def mount_artifact(mountpoint: Path, run_id: str, cache_dir: Path, *extra: str) -> Iterator[Mount]:
    """The artifact as the mount's root, with its own cache directory."""
    with mounted(
        mountpoint, "--run", run_id, "--field", FIELD, "--cache-dir", str(cache_dir), *extra
    ) as mount:
        yield mount


def pread_all(path: Path, offset: int, length: int, flags: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        pieces = []
        while length > 0:
            piece = os.pread(fd, length, offset)
            if not piece:
                break
            pieces.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(pieces)
    finally:
        os.close(fd)


def read_outcome(read: Callable[[], bytes]) -> tuple[int | None, bytes | None]:
    """(errno, None) if the read failed, else (None, the bytes)."""
    try:
        return None, read()
    except OSError as exc:
        return exc.errno, None


def describe(data: bytes | None, old: bytes, new: bytes) -> str:
    if data is None:
        return "nothing"
    if new.startswith(data) or new == data:
        return f"{len(data)} bytes of the NEW (untracked) object"
    if old.startswith(data):
        return f"{len(data)} bytes of the old object"
    return f"{len(data)} other bytes"


def flip_byte(path: Path, position: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


def utc_seconds(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


def dropped_count(output: str) -> int:
    match = re.search(r"dropped (\d+)", output)
    assert match, f"fsck output does not say how many were dropped: {output!r}"
    return int(match.group(1))


# -- 1. bytes, hashes, sizes, mtimes ------------------------------------------------------------


def test_remote_files_read_back_with_tracked_hashes_sizes_and_mtimes(
    remote: Remote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big_size = 5 * MiB + MiB // 2
    files = {
        "small.txt": b"a,b\n1,2\n" * 100,
        "nested/dir/medium.bin": os.urandom(300_000),
        "big.bin": os.urandom(big_size),
        "empty.bin": b"",
    }
    expected = {rel: remote.put(f"ds/{rel}", body) for rel, body in files.items()}
    run_id = track(remote.url("ds"))
    # Times are UTC whatever the zone of the daemon: a local-time parse would be 5.5 h off.
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    with mount_artifact(
        tmp_path / "mnt", run_id, tmp_path / "cache", "--chunk-size", "1M"
    ) as mount:
        big = mount.path / "big.bin"
        body = files["big.bin"]
        # Cold reads at unaligned offsets, across chunk boundaries, and past the end: with
        # O_DIRECT the daemon sees these exact offsets, then through the page cache.
        ranges = [
            (MiB - 7, 2 * MiB + 13),
            (3 * MiB + 12_345, 100_000),
            (big_size - 1000, 5000),
            (1, 1),
            (2 * MiB, MiB),
            (4 * MiB - 1, 2),
        ]
        for flags in (os.O_DIRECT, 0):
            for offset, length in ranges:
                assert pread_all(big, offset, length, flags) == body[offset : offset + length], (
                    flags,
                    offset,
                    length,
                )
        for rel, content in files.items():
            path = mount.path / rel
            assert path.read_bytes() == content, rel
            file_hash, server_time = expected[rel]
            assert mount.xattr(rel, "file_hash") == file_hash, rel
            assert mount.xattr(rel, "size") == str(len(content))
            assert mount.xattr(rel, "source") == remote.url(f"ds/{rel}")
            assert mount.xattr(rel, "type") == ("S3" if remote.kind == "s3" else "GCS")
            info = path.stat()
            assert info.st_size == len(content), rel
            assert oct(info.st_mode & 0o7777) == oct(0o444)
            assert info.st_uid == os.getuid()
            tracked_time = utc_seconds(mount.xattr(rel, "last_modified"))
            assert int(info.st_mtime) == tracked_time, rel
            assert int(info.st_mtime) == int(server_time), (rel, info.st_mtime, server_time)
        assert pread_all(big, 0, big_size) == body

        # `ls -l` shows the same sizes and mtimes (readdir with attributes).
        listing = subprocess.run(
            ["ls", "-lnR", "--time-style=+%s", str(mount.path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
        shown = {}
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 7 and parts[0].startswith("-"):
                shown[parts[6]] = (int(parts[4]), int(parts[5]))
        for rel, content in files.items():
            name = rel.rsplit("/", 1)[-1]
            assert shown.get(name) == (len(content), int(expected[rel][1])), (name, listing)
        assert mount.root_figure("errors") == 0


# -- 2. a small read of a huge object fetches little ----------------------------------------


@pytest.mark.s3
def test_reading_4k_of_a_256m_object_fetches_at_most_one_chunk_plus_readahead(
    s3: Any, tmp_path: Path
) -> None:
    size = 256 * MiB
    source = tmp_path / "huge.bin"
    piece = os.urandom(MiB)
    with open(source, "wb") as out:
        for index in range(size // MiB):
            out.write(index.to_bytes(8, "big") + piece[8:])
    s3.client.upload_file(str(source), s3.name, "huge/huge.bin")  # multipart
    first_4k = (0).to_bytes(8, "big") + piece[8:4096]
    source.unlink()
    try:
        run_id = track(s3.url("huge/huge.bin"))
        with mount_artifact(tmp_path / "mnt", run_id, tmp_path / "cache") as mount:
            path = mount.path / "huge.bin"
            assert path.stat().st_size == size
            assert pread_all(path, 0, 4096) == first_4k
            fetched = settled_figure(mount, "fetched_bytes")
            assert 0 < fetched <= 3 * 8 * MiB, f"fetched {fetched} bytes for a 4 KiB read"
            assert int(mount.xattr("huge.bin", "cached")) <= 3 * 8 * MiB
            assert chunk_bytes(tmp_path / "cache") <= 3 * (8 * MiB + 4 * KiB)
    finally:
        s3.client.delete_object(Bucket=s3.name, Key="huge/huge.bin")


# -- 3. the cache never exceeds its limit -------------------------------------------------------


@pytest.mark.s3
def test_cache_directory_never_exceeds_cache_size(s3: Any, tmp_path: Path) -> None:
    limit = 4 * MiB
    files = {f"f{index:02d}.bin": os.urandom(1_000_000) for index in range(12)}
    for name, body in files.items():
        s3.put(f"lru/{name}", body)
    run_id = track(s3.url("lru"))
    cache = tmp_path / "cache"
    args = ("--cache-size", "4M", "--chunk-size", "1M")
    with mount_artifact(tmp_path / "mnt", run_id, cache, *args) as mount:
        for name, body in files.items():
            assert (mount.path / name).read_bytes() == body, name
            on_disk = chunk_bytes(cache)
            assert on_disk <= limit, f"after {name}: {on_disk} bytes of chunks on disk"
            assert mount.root_figure("cache_bytes") <= mount.root_figure("cache_limit") == limit
        last = list(files)[-1]
        settled_figure(mount, "fetched_bytes")  # no neighbour prefetch still under way
        assert int(mount.xattr(last, "cached")) == len(files[last])
        # statfs is the cache's size and use, so `df` shows the mount (it hides one of no
        # blocks, as this one was) and how full its cache is.
        usage = os.statvfs(mount.path)
        used = mount.root_figure("cache_bytes")
        assert usage.f_blocks * usage.f_frsize == limit
        assert (usage.f_blocks - usage.f_bavail) == -(-used // usage.f_frsize) > 0
        shown = subprocess.run(["df", "--output=target"], capture_output=True, text=True)
        assert str(mount.path) in shown.stdout.split(), shown
        before = mount.root_figure("fetched_bytes")
        assert (mount.path / last).read_bytes() == files[last]
        # O_DIRECT bypasses the page cache: the daemon itself must serve it from its cache.
        assert pread_all(mount.path / last, 0, MiB, os.O_DIRECT) == files[last]
        assert mount.root_figure("fetched_bytes") == before
        assert chunk_bytes(cache) <= limit
    # A new mount (no page cache) serves the most recent file from the disk cache alone.
    with mount_artifact(tmp_path / "mnt", run_id, cache, *args) as mount:
        assert (mount.path / last).read_bytes() == files[last]
        assert mount.root_figure("fetched_bytes") == 0
        assert chunk_bytes(cache) <= limit


# -- 4. an object changed after tracking is never served -------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("size", [100_000, 2 * MiB + MiB // 2], ids=["one-chunk", "three-chunks"])
def test_s3_object_overwritten_after_tracking_fails_with_eio(
    s3: Any, tmp_path: Path, size: int
) -> None:
    old, new = os.urandom(size), os.urandom(size)
    s3.put("changed/x.bin", old)
    run_id = track(s3.url("changed/x.bin"))
    s3.put("changed/x.bin", new)
    with mount_artifact(
        tmp_path / "mnt", run_id, tmp_path / "cache", "--chunk-size", "1M"
    ) as mount:
        path = mount.path / "x.bin"
        assert path.stat().st_size == size
        head_code, head = read_outcome(lambda: pread_all(path, 0, 4096))
        whole_code, whole = read_outcome(path.read_bytes)
        assert (head_code, whole_code) == (errno.EIO, errno.EIO), (
            f"first 4 KiB: got {describe(head, old, new)}; "
            f"whole file: got {describe(whole, old, new)}"
        )
        assert s3.url("changed/x.bin") in mount.log()
        assert mount.root_figure("errors") >= 1


@pytest.mark.gcs
@pytest.mark.parametrize("size", [200_000, 3 * MiB + 100], ids=["one-chunk", "four-chunks"])
def test_gcs_object_overwritten_after_tracking_fails_with_eio(
    gcs: Any, tmp_path: Path, size: int
) -> None:
    old, new = os.urandom(size), os.urandom(size)
    gcs.put("changed/x.bin", old)
    run_id = track(gcs.url("changed/x.bin"))
    gcs.put("changed/x.bin", new)  # the emulator serves these even for the old generation
    with mount_artifact(
        tmp_path / "mnt", run_id, tmp_path / "cache", "--chunk-size", "1M"
    ) as mount:
        path = mount.path / "x.bin"
        assert path.stat().st_size == size
        head_code, head = read_outcome(lambda: pread_all(path, 0, 4096))
        whole_code, whole = read_outcome(path.read_bytes)
        assert (head_code, whole_code) == (errno.EIO, errno.EIO), (
            f"first 4 KiB: got {describe(head, old, new)}; "
            f"whole file: got {describe(whole, old, new)}"
        )
        assert gcs.url("changed/x.bin") in mount.log()
        assert mount.root_figure("errors") >= 1


# -- 5. a damaged cache chunk is detected and refetched; fsck drops it ----------------------


@pytest.mark.s3
def test_corrupted_cache_chunk_is_refetched_not_served(s3: Any, tmp_path: Path) -> None:
    body = os.urandom(2 * MiB + MiB // 2)  # chunks of 1, 1 and 0.5 MiB
    s3.put("corrupt/x.bin", body)
    run_id = track(s3.url("corrupt/x.bin"))
    cache = tmp_path / "cache"
    with mount_artifact(tmp_path / "mnt", run_id, cache, "--chunk-size", "1M") as mount:
        assert (mount.path / "x.bin").read_bytes() == body
    files = chunk_files(cache)
    assert len(files) == 3, files
    victim = min(files, key=lambda p: p.stat().st_size)  # the last, half-size chunk
    flip_byte(victim, victim.stat().st_size - 1)
    damaged = victim.read_bytes()
    with mount_artifact(tmp_path / "mnt", run_id, cache, "--chunk-size", "1M") as mount:
        assert (mount.path / "x.bin").read_bytes() == body
        replaced = not victim.exists() or victim.read_bytes() != damaged
        assert mount.root_figure("errors") >= 1 or replaced
        assert mount.root_figure("fetched_bytes") >= MiB // 2
        assert int(mount.xattr("x.bin", "cached")) == len(body)
    assert victim.exists() and victim.read_bytes() != damaged


@pytest.mark.s3
def test_cache_fsck_drops_a_damaged_chunk_once(s3: Any, cli: Any, tmp_path: Path) -> None:
    body = os.urandom(2 * MiB + 1000)
    s3.put("fsck/x.bin", body)
    run_id = track(s3.url("fsck/x.bin"))
    cache = tmp_path / "cache"
    with mount_artifact(tmp_path / "mnt", run_id, cache, "--chunk-size", "1M") as mount:
        assert (mount.path / "x.bin").read_bytes() == body
    files = chunk_files(cache)
    assert len(files) == 3, files
    flip_byte(files[0], files[0].stat().st_size // 2)
    first = cli("cache", "--cache-dir", str(cache), "fsck")
    assert first.returncode == 1, first  # damage found (and mended): as fsck(8) says it
    assert dropped_count(first.stdout) == 1, first.stdout
    assert len(chunk_files(cache)) == 2
    second = cli("cache", "--cache-dir", str(cache), "fsck")
    assert second.returncode == 0, second
    assert dropped_count(second.stdout) == 0, second.stdout
    # The dropped chunk is fetched again on the next read.
    with mount_artifact(tmp_path / "mnt", run_id, cache, "--chunk-size", "1M") as mount:
        assert (mount.path / "x.bin").read_bytes() == body
        assert 0 < mount.root_figure("fetched_bytes") <= MiB


# -- 6. concurrent random reads -----------------------------------------------------------------


@pytest.mark.s3
def test_concurrent_random_range_reads_get_exact_bytes(s3: Any, tmp_path: Path) -> None:
    files = {f"r{index}.bin": os.urandom(3 * MiB + index * 12_345) for index in range(4)}
    for name, body in files.items():
        s3.put(f"random/{name}", body)
    run_id = track(s3.url("random"))
    names = sorted(files)
    with mount_artifact(
        tmp_path / "mnt", run_id, tmp_path / "cache", "--chunk-size", "1M"
    ) as mount:
        barrier = threading.Barrier(8)
        problems: list[str] = []

        def reader(seed: int) -> None:
            rng = random.Random(1234 + seed)
            # Half the readers bypass the page cache, so the daemon serves them concurrently.
            flags = os.O_RDONLY | (os.O_DIRECT if seed % 2 else 0)
            fds = {name: os.open(mount.path / name, flags) for name in names}
            try:
                barrier.wait(30)
                for _ in range(40):
                    name = rng.choice(names)
                    body = files[name]
                    offset = rng.randrange(len(body))
                    length = rng.randint(1, 3 * MiB // 2)
                    try:
                        data = os.pread(fds[name], length, offset)
                    except OSError as exc:
                        problems.append(f"{name}@{offset}+{length}: {exc}")
                        continue
                    if data != body[offset : offset + length]:
                        problems.append(f"{name}@{offset}+{length}: wrong bytes ({len(data)})")
            except Exception as exc:
                problems.append(f"thread {seed}: {exc!r}")
            finally:
                for fd in fds.values():
                    os.close(fd)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads), "readers hung"
        assert problems == []
        assert mount.root_figure("errors") == 0


# -- 7. a killed daemon ------------------------------------------------------------------------


@pytest.mark.s3
def test_killed_daemon_is_recoverable_and_its_cache_reused(
    s3: Any, cli: Any, tmp_path: Path
) -> None:
    body = os.urandom(2 * MiB + 777)
    s3.put("kill/x.bin", body)
    run_id = track(s3.url("kill/x.bin"))
    cache = tmp_path / "cache"
    mountpoint = tmp_path / "mnt"
    with mount_artifact(mountpoint, run_id, cache, "--chunk-size", "1M") as mount:
        assert (mount.path / "x.bin").read_bytes() == body
        os.kill(mount.pid, signal.SIGKILL)
        assert wait_gone(mount.pid), "the daemon survived SIGKILL"
        assert is_mounted(str(mountpoint))  # dead but still in the mount table
        result = cli("unmount", str(mountpoint))
        assert result.returncode == 0, result
        assert not is_mounted(str(mountpoint))
    with mount_artifact(mountpoint, run_id, cache, "--chunk-size", "1M") as mount:
        assert (mount.path / "x.bin").read_bytes() == body
        assert mount.root_figure("fetched_bytes") == 0
        assert int(mount.xattr("x.bin", "cached")) == len(body)


# -- 8. cache stats and clear ------------------------------------------------------------------


def _stats(output: str) -> tuple[int, int]:
    chunks = re.search(r"chunks:\s*(\d+)", output)
    size = re.search(r"bytes:\s*(\d+)", output)
    assert chunks and size, output
    return int(chunks.group(1)), int(size.group(1))


@pytest.mark.s3
def test_cache_stats_and_clear(s3: Any, cli: Any, tmp_path: Path) -> None:
    files = {"a.bin": os.urandom(1_500_000), "b.bin": os.urandom(300_000)}
    for name, body in files.items():
        s3.put(f"stats/{name}", body)
    run_id = track(s3.url("stats"))
    cache = tmp_path / "cache"
    with mount_artifact(tmp_path / "mnt", run_id, cache, "--chunk-size", "1M") as mount:
        for name, body in files.items():
            assert (mount.path / name).read_bytes() == body
    result = cli("cache", "--cache-dir", str(cache), "stats")
    assert result.returncode == 0, result
    chunks, size = _stats(result.stdout)
    assert chunks == len(chunk_files(cache)) == 3
    assert size == chunk_bytes(cache) > sum(len(b) for b in files.values())
    result = cli("cache", "--cache-dir", str(cache), "clear")
    assert result.returncode == 0, result
    assert chunk_files(cache) == []
    assert _stats(cli("cache", "--cache-dir", str(cache), "stats").stdout) == (0, 0)


@pytest.mark.s3
def test_a_cache_in_use_by_a_mount_is_changed_by_no_other_process(
    s3: Any, cli: Any, tmp_path: Path
) -> None:
    """One process uses a cache directory at a time. While a mount runs on the default cache,
    `cache stats` reads it, `cache clear`, `cache fsck` and a second mount refuse in one line
    naming the mount's pid, and `download` goes through a temporary cache: the mount's chunks
    stay as they are (each process would otherwise keep the limit alone, and empty tmp/ under
    the other's writes)."""
    files = {"a.bin": os.urandom(1_500_000), "b.bin": os.urandom(300_000)}
    for name, body in files.items():
        s3.put(f"busy/{name}", body)
    run_id = track(s3.url("busy"))
    default_cache = Path(os.environ["XDG_CACHE_HOME"]) / "artifactfs"  # download's too
    with mount_artifact(tmp_path / "mnt", run_id, default_cache, "--chunk-size", "1M") as mount:
        for name, body in files.items():
            assert (mount.path / name).read_bytes() == body
        in_flight = default_cache / "data" / "tmp" / "being-written"  # as a put leaves it
        in_flight.write_bytes(b"half")
        chunks = {path: path.read_bytes() for path in chunk_files(default_cache)}
        assert len(chunks) == 3

        (tmp_path / "second").mkdir()
        stats = cli("cache", "--cache-dir", str(default_cache), "stats")
        assert stats.returncode == 0, stats
        assert _stats(stats.stdout) == (3, chunk_bytes(default_cache))
        refusals = [
            cli("cache", "--cache-dir", str(default_cache), "clear"),
            cli("cache", "--cache-dir", str(default_cache), "fsck"),
            cli(
                "mount", str(tmp_path / "second"), "--run", run_id, "--field", FIELD,
                "--cache-dir", str(default_cache),
            ),
        ]  # fmt: skip
        for refused in refusals:
            assert refused.returncode == 2, refused
            assert refused.stderr.count("\n") == 1, refused.stderr
            assert "in use by another artifactfs process" in refused.stderr
            assert f"pid {mount.pid}" in refused.stderr
        assert not is_mounted(str(tmp_path / "second"))

        downloaded = cli("download", run_id, FIELD, str(tmp_path / "out"))
        assert downloaded.returncode == 0, downloaded
        # It said `give this one another --cache-dir`: `download` has no such option.
        assert downloaded.stderr.splitlines() == [
            f"artifactfs: warning: cache {default_cache / 'data'} is in use by another "
            f"artifactfs process (pid {mount.pid}): downloading through a temporary cache "
            "(bytes cached there are fetched again)"
        ], downloaded.stderr
        for name, body in files.items():
            assert (tmp_path / "out" / name).read_bytes() == body
        assert {path: path.read_bytes() for path in chunk_files(default_cache)} == chunks
        assert in_flight.read_bytes() == b"half"
        assert (
            sorted(p.name for p in default_cache.iterdir() if p.name.startswith("download")) == []
        )
        for name, body in files.items():
            assert (mount.path / name).read_bytes() == body
    cleared = cli("cache", "--cache-dir", str(default_cache), "clear")
    assert cleared.returncode == 0, cleared
    assert chunk_files(default_cache) == []


@pytest.mark.s3
def test_download_beside_a_cache_of_a_newer_format_goes_through_a_temporary_one(
    s3: Any, cli: Any, tmp_path: Path
) -> None:
    """A newer artifactfs's cache in the default place failed `download`, advising another
    --cache-dir, an option `download` does not have. It is left as it is."""
    body = os.urandom(300_000)
    s3.put("newer/a.bin", body)
    run_id = track(s3.url("newer"))
    default_cache = Path(os.environ["XDG_CACHE_HOME"]) / "artifactfs" / "data"
    default_cache.mkdir(parents=True)
    (default_cache / "FORMAT").write_text("artifactfs-cache 99\n")
    downloaded = cli("download", run_id, FIELD, str(tmp_path / "out"))
    assert downloaded.returncode == 0, downloaded
    assert downloaded.stderr.splitlines() == [
        f"artifactfs: warning: cache {default_cache} has format 'artifactfs-cache 99', which "
        "this artifactfs cannot use: downloading through a temporary cache (bytes cached "
        "there are fetched again)"
    ], downloaded.stderr
    assert (tmp_path / "out" / "a.bin").read_bytes() == body
    assert (default_cache / "FORMAT").read_text() == "artifactfs-cache 99\n"
    assert not (default_cache / "chunks").exists()
    assert sorted(p.name for p in default_cache.parent.iterdir()) == ["data"]  # nothing beside


def test_cache_commands_take_cache_dir_after_the_subcommand(cli: Any, tmp_path: Path) -> None:
    """`artifactfs cache stats --cache-dir D`, as one writes `mount MNT --cache-dir D`."""
    cache = tmp_path / "cache"
    made = ChunkCache(chunk_directory(cache), 1024**2)
    assert made.put(b"k" * 32, b"cached bytes")
    made.close()
    stats = cli("cache", "stats", "--cache-dir", str(cache))
    assert stats.returncode == 0, stats
    assert _stats(stats.stdout)[0] == 1
    for command in ("fsck", "clear"):
        result = cli("cache", command, "--cache-dir", str(cache))
        assert result.returncode == 0, (command, result)
    assert chunk_files(cache) == []


def test_cache_commands_change_no_directory_that_is_not_a_cache(cli: Any, tmp_path: Path) -> None:
    """clear and fsck made a cache wherever they were pointed: a mistyped --cache-dir filled a
    new directory, or a user's own `data/` (which a later `track` then recorded); stats
    counted a missing one as an empty cache, and a user's files as chunks."""
    missing = tmp_path / "typo"
    user = tmp_path / "project"
    (user / "data").mkdir(parents=True)
    (user / "data" / "train.csv").write_bytes(b"x,y\n")
    for command in ("stats", "clear", "fsck"):
        nothing = cli("cache", "--cache-dir", str(missing), command)
        assert nothing.returncode == 0, nothing
        assert nothing.stdout.strip() == f"no cache in {missing / 'data'}"
        assert not missing.exists()
        refused = cli("cache", "--cache-dir", str(user), command)
        assert refused.returncode == 2, refused
        assert refused.stderr.strip() == (
            f"artifactfs: error: {user / 'data'} is not an artifactfs cache "
            "(it has no FORMAT file): left as it is"
        )
        assert sorted(p.name for p in (user / "data").iterdir()) == ["train.csv"]
    # A cache whose first start died before it wrote FORMAT is one all the same.
    unfinished = tmp_path / "unfinished"
    for name in ("chunks/ab", "tmp"):
        (unfinished / "data" / name).mkdir(parents=True)
    (unfinished / "data" / "LOCK").write_text("4242\n")
    cleared = cli("cache", "--cache-dir", str(unfinished), "clear")
    assert cleared.returncode == 0, cleared
    assert cleared.stdout.startswith(f"cleared {unfinished / 'data'}: 0 bytes freed"), cleared


# -- 9. concurrent readers of one chunk share one fetch ------------------------------------------


@pytest.mark.s3
@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_concurrent_readers_of_one_chunk_cause_one_fetch(
    s3: Any, tmp_path: Path, direct: bool
) -> None:
    """Through the page cache the kernel may already merge the readers; with O_DIRECT each
    reader's requests reach the daemon, which must still fetch the chunk once."""
    body = os.urandom(6 * MiB)
    s3.put("same/x.bin", body)
    run_id = track(s3.url("same/x.bin"))
    with mount_artifact(
        tmp_path / "mnt", run_id, tmp_path / "cache", "--chunk-size", "1M"
    ) as mount:
        path = mount.path / "x.bin"
        barrier = threading.Barrier(8)
        results: list[bytes | str] = [b""] * 8

        def reader(index: int) -> None:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                barrier.wait(30)
                results[index] = os.pread(fd, MiB, 2 * MiB)
            except Exception as exc:
                results[index] = repr(exc)
            finally:
                os.close(fd)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert all(r == body[2 * MiB : 3 * MiB] for r in results), [
            r if isinstance(r, str) else len(r) for r in results
        ]
        fetched = settled_figure(mount, "fetched_bytes")
        # A file of several chunks up to VERIFY_BEFORE_SERVING_BYTES is fetched whole and
        # checked before any byte is served: one fetch of each chunk, none twice.
        assert fetched == len(body), f"fetched {fetched} bytes of a {len(body)}-byte file"
        assert mount.root_figure("errors") == 0
