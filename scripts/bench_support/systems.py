"""The mounted systems under test, each on its own mount point over the same bucket.

- artifactfs: `artifactfs mount MNT --run R --field data` (the bucket tracked as one artifact).
- rclone: `rclone mount --read-only --vfs-cache-mode full`, tuned for an immutable, read-mostly
  tree (long directory and attribute caches, parallel chunk streams, read-ahead, no HEAD
  before GET, no checksums or mod-times to fetch).
- s3fs (Debian's): read-only, `kernel_cache`, a disk cache (`use_cache`), parallel ranged
  downloads, a large stat cache with a long expiry.
- pyfuse3 (a limit, not a peer): `floor_fs.py`, a bare pyfuse3 pass-through of the bucket's
  directory on tmpfs: what a pyfuse3 daemon does at best with the bytes already in memory.

All of them get the same 1 MiB kernel read-ahead (artifactfs sets it for itself; the benchmark
sets it for the others), and those with a cache the same 10 GB budget. `mount(fresh=True)`
empties the cache directory first: cold means a fresh mount and an empty cache.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench_support.procs import (
    BenchError,
    Owned,
    fusermount_unmount,
    mount_type,
    pid_alive,
    raise_readahead,
    wait_for,
)
from bench_support.server import ACCESS_KEY, BUCKET, SECRET_KEY, S3Server, find_rclone

CACHE_SIZE = "10G"


class FuseSystem:
    name = ""
    fstype = ""

    def __init__(self, owned: Owned, work: Path, server: S3Server, env: dict[str, str]) -> None:
        self.owned = owned
        self.server = server
        self.env = env
        self.mountpoint = work / "mnt" / self.name
        self.cache_dir = work / "cache" / self.name
        self.log_path = work / "logs" / f"{self.name}.log"
        self.pid: int | None = None
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        owned.mountpoints.append(self.mountpoint)

    @property
    def root(self) -> Path:
        """Where the bucket's objects appear."""
        return self.mountpoint

    def mount(self, fresh: bool) -> float:
        """Mount (after emptying the cache when `fresh`); returns seconds until it was ready."""
        if mount_type(self.mountpoint) is not None:
            raise BenchError(f"{self.mountpoint} is still mounted")
        if fresh:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        import time

        started = time.perf_counter()
        self._start()
        seconds = time.perf_counter() - started
        raise_readahead(self.mountpoint)
        return seconds

    def _start(self) -> None:
        raise NotImplementedError

    def _wait_mounted(self, process: subprocess.Popen[bytes]) -> None:
        def ready() -> bool:
            if process.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {process.returncode} before mounting; "
                    f"see {self.log_path}"
                )
            return mount_type(self.mountpoint) == self.fstype

        if not wait_for(ready, 60):
            raise BenchError(f"{self.name} did not mount within 60 s; see {self.log_path}")

    def unmount(self) -> None:
        if mount_type(self.mountpoint) is not None and not fusermount_unmount(self.mountpoint):
            fusermount_unmount(self.mountpoint, lazy=True)
        pid = self.pid
        self.pid = None
        if pid is not None:
            # The daemons exit once unmounted; stop the one that does not.
            if not wait_for(lambda: not pid_alive(pid), 20):
                self.owned.stop(pid)
            else:
                self.owned.stop(pid, timeout=1)  # reaps a Popen child
        if mount_type(self.mountpoint) is not None:
            raise BenchError(f"cannot unmount {self.mountpoint}")


