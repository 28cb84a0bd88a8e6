"""A real PostgreSQL server for tests: initdb into a temporary directory, started on a free
port of 127.0.0.1, stopped (fast) at the end. Runs as the `postgres` system user, since the
server refuses to run as root."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import free_port

SYSTEM_USER = "postgres"


def _bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    found = candidates[0] if candidates else shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run scripts/setup.sh --test")
    return found


def _as_postgres(*command: str) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", SYSTEM_USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    log_file: Path

    @property
    def base_uri(self) -> str:
        return f"postgresql://postgres:test-password@127.0.0.1:{self.port}"

    def uri(self, database: str) -> str:
        return f"{self.base_uri}/{database}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.sql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def sql(self, statement: str) -> None:
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-c", statement],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql {statement!r}: {result.stderr}")

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir.parent} -c fsync=off"
        started = _as_postgres(
            _bin("pg_ctl"), "-D", str(self.data_dir), "-o", options, "-l", str(self.log_file),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr} {self.log()}")

    def stop(self) -> None:
        _as_postgres(_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh cluster in its own temporary directory (outside pytest's, which is private to
    root), removed at the end."""
    directory = Path(tempfile.mkdtemp(prefix="artifactfs-test-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, SYSTEM_USER)
        server = PostgresServer(directory / "data", free_port(), directory / "server.log")
        created = _as_postgres(
            _bin("initdb"), "-D", str(server.data_dir), "-A", "trust", "-U", "postgres",
            "--no-sync",
        )  # fmt: skip
        if created.returncode != 0:
            raise RuntimeError(f"initdb failed: {created.stderr}")
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
