"""Opening a small remote file fetches its next neighbours before the program asks."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import artifactfs
from tests.conftest import S3Bucket
from tests.support.mounts import Mount, mounted


@contextmanager
def mounted_objects(
    s3: S3Bucket, tmp_path: Path, bodies: dict[str, bytes], location: str
) -> Iterator[Mount]:
    """Put the objects (key -> bytes), track `location` in a new run, mount that artifact."""
    for key, body in bodies.items():
        s3.put(key, body)
    run = artifactfs.init_run(project="t/prefetch")
    run["data"].track_files(s3.url(location))
    with mounted(
        tmp_path / "mnt", "--run", run.id, "--field", "data", "--cache-dir", str(tmp_path / "c")
    ) as mount:
        yield mount


def test_opening_a_file_prefetches_its_neighbours(s3: S3Bucket, tmp_path: Path) -> None:
    bodies = {f"imgs/{n:03d}.bin": bytes([n]) * (1000 + n) for n in range(60)}
    with mounted_objects(s3, tmp_path, bodies, "imgs") as mount:
        assert (mount.path / "000.bin").read_bytes() == bodies["imgs/000.bin"]
        # The next 32 files are fetched without being opened; the ones after are not.
        # They come in batches on two threads, so wait for every one, not only the last.
        deadline = time.monotonic() + 30
        for n in range(1, 33):
            while int(mount.xattr(f"{n:03d}.bin", "cached")) != len(bodies[f"imgs/{n:03d}.bin"]):
                assert time.monotonic() < deadline, f"neighbour {n} was not prefetched"
                time.sleep(0.05)
        assert int(mount.xattr("040.bin", "cached")) == 0
        # Each of files 0..32 was fetched exactly once, nothing else.
        expected = sum(len(bodies[f"imgs/{n:03d}.bin"]) for n in range(33))
        assert mount.root_figure("fetched_bytes") == expected
        for n in range(1, 33):
            assert (mount.path / f"{n:03d}.bin").read_bytes() == bodies[f"imgs/{n:03d}.bin"]
        assert mount.root_figure("errors") == 0


def test_opening_a_large_file_prefetches_nothing(s3: S3Bucket, tmp_path: Path) -> None:
    """Only a small file's opening is a hint that a program walks a folder of small files:
    opening a large one (more than a chunk) fetches none of its neighbours."""
    bodies = {"mixed/big/a-large.bin": bytes(range(256)) * (9 * 4096)}  # 9 MiB: two chunks
    bodies |= {f"mixed/big/b{n:02d}.bin": bytes([n]) * (1000 + n) for n in range(10)}
    bodies |= {f"mixed/small/c{n:02d}.bin": bytes([n]) * (2000 + n) for n in range(10)}
    with mounted_objects(s3, tmp_path, bodies, "mixed") as mount:
        os.close(os.open(mount.path / "big/a-large.bin", os.O_RDONLY))
        # Then a small file elsewhere: its neighbours come in. Prefetches are handed to the
        # reader in the order of the opens, so once these are in, any the large file's
        # opening had started would be too.
        assert (mount.path / "small/c00.bin").read_bytes() == bodies["mixed/small/c00.bin"]
        deadline = time.monotonic() + 30
        while int(mount.xattr("small/c09.bin", "cached")) != len(bodies["mixed/small/c09.bin"]):
            assert time.monotonic() < deadline, "c09.bin was not prefetched"
            time.sleep(0.05)
        time.sleep(1)  # and a little longer, for good measure
        for n in range(10):
            assert int(mount.xattr(f"big/b{n:02d}.bin", "cached")) == 0, n
        small = sum(len(body) for key, body in bodies.items() if "/small/" in key)
        assert mount.root_figure("fetched_bytes") == small


def test_near_a_directorys_end_the_next_directorys_first_files_are_fetched(
    s3: S3Bucket, tmp_path: Path
) -> None:
    """A program walking a tree in order opens the next directory's first files next: the
    window of 32 neighbours runs on into that directory (and no further)."""
    bodies = {f"walk/a/{n:03d}.bin": bytes([n]) * (1500 + n) for n in range(10)}
    bodies |= {f"walk/b/{n:03d}.bin": bytes([n]) * (1700 + n) for n in range(40)}
    bodies |= {f"walk/c/{n:03d}.bin": bytes([n]) * (1900 + n) for n in range(5)}
    with mounted_objects(s3, tmp_path, bodies, "walk") as mount:
        assert (mount.path / "a/005.bin").read_bytes() == bodies["walk/a/005.bin"]
        # a/006..a/009 and b/000..b/027: 32 neighbours in all.
        wanted = [f"a/{n:03d}.bin" for n in range(6, 10)] + [f"b/{n:03d}.bin" for n in range(28)]
        deadline = time.monotonic() + 30
        for name in wanted:
            while int(mount.xattr(name, "cached")) != len(bodies[f"walk/{name}"]):
                assert time.monotonic() < deadline, f"{name} was not prefetched"
                time.sleep(0.05)
        assert int(mount.xattr("b/030.bin", "cached")) == 0
        assert int(mount.xattr("c/000.bin", "cached")) == 0
        expected = sum(len(bodies[f"walk/{name}"]) for name in ["a/005.bin", *wanted])
        assert mount.root_figure("fetched_bytes") == expected
        for name in wanted:
            assert (mount.path / name).read_bytes() == bodies[f"walk/{name}"]
        assert mount.root_figure("errors") == 0


def test_a_neighbour_rewritten_after_tracking_fails_alone(s3: S3Bucket, tmp_path: Path) -> None:
    """Neighbours are fetched in batches; one whose object changed since tracking fails with
    EIO when read (and is never cached), and the rest of its batch is served right."""
    bodies = {f"set/{n:03d}.bin": bytes([n]) * (2000 + n) for n in range(20)}
    with mounted_objects(s3, tmp_path, bodies, "set") as mount:
        s3.put("set/007.bin", bytes([200]) * (2000 + 7))  # same size, other bytes: after tracking
        assert (mount.path / "000.bin").read_bytes() == bodies["set/000.bin"]
        deadline = time.monotonic() + 10
        while int(mount.xattr("019.bin", "cached")) != len(bodies["set/019.bin"]):
            assert time.monotonic() < deadline, "neighbour 19 was not prefetched"
            time.sleep(0.05)
        for n in range(1, 20):
            path = mount.path / f"{n:03d}.bin"
            if n == 7:
                with pytest.raises(OSError) as failed:
                    path.read_bytes()
                assert failed.value.errno == errno.EIO
                assert int(mount.xattr("007.bin", "cached")) == 0
            else:
                assert path.read_bytes() == bodies[f"set/{n:03d}.bin"], n
