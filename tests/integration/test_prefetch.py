"""Opening a small remote file fetches its next neighbours before the program asks."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

import artifactfs
from tests.conftest import S3Bucket
from tests.support.mounts import mounted


def test_opening_a_file_prefetches_its_neighbours(s3: S3Bucket, tmp_path: Path) -> None:
    bodies = {f"imgs/{n:03d}.bin": bytes([n]) * (1000 + n) for n in range(60)}
    for key, body in bodies.items():
        s3.put(key, body)
    run = artifactfs.init_run(project="t/prefetch")
    run["data"].track_files(s3.url("imgs"))
    with mounted(
        tmp_path / "mnt", "--run", run.id, "--field", "data", "--cache-dir", str(tmp_path / "c")
    ) as mount:
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


def test_a_neighbour_rewritten_after_tracking_fails_alone(s3: S3Bucket, tmp_path: Path) -> None:
    """Neighbours are fetched in batches; one whose object changed since tracking fails with
    EIO when read (and is never cached), and the rest of its batch is served right."""
    bodies = {f"set/{n:03d}.bin": bytes([n]) * (2000 + n) for n in range(20)}
    for key, body in bodies.items():
        s3.put(key, body)
    run = artifactfs.init_run(project="t/prefetch")
    run["data"].track_files(s3.url("set"))
    s3.put("set/007.bin", bytes([200]) * (2000 + 7))  # same size, other bytes
    with mounted(
        tmp_path / "mnt", "--run", run.id, "--field", "data", "--cache-dir", str(tmp_path / "c")
    ) as mount:
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
