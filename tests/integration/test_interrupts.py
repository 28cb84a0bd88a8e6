"""Ctrl-C stops a download, a track or a verify: exit 130, one line, no file started after
it, the files under way given up (a download's removed), none left half-written; a download
killed mid-file leaves nothing behind once run again."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import artifactfs
from tests.conftest import make_tree
from tests.integration.test_neptune_import import wire_entry, write_export

FILES = 3000
STOPPED_WITHIN = 10.0  # seconds from the signal to the exit; a hang is what this catches
SHARD_SIZE = 64 << 30  # sparse: it takes no disk, and minutes to read and hash whole


def interrupted(
    args: list[str], started: Callable[[int], bool], after: float = 0.0
) -> tuple[int, str, float]:
    """`artifactfs ARGS` sent SIGINT `after` seconds after `started(its pid)` is true: exit
    code, stderr, and the seconds from the signal to its exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "artifactfs", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # As from a shell's foreground: a test runner's worker may have SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        while process.poll() is None and not started(process.pid):
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


def interrupted_download(
    args: list[str], dest: Path, after: float, started: str = "f*.bin"
) -> tuple[int, str, float]:
    """`artifactfs download ARGS`, interrupted `after` seconds after the first file matching
    `started` is in DEST."""
    return interrupted(["download", *args], lambda _: any(dest.rglob(started)), after)


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (it is reading it)."""
    with contextlib.suppress(OSError):  # the process ended
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # that fd closed meanwhile
                if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                    return True
    return False


def sparse_shard(directory: Path) -> Path:
    directory.mkdir()
    shard = directory / "shard.bin"
    with open(shard, "wb") as out:
        out.truncate(SHARD_SIZE)
    return shard


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


def test_ctrl_c_abandons_a_large_file_under_way(tmp_path: Path) -> None:
    """A Ctrl-C let the files under way be written to their end first: minutes, for a
    dataset of 10 GB shards. The file under way is now abandoned, its temporary file removed."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "shard.bin", "wb") as shard:
        shard.truncate(1 << 30)  # 1 GiB of zeros, sparse: it takes no disk to make
    run = artifactfs.init_run(project="ml/shards")
    run["data"].track_files(str(data))
    dest = tmp_path / "dest"
    code, stderr, took = interrupted_download(
        [run.id, "data", str(dest)], dest, 0.0, started=".artifactfs-*.part"
    )
    assert code == 130, (code, stderr)
    assert stderr.strip() == "artifactfs: error: aborted", stderr
    assert took < STOPPED_WITHIN, f"exited {took:.1f}s after SIGINT"
    # Neither the file nor its temporary one: DEST, made by the download, is gone again.
    assert not dest.exists(), sorted(p.name for p in dest.rglob("*"))


def test_ctrl_c_gives_up_hashing_a_large_file_for_track(cli, tmp_path: Path) -> None:
    """`track` hashed the files under way to their end first: minutes, for 10 GB shards.
    Nothing is recorded: no run is made."""
    shard = sparse_shard(tmp_path / "data")
    code, stderr, took = interrupted(
        ["--project", "ml/shards", "track", "data", str(shard.parent)],
        lambda pid: has_open(pid, shard),
    )
    assert code == 130, (code, stderr)
    assert stderr.strip() == "artifactfs: error: aborted", stderr
    assert took < STOPPED_WITHIN, f"exited {took:.1f}s after SIGINT"
    listed = cli("runs")
    assert listed.returncode == 0, listed.stderr
    assert "ml/shards" not in listed.stdout, listed.stdout


def test_ctrl_c_gives_up_checking_a_large_file_for_verify(cli, tmp_path: Path) -> None:
    """`verify` hashed the local files under way to their end first."""
    shard = sparse_shard(tmp_path / "data")
    entry = wire_entry(
        "shard.bin", "0" * 40, "Local", SHARD_SIZE, file_path=f"file://{shard}"
    )  # a run recorded before, as Neptune's export gives it: not hashed here
    write_export(tmp_path / "export", "ml/shards/SHD-1/data", [entry])
    imported = cli("import-neptune", str(tmp_path / "export"))
    assert imported.returncode == 0, imported.stderr
    code, stderr, took = interrupted(["verify", "SHD-1"], lambda pid: has_open(pid, shard))
    assert code == 130, (code, stderr)
    assert stderr.strip() == "artifactfs: error: aborted", stderr
    assert took < STOPPED_WITHIN, f"exited {took:.1f}s after SIGINT"


def test_a_download_killed_mid_file_leaves_nothing_once_run_again(tmp_path: Path) -> None:
    """A SIGKILL leaves the file being written under its temporary name; the next download
    into DEST, once complete, left it there too, for a training job or rsync to pick up.
    Another download's file, being written, is left alone: it holds a lock on it (a host
    name and a pid in the name would not tell: containers share one, PIDs are reused)."""
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
    # Another download's file, being written (locked, as a download locks its own), stays,
    # even named as one of this host's by a pid not running here (another PID namespace).
    writing = dest / "big" / f".artifactfs-{_this_host()}-{_dead_pid()}-x.part"
    writing.write_bytes(b"being written")
    os.utime(writing, (0, 0))  # old, as a stalled download's may be
    time.sleep(1.1)  # the killed one's file is older than a second: no one is about to lock it
    with open(writing, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run["data"].download(str(dest))
    assert sorted(p.name for p in (dest / "big").iterdir()) == [writing.name, "a.bin", "b.bin"]
    assert (dest / "big" / "a.bin").read_bytes() == (big / "a.bin").read_bytes()


def _dead_pid() -> int:
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def _this_host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
