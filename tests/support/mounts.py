"""Real FUSE mounts for tests: mount through the CLI, always unmount, never leak a daemon.

`mounted()` runs `artifactfs mount` (which returns once the mount is ready), yields a handle
with the mount point, the daemon's PID and its log, and on the way out unmounts through the
CLI, falls back to a lazy `fusermount3 -u -z`, and ends the daemon by its PID if it lingers.
On failure the daemon's log is printed, which is what one needs to see.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from artifactfs.fs.daemon import is_mounted


@dataclass
class Mount:
    path: Path
    pid: int
    log_file: Path

    def xattr(self, relative: str, name: str) -> str:
        target = self.path / relative if relative else self.path
        return os.getxattr(target, f"user.artifactfs.{name}").decode("utf-8")

    def root_figure(self, name: str) -> int:
        return int(self.xattr("", name))

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "artifactfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is as good as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def force_unmount(path: Path, pid: int | None) -> None:
    """Last resort, in this order: CLI unmount, lazy fusermount3, SIGTERM then SIGKILL by PID."""
    if is_mounted(str(path)):
        _cli("unmount", str(path), timeout=30)
    if is_mounted(str(path)):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        if not wait_gone(pid, 10):
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10)


def start_mount(mountpoint: Path, *args: str) -> Mount:
    mountpoint.mkdir(parents=True, exist_ok=True)
    result = _cli("mount", str(mountpoint), *args)
    match = re.search(r"daemon pid (\d+), log: (.*)\)$", result.stdout.strip())
    if result.returncode != 0 or not match:
        if is_mounted(str(mountpoint)):
            force_unmount(mountpoint, None)
        raise AssertionError(f"mount failed: {result.returncode} {result.stdout} {result.stderr}")
    return Mount(mountpoint, int(match.group(1)), Path(match.group(2)))


def artifact_args(run_id: str, field: str, cache: Path | str) -> tuple[str, ...]:
    """`mount` arguments for one artifact as the root, with its own cache directory."""
    return ("--run", run_id, "--field", field, "--cache-dir", str(cache))


def settled_figure(mount: Mount, name: str, quiet: float = 1.0, timeout: float = 15.0) -> int:
    """A root figure once it has stopped changing for `quiet` seconds (read-ahead finished)."""
    deadline = time.monotonic() + timeout
    value = mount.root_figure(name)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = mount.root_figure(name)
        if now != value:
            value, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= quiet:
            break
    return value


@contextmanager
def mounted(mountpoint: Path, *args: str) -> Iterator[Mount]:
    """`artifactfs mount MOUNTPOINT ARGS...`, unmounted whatever happens in the block."""
    with supervised(start_mount(mountpoint, *args)) as mount:
        yield mount


@contextmanager
def supervised(mount: Mount) -> Iterator[Mount]:
    """A started mount, unmounted whatever happens; its daemon log printed on failure."""
    failed = True
    try:
        yield mount
        failed = False
    finally:
        if failed:
            print(f"--- daemon log {mount.log_file} ---\n{mount.log()}", file=sys.stderr)
        force_unmount(mount.path, mount.pid)


def artifactfs_mounts() -> list[str]:
    """Mount points of artifactfs file systems now in /proc/mounts."""
    with open("/proc/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.startswith("artifactfs ")]