class Artifactfs(FuseSystem):
    name = "artifactfs"
    fstype = "fuse.artifactfs"

    def __init__(
        self,
        owned: Owned,
        work: Path,
        server: S3Server,
        env: dict[str, str],
        store: str,
        run_id: str,
        field: str,
        name: str = "artifactfs",
    ) -> None:
        self.name = name
        super().__init__(owned, work, server, env)
        self.store = store
        self.run_id = run_id
        self.field = field

    def _start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "artifactfs",
            "--store",
            self.store,
            "mount",
            str(self.mountpoint),
            "--run",
            self.run_id,
            "--field",
            self.field,
            "--cache-dir",
            str(self.cache_dir),
            "--cache-size",
            CACHE_SIZE,
            "--log-file",
            str(self.log_path),
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, env=self.env, timeout=180
            )
        except subprocess.TimeoutExpired:
            raise BenchError("artifactfs mount did not return within 180 s") from None
        match = re.search(r"daemon pid (\d+)", result.stdout)
        if match:
            self.pid = int(match.group(1))
            self.owned.pids.add(self.pid)
        if result.returncode != 0 or not match:
            raise BenchError(f"artifactfs mount failed: {result.stdout} {result.stderr}".strip())


class Rclone(FuseSystem):
    name = "rclone"
    fstype = "fuse.rclone"

    def _start(self) -> None:
        prefix = "RCLONE_CONFIG_BENCHS3_"
        env = dict(self.env)
        env.update(
            {
                prefix + "TYPE": "s3",
                prefix + "PROVIDER": "Rclone",
                prefix + "ENDPOINT": self.server.endpoint,
                prefix + "ACCESS_KEY_ID": ACCESS_KEY,
                prefix + "SECRET_ACCESS_KEY": SECRET_KEY,
                prefix + "FORCE_PATH_STYLE": "true",
            }
        )
        command = [
            find_rclone(),
            "mount",
            f"benchs3:{BUCKET}",
            str(self.mountpoint),
            "--read-only",
            "--vfs-cache-mode",
            "full",
            "--cache-dir",
            str(self.cache_dir),
            "--vfs-cache-max-size",
            CACHE_SIZE,
            "--dir-cache-time",
            "1h",
            "--attr-timeout",
            "1h",
            "--vfs-read-chunk-size",
            "16M",
            "--vfs-read-chunk-streams",
            "4",
            "--buffer-size",
            "32M",
            "--vfs-read-ahead",
            "256M",
            "--max-read-ahead",
            "1M",
            "--vfs-fast-fingerprint",
            "--no-checksum",
            "--no-modtime",
            "--s3-no-head-object",
            "--transfers",
            "8",
            "--checkers",
            "16",
        ]
        process = self.owned.popen(command, self.log_path, env=env)
        self.pid = process.pid
        self._wait_mounted(process)


class S3fs(FuseSystem):
    name = "s3fs"
    fstype = "fuse.s3fs"

    def _start(self) -> None:
        passwd = self.cache_dir.parent / "s3fs-passwd"
        passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        passwd.chmod(0o600)
        options = [
            "ro",
            f"url={self.server.endpoint}",
            "use_path_request_style",
            "endpoint=us-east-1",
            f"passwd_file={passwd}",
            "kernel_cache",
            f"use_cache={self.cache_dir}",
            "ensure_diskfree=1024",
            "parallel_count=8",
            "multipart_size=8",
            "max_stat_cache_size=200000",
            "stat_cache_expire=3600",
            "enable_noobj_cache",
            "connect_timeout=10",
            "readwrite_timeout=30",
        ]
        s3fs = shutil.which("s3fs")
        if s3fs is None:
            raise BenchError("s3fs not installed: apt-get install -y s3fs")
        command = [s3fs, BUCKET, str(self.mountpoint), "-f", "-o", ",".join(options)]
        process = self.owned.popen(command, self.log_path, env=self.env)
        self.pid = process.pid
        self._wait_mounted(process)


class Pyfuse3Floor(FuseSystem):
    name = "pyfuse3"
    fstype = "fuse.pyfuse3floor"

    def _start(self) -> None:
        command = [
            sys.executable,
            str(Path(__file__).with_name("floor_fs.py")),
            str(self.server.bucket_dir),
            str(self.mountpoint),
        ]
        process = self.owned.popen(command, self.log_path, env=self.env)
        self.pid = process.pid
        self._wait_mounted(process)
