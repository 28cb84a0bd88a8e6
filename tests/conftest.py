"""Fixtures shared by every test: an isolated home for the store and caches, the real CLI,
and real S3 / GCS servers on 127.0.0.1 started once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from artifactfs.sources import reset_sources
from tests.support.cli_launcher import Launcher, cli_launcher
from tests.support.postgres import PostgresServer, postgres_server
from tests.support.s3_helpers import RcloneBucket, new_rclone_bucket
from tests.support.servers import gcs_emulator, moto_server, rclone_s3

_CLEARED = (
    "ARTIFACTFS_STORE",
    "ARTIFACTFS_PROJECT",
    "NEPTUNE_PROJECT",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


STORE_BACKENDS = ("sqlite", "postgresql")
CLI_TIMEOUT = 300  # seconds: a command that hangs fails its test instead


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules marked `store_backends` run every test once per store backend, but for tests
    marked `backend_independent` (the backend plays no part: a refusal before the store is
    used, the FUSE layer, output formatting), which run on SQLite only."""
    if metafunc.definition.get_closest_marker("store_backends"):
        independent = metafunc.definition.get_closest_marker("backend_independent")
        backends = STORE_BACKENDS[:1] if independent else STORE_BACKENDS
        metafunc.parametrize("store_backend", backends, indirect=True, scope="function")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    store_backend: str,
    request: pytest.FixtureRequest,
) -> Iterator[Path]:
    """Store, caches and credentials of this test only. With the postgresql backend, the store
    is a fresh database on the session's PostgreSQL server (ARTIFACTFS_STORE points at it)."""
    home = tmp_path / "home"
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    database = None
    if store_backend == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        database = server.create_database()
        monkeypatch.setenv("ARTIFACTFS_STORE", server.uri(database))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    reset_sources()
    yield home
    reset_sources()
    if database is not None:
        request.getfixturevalue("postgres").drop_database(database)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        return self.stdout.strip().splitlines()[-1]


_launcher: Launcher | None = None  # set by the `cli` fixture's session-wide launcher


def run_cli(*args: str, cwd: Path | None = None, check: bool | None = None) -> CliResult:
    """The real `artifactfs` command in a child process, with this test's environment: from
    the warm launcher when there is one (tests/support/cli_launcher.py says what that keeps),
    else from a fresh interpreter."""
    if _launcher is not None and _launcher.can_run():
        code, stdout, stderr = _launcher.run(list(args), str(cwd or os.getcwd()), CLI_TIMEOUT)
        result = CliResult(code, stdout, stderr)
    else:
        process = subprocess.run(
            [sys.executable, "-m", "artifactfs", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=CLI_TIMEOUT,
        )
        result = CliResult(process.returncode, process.stdout, process.stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"artifactfs {' '.join(args)} failed: {result}")
    return result


@pytest.fixture(scope="session")
def warm_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands started from a warm launcher, unless ARTIFACTFS_TEST_FRESH_CLI=1 or the
    launcher cannot start here (then each from a fresh interpreter, with a warning)."""
    global _launcher
    with contextlib.ExitStack() as stack:
        if os.environ.get("ARTIFACTFS_TEST_FRESH_CLI") != "1":
            try:
                _launcher = stack.enter_context(cli_launcher(tmp_path_factory.mktemp("cli")))
            except RuntimeError as exc:
                warnings.warn(f"artifactfs commands start fresh: {exc}", stacklevel=1)
        try:
            yield
        finally:
            _launcher = None


@pytest.fixture
def cli(warm_cli: None) -> Any:
    return run_cli


# -- S3 -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto")) as url:
        yield url


@dataclass
class S3Bucket:
    client: Any
    name: str

    def put(self, key: str, body: bytes) -> Any:
        return self.client.put_object(Bucket=self.name, Key=key, Body=body)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket on the local S3 server, with the environment pointed at it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reset_sources()
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(client, name)


@dataclass
class SigningS3Server:
    """`rclone serve s3` on 127.0.0.1: unlike moto, it checks every request's SigV4 signature.
    Buckets are the top-level directories of `root`; `log` has a line for every request."""

    url: str
    root: Path
    log: Path
    access_key: str
    secret_key: str


@pytest.fixture(scope="session")
def rclone_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningS3Server]:
    root = tmp_path_factory.mktemp("rclone-data")
    log = tmp_path_factory.mktemp("rclone") / "rclone_s3.log"
    access_key, secret_key = "artifactfstest", "artifactfs-test-secret"
    with rclone_s3(log, root, access_key, secret_key) as url:
        yield SigningS3Server(url, root, log, access_key, secret_key)


@pytest.fixture
def rclone(rclone_s3_server: SigningS3Server, monkeypatch: pytest.MonkeyPatch) -> RcloneBucket:
    """A fresh bucket on `rclone serve s3`, with the environment pointed at it."""
    return new_rclone_bucket(rclone_s3_server, monkeypatch)


# -- GCS ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gcs_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as url:
        yield url


@dataclass
class GCSBucket:
    client: Any
    name: str

    def put(self, name: str, body: bytes) -> Any:
        blob = self.client.bucket(self.name).blob(name)
        blob.upload_from_string(body)
        blob.reload()
        return blob

    def url(self, name: str = "") -> str:
        return f"gs://{self.name}/{name}"


@pytest.fixture
def gcs(gcs_host: str, monkeypatch: pytest.MonkeyPatch) -> GCSBucket:
    """A fresh bucket on the GCS emulator, with STORAGE_EMULATOR_HOST pointed at it."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_host)
    reset_sources()
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return GCSBucket(client, name)


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return root


@pytest.fixture
def store_uri(isolated_home: Path) -> str:
    return str(isolated_home / ".local" / "share" / "artifactfs" / "store.db")


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No mount may outlive the suite: fail the run if one does (and clean it up)."""
    from tests.support.mounts import artifactfs_mounts, force_unmount

    # Only this session's mounts: other pytest sessions may be running on this machine.
    base = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    # Below base itself: `.../pytest-83` is no prefix of another session's `.../pytest-830`.
    left = [path for path in artifactfs_mounts() if Path(path).is_relative_to(base)]
    for path in left:
        force_unmount(Path(path), None)
    if left:
        print(f"\nmounts left behind by the tests: {left}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
