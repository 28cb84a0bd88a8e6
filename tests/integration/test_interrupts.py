"""Ctrl-C on a long command stops it at once: exit 130, one line, nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import artifactfs
from tests.conftest import make_tree

FILES = 3000
STOPPED_WITHIN = 10.0  # seconds from the signal to the exit; a hang is what this catches


def interrupted_download(args: list[str], dest: Path, after: float) -> tuple[int, str, float]:
    """`artifactfs download ARGS` sent SIGINT `after` seconds after its first file is written:
    exit code, stderr, and the seconds from the signal to its exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "artifactfs", "download", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # As from a shell's foreground: a test runner's worker may have SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while process.poll() is None and not any(dest.rglob("f*.bin")):
            time.sleep(0.01)
        time.sleep(after)
        process.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        try:
            _, stderr = process.communicate(timeout=STOPPED_WITHIN + 20)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        return process.returncode, stderr, time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def many_files(tmp_path: Path) -> Path:
    files = {f"d{n % 30:02d}/f{n:05d}.bin": b"%d" % n for n in range(FILES)}
    return make_tree(tmp_path / "data", files)


def test_ctrl_c_stops_a_download_at_once(many_files: Path, tmp_path: Path) -> None:
    """A Ctrl-C while the download was still handing its files to its threads let it write
    all of them (20 s for 20,000 files), or hang for good on a lock it left taken."""
    run = artifactfs.init_run(project="ml/ctrl-c")
    run["data"].track_files(str(many_files))
    for attempt, after in enumerate((0.0, 0.01, 0.02, 0.03, 0.05, 0.1)):
        dest = tmp_path / f"dest{attempt}"
        code, stderr, took = interrupted_download([run.id, "data", str(dest)], dest, after)
        assert code == 130, (after, code, stderr)
        assert stderr.strip() == "artifactfs: error: aborted", (after, stderr)
        assert took < STOPPED_WITHIN, f"exited {took:.1f}s after SIGINT at {after}s"
        written = list(dest.rglob("*.bin"))
        assert 0 < len(written) < FILES, (after, len(written))  # it stopped on the way
        assert not list(dest.rglob(".artifactfs-*")), "a half-written file was left"


def test_a_download_killed_mid_file_leaves_nothing_once_run_again(tmp_path: Path) -> None:
    """A SIGKILL leaves the file being written under its temporary name; the next download
    into DEST, once complete, left it there too, for a training job or rsync to pick up."""
    big = tmp_path / "data" / "big"
    big.mkdir(parents=True)
    blocks = [bytes([n]) * (1 << 20) for n in range(256)]
    for name in ("a.bin", "b.bin"):
        (big / name).write_bytes(b"".join(blocks[:64]))  # 64 MiB each: killed while copied
    run = artifactfs.init_run(project="ml/killed")
    run["data"].track_files(str(tmp_path / "data"))
    dest = tmp_path / "dest"
    process = subprocess.Popen(
        [sys.executable, "-m", "artifactfs", "download", run.id, "data", str(dest)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(dest.rglob(".artifactfs-*.part")) and time.monotonic() < deadline:
            assert process.poll() is None, "it ended before writing: the test needs more data"
        process.kill()
    finally:
        process.kill()
        process.wait()
    left = list(dest.rglob(".artifactfs-*.part"))
    assert left, "killed before a temporary file was made"
    # Another process's file, writing now, and another host's are not this download's to take.
    writing = dest / "big" / f".artifactfs-{_this_host()}-{os.getpid()}-x.part"
    elsewhere = dest / "big" / ".artifactfs-otherhost-1-x.part"
    writing.write_bytes(b"being written")
    elsewhere.write_bytes(b"on another host")

    run["data"].download(str(dest))

    assert sorted(p.name for p in (dest / "big").iterdir()) == sorted(
        ["a.bin", "b.bin", writing.name, elsewhere.name]
    )
    assert (dest / "big" / "a.bin").read_bytes() == (big / "a.bin").read_bytes()


def _this_host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
