"""Processes and mounts the benchmark starts, and how it always stops them.

Every server, FUSE daemon and profiler is started through `Owned`, which remembers its PID; at
the end (normal or not) the benchmark unmounts every mount point it made and stops every PID it
started, and only those: other sessions' processes and mounts are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROBE = Path(__file__).with_name("probe.py")


class BenchError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _unescape(field: str) -> str:
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(path: Path | str) -> str | None:
    """The file system type of the mount at exactly `path`, or None."""
    target = os.path.abspath(path)
    with open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and _unescape(parts[1]) == target:
                return parts[2]
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def drop_caches() -> bool:
    """Write back and drop the page cache, dentries and inodes (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def raise_readahead(mountpoint: Path, kb: int = 1024) -> None:
    """Give a FUSE mount the same 1 MiB kernel read-ahead that artifactfs sets for itself."""
    with contextlib.suppress(OSError):
        device = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(path, "w") as handle:
            handle.write(str(kb))


def fusermount_unmount(mountpoint: Path, lazy: bool = False) -> bool:
    if mount_type(mountpoint) is None:
        return True
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(command, capture_output=True, timeout=30)
    if mount_type(mountpoint) is not None:
        # s3fs is a libfuse 2 program: its mounts may need the older helper.
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                ["fusermount", *command[1:]] if not lazy else ["umount", "-l", str(mountpoint)],
                capture_output=True,
                timeout=30,
            )
    return mount_type(mountpoint) is None


class Owned:
    """PIDs and mount points this run made; `cleanup()` ends them all, and nothing else."""

    def __init__(self) -> None:
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.pids: set[int] = set()  # daemons we did not Popen ourselves (artifactfs forks)
        self.mountpoints: list[Path] = []

    def popen(self, command: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")  # noqa: SIM115 - the child holds it; closed with the process
        try:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        finally:
            out.close()
        self.processes[process.pid] = process
        return process

    def stop(self, pid: int, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL, one PID that this run started."""
        process = self.processes.pop(pid, None)
        self.pids.discard(pid)
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(10)
            return
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not wait_for(lambda: not pid_alive(pid), timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not pid_alive(pid), 10)

    def cleanup(self) -> None:
        for mountpoint in reversed(self.mountpoints):
            if mount_type(mountpoint) is not None and not fusermount_unmount(mountpoint):
                fusermount_unmount(mountpoint, lazy=True)
        for pid in list(self.processes) + list(self.pids):
            self.stop(pid)
        left = [str(m) for m in self.mountpoints if mount_type(m) is not None]
        if left:
            log(f"WARNING: still mounted: {', '.join(left)}")


def probe(kind: str, args: dict[str, Any], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one measurement in a child (bench_support/probe.py) and return its JSON answer."""
    # Its own process group, so that a timeout ends the probe's worker processes too.
    child = subprocess.Popen(
        [sys.executable, str(PROBE), kind, json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.communicate(timeout=30)
        raise BenchError(f"probe {kind} timed out after {timeout:.0f}s") from None
    result = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-3:]
        raise BenchError(f"probe {kind} failed: {' | '.join(tail)}")
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer
