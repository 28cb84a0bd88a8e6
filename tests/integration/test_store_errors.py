"""A store that cannot be used as it is: one line naming the store and the reason, exit 2, and
the file or database exactly as it was (never "repaired", never another application's changed).
Real SQLite files, and the suite's real PostgreSQL server."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

import artifactfs
from artifactfs.errors import NotFoundError
from artifactfs.fs.daemon import is_mounted
from artifactfs.store import Store, resolve_store_uri
from tests.conftest import make_tree

DATA = {"a.csv": b"a\n", "sub/b.csv": b"bb\n"}
MAX_RUN_NUMBER = 2**31 - 1  # PostgreSQL's INTEGER: the largest run number either backend takes


def assert_one_line_error(result, *words: str) -> str:
    """Exit 2, nothing on stdout, one `artifactfs: error:` line containing every word."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("artifactfs: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def make_store(cli, path: Path, data: Path) -> None:
    """A real store at `path` holding run P-1 (field f), checkpointed: its file is complete."""
    cli("--store", str(path), "--project", "p", "track", "f", str(data), check=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def sqlite_edit(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    with conn:
        for statement in statements:
            conn.execute(statement)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", DATA)


# -- files that are not a usable store ----------------------------------------------------------


def test_a_store_path_below_a_file_is_refused_in_one_line(cli, tmp_path: Path, data: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_bytes(b"not a directory\n")
    store = blocker / "x.db"
    result = cli("--store", str(store), "--project", "p", "track", "f", str(data))
    assert_one_line_error(result, str(store), f"{blocker} is not a directory")
    result = cli("--store", str(store), "runs")  # only reads: there is no store to read
    assert_one_line_error(result, f"no store at {store}")
    assert blocker.read_bytes() == b"not a directory\n"


def test_commands_that_only_read_make_no_store(cli, tmp_path: Path, data: Path) -> None:
    """A mistyped --store made an empty store file, and its directories, on any command."""
    store = tmp_path / "typo" / "sub" / "new.db"
    mount_point = tmp_path / "mnt"
    reading = [
        ("runs",),
        ("hash", "P-1", "f"),
        ("files", "P-1", "f"),
        ("verify", "P-1"),
        ("diff", "P-1", "P-2", "f"),
        ("download", "P-1", "f", str(tmp_path / "out")),
        ("track", "--run", "P-1", "f", str(data)),  # into a run, which must be there
        ("mount", str(mount_point), "--run", "P-1", "--cache-dir", str(tmp_path / "cache")),
    ]
    mount_point.mkdir()
    for args in reading:
        result = cli("--store", str(store), *args)
        assert_one_line_error(result, f"no store at {store}: nothing was tracked into it yet")
    as_uri = cli("--store", f"sqlite:///file:{store}?uri=true", "runs")
    assert_one_line_error(as_uri, f"no store at {store}: nothing was tracked into it yet")
    assert not is_mounted(str(mount_point))
    (tmp_path / "export").mkdir()
    dry = cli("--store", str(store), "import-neptune", "--dry-run", str(tmp_path / "export"))
    assert dry.returncode == 2 and "no files_list.json" in dry.stderr, dry  # read, as if empty
    assert not (tmp_path / "typo").exists()
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotFoundError, match="no store at"):
        artifactfs.init_run("P-1", mode="read-only", store=str(store))
    assert not (tmp_path / "typo").exists()
    # What records makes it.
    assert cli("--store", str(store), "--project", "p", "track", "f", str(data)).returncode == 0
    assert cli("--store", str(store), "hash", "P-1", "f").returncode == 0


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file::memory:?uri=true",
        "sqlite:///file:mem?mode=memory&uri=true",
    ],
)
def test_an_in_memory_store_is_refused_in_one_line(
    cli, tmp_path: Path, data: Path, uri: str
) -> None:
    """It tracked "into" a store that was gone when the command ended: `runs` then showed
    nothing. Nothing would ever be kept there."""
    here = tmp_path / "here"
    here.mkdir()
    result = cli("--store", uri, "--project", "p", "track", "f", str(data), cwd=here)
    assert_one_line_error(result, f"store {uri!r} is in memory and would keep nothing")
    assert list(here.iterdir()) == []


BAD_FILES = {
    # name: (how to spoil a real store's file, words the error must contain)
    "not sqlite": (lambda body: b"# a README, not a database\n" * 200, "file is not a database"),
    "truncated": (lambda body: body[:2000], "database disk image is malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_file_that_is_not_a_usable_sqlite_store_is_refused_unchanged(
    cli, tmp_path: Path, data: Path, case: str
) -> None:
    spoil, words = BAD_FILES[case]
    good = tmp_path / "good.db"
    make_store(cli, good, data)
    bad = tmp_path / "bad.db"
    bad.write_bytes(spoil(good.read_bytes()))
    before = bad.read_bytes()
    for args in (("runs",), ("--project", "p", "track", "f", str(data)), ("hash", "P-1", "f")):
        result = cli("--store", str(bad), *args)
        assert_one_line_error(result, str(bad), words)
    assert bad.read_bytes() == before


# -- stores of another version, a pre-release layout, another application: both backends --------


def engine_for(uri: str):  # type: ignore[no-untyped-def]
    return create_engine(uri.replace("postgresql://", "postgresql+psycopg://", 1))


def database_snapshot(uri: str) -> dict[str, tuple[list[str], int]]:
    """Every table: its columns and its row count."""
    engine = engine_for(uri)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            return {
                name: (
                    [column["name"] for column in inspector.get_columns(name)],
                    conn.execute(select(func.count()).select_from(text(name))).scalar_one(),
                )
                for name in sorted(inspector.get_table_names())
            }
    finally:
        engine.dispose()


def run_sql(uri: str, *statements: str) -> None:
    engine = engine_for(uri)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


SPOILED = {
    # name: (SQL run on a fresh store, or on an empty database for "foreign"; error words)
    "newer version": (
        [
            "UPDATE artifactfs_meta SET value = '3' WHERE key = 'schema_version'",
            "DROP TABLE artifact_dirs",
        ],
        ["schema version 3, newer"],
    ),
    "garbage version": (
        ["UPDATE artifactfs_meta SET value = 'x1' WHERE key = 'schema_version'"],
        ["schema version 'x1'", "damaged"],
    ),
    "no version": (
        ["DELETE FROM artifactfs_meta"],
        ["no schema version"],
    ),
    "pre-release without a table": (
        ["DROP TABLE artifact_dirs"],
        ["no table artifact_dirs", "pre-release"],
    ),
    "another application": (
        [
            "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO users VALUES (1, 'a')",
        ],
        ["not an artifactfs store", "users"],
    ),
}


@pytest.mark.store_backends
@pytest.mark.parametrize("case", sorted(SPOILED))
def test_a_store_artifactfs_cannot_use_is_refused_and_left_table_for_table_unchanged(
    cli, tmp_path: Path, data: Path, case: str, store_backend: str
) -> None:
    if case == "another application" and store_backend == "postgresql":
        pytest.skip("a PostgreSQL database may be shared: test_a_shared_postgresql_database_...")
    statements, words = SPOILED[case]
    uri = resolve_store_uri(None)  # this test's store: a file, or a fresh PostgreSQL database
    path = Path(uri.removeprefix("sqlite:///")) if store_backend == "sqlite" else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if case != "another application":
        Store().close()
    run_sql(uri, *statements)
    if path is not None:
        sqlite_edit(path)  # checkpointed: the file holds everything
    before = database_snapshot(uri)
    bytes_before = path.read_bytes() if path is not None else b""

    for args in (("runs",), ("--project", "p", "track", "f", str(data)), ("hash", "P-1", "f")):
        result = cli(*args)
        assert_one_line_error(result, *words)
        assert "store " in result.stderr

    assert database_snapshot(uri) == before
    if path is not None:
        assert path.read_bytes() == bytes_before


def test_a_store_taken_out_of_wal_mode_is_put_back(cli, tmp_path: Path, data: Path) -> None:
    """In WAL mode readers never wait for a writer: a store copied or restored without it
    gets it back when artifactfs opens it (where the file may be written)."""
    path = tmp_path / "store.db"
    make_store(cli, path, data)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    conn.close()
    Store(str(path)).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_shared_postgresql_database_gets_artifactfs_tables_beside_its_own(
    cli, postgres: Any, data: Path
) -> None:
    """A team may point artifactfs at a database other applications use too: its tables go
    beside theirs, which are left exactly as they were."""
    uri = postgres.uri(postgres.create_database())
    run_sql(uri, *SPOILED["another application"][0])
    users_before = database_snapshot(uri)["users"]
    tracked = cli("--store", uri, "--project", "p", "track", "f", str(data))
    assert tracked.returncode == 0, tracked.stderr
    after = database_snapshot(uri)
    assert after["users"] == users_before
    assert "artifactfs_meta" in after and after["runs"][1] == 1


# -- read-only stores ----------------------------------------------------------------------------


def unprivileged(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`artifactfs ARGS` where file modes apply: as root, without CAP_DAC_OVERRIDE."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "artifactfs", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths to make read-only (chmod a-w) for the test; their modes restored afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.chmod(path.stat().st_mode | 0o200)


def test_writing_to_a_read_only_store_says_so_in_one_line_and_changes_nothing(
    tmp_path: Path, data: Path, cli, read_only: list[Path]
) -> None:
    store = tmp_path / "store.db"
    make_store(cli, store, data)
    store.chmod(0o444)
    read_only.append(store)
    before = store.read_bytes()
    listing = unprivileged("--store", str(store), "runs")
    assert listing.returncode == 0, listing.stderr  # reading a read-only store works
    assert "P-1" in listing.stdout
    for args in (
        ("--project", "p", "track", "g", str(data)),  # a new run
        ("--project", "q", "track", "g", str(data)),  # a new project
        ("track", "--run", "P-1", "g", str(data)),  # a new field
    ):
        result = unprivileged("--store", str(store), *args)
        assert_one_line_error(result, str(store), "is read-only")
    assert store.read_bytes() == before
    assert unprivileged("--store", str(store), "runs").stdout == listing.stdout


def test_a_new_run_whose_field_cannot_be_written_is_not_made(
    tmp_path: Path, data: Path, cli
) -> None:
    """`track` without --run made the run, then wrote its field in another transaction: a
    process killed (or a write failing) between the two left a run with no field, which
    `verify` called OK and which took a run number."""
    store = tmp_path / "store.db"
    make_store(cli, store, data)
    listing = cli("--store", str(store), "runs", check=True).stdout
    # The store takes runs, but not fields: as a disk filling up at that moment would.
    refuse = "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    sqlite_edit(store, f"CREATE TRIGGER no_fields BEFORE INSERT ON fields {refuse}")
    result = cli("--store", str(store), "--project", "p", "track", "g", str(data))
    assert_one_line_error(result, "disk full")
    assert cli("--store", str(store), "runs", check=True).stdout == listing
    sqlite_edit(store, "DROP TRIGGER no_fields")
    made = cli("--store", str(store), "--project", "p", "track", "g", str(data), check=True)
    assert made.stdout.splitlines()[-1] == "P-2"  # the failed one took no run number


def test_a_store_opened_read_only_by_uri_says_so_and_leaves_no_stray_directories(
    tmp_path: Path, data: Path, cli
) -> None:
    store = tmp_path / "store.db"
    make_store(cli, store, data)
    before = store.read_bytes()
    uri = f"sqlite:///file:{store}?mode=ro&uri=true"
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    listing = cli("--store", uri, "runs", cwd=cwd)
    assert listing.returncode == 0, listing.stderr
    assert "P-1" in listing.stdout
    result = cli("--store", uri, "track", "--run", "P-1", "g", str(data), cwd=cwd)
    assert_one_line_error(result, "is read-only")

    assert list(cwd.iterdir()) == []  # no ./file:/... directories
    assert store.read_bytes() == before


def test_a_rollback_journal_store_in_a_read_only_directory_can_be_read(
    tmp_path: Path, data: Path, cli, read_only: list[Path]
) -> None:
    """Opening a store writes nothing: no journal-mode switch, no write transaction."""
    directory = tmp_path / "shared"
    directory.mkdir()
    store = directory / "store.db"
    make_store(cli, store, data)
    sqlite_edit(store, "PRAGMA journal_mode = DELETE")
    before = store.read_bytes()
    store.chmod(0o444)
    directory.chmod(0o555)
    read_only += [directory, store]

    listing = unprivileged("--store", str(store), "runs")
    assert listing.returncode == 0, listing.stderr
    assert "P-1" in listing.stdout
    assert unprivileged("--store", str(store), "hash", "P-1", "f").returncode == 0
    result = unprivileged("--store", str(store), "track", "--run", "P-1", "g", str(data))
    assert_one_line_error(result, str(store), "read-only")
    assert store.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["store.db"]


def test_a_wal_store_in_a_read_only_directory_is_refused_in_one_line_naming_the_directory(
    tmp_path: Path, data: Path, cli, read_only: list[Path]
) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    store = directory / "store.db"
    make_store(cli, store, data)
    directory.chmod(0o555)
    read_only.append(directory)
    result = unprivileged("--store", str(store), "runs")
    assert_one_line_error(result, str(store), "directory this user cannot write")


# -- readers and writers --------------------------------------------------------------------------

HOLD_WRITE_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(600)
"""


def test_read_commands_do_not_wait_for_a_writer(cli, tmp_path: Path, data: Path) -> None:
    """`track` holds the write lock while it inserts a large artifact: `hash`, `runs` and
    `files` answer at once meanwhile, instead of after the 120 s busy timeout."""
    store = tmp_path / "store.db"
    make_store(cli, store, data)
    expected = cli("--store", str(store), "hash", "P-1", "f", check=True).stdout
    writer = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK, str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "locked\n"
        for args in (("hash", "P-1", "f"), ("runs",), ("files", "P-1", "f", "--json")):
            started = time.monotonic()
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "artifactfs", "--store", str(store), *args],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            except subprocess.TimeoutExpired:
                pytest.fail(f"artifactfs {' '.join(args)} waited for the writer for 30 s")
            assert result.returncode == 0, result.stderr
            assert time.monotonic() - started < 15
        assert result.stdout and json.loads(result.stdout)
        hashed = cli("--store", str(store), "hash", "P-1", "f")
        assert hashed.stdout == expected
    finally:
        writer.kill()
        writer.wait()


HOLD_WRITE_LOCK_FOR = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_a_write_that_waits_for_another_writer_says_so_then_goes_on(
    cli, tmp_path: Path, data: Path
) -> None:
    """`track` waited up to two minutes for another process's write lock in silence."""
    store = tmp_path / "store.db"
    make_store(cli, store, data)
    writer = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITE_LOCK_FOR, str(store), "4.5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "locked\n"
        tracked = cli("--store", str(store), "--project", "p", "track", "g", str(data))
    finally:
        writer.kill()
        writer.wait()
    assert tracked.returncode == 0, tracked
    assert tracked.last_line == "P-2"
    assert tracked.stderr.splitlines() == [
        f"artifactfs: warning: store sqlite:///{store} is locked by another writer (a process "
        "or thread): waiting for it (up to 120 s)"
    ], tracked.stderr


# -- limits both backends enforce alike -----------------------------------------------------------


@pytest.mark.store_backends
def test_a_field_path_over_1024_characters_is_refused_alike_on_both_backends(
    cli, data: Path
) -> None:
    part = "f" * 200
    too_long = "/".join([part] * 6)  # 1,205 characters: a valid path, too long for the column
    at_limit = "/".join(["g" * 200] * 5 + ["g" * 19])
    assert len(at_limit) == 1024
    cli("--project", "p", "track", "f", str(data), check=True)
    counts = Store().counts()

    result = cli("track", "--run", "P-1", too_long, str(data))
    assert_one_line_error(result, "1205 characters", "at most 1024 characters")
    assert Store().counts() == counts

    accepted = cli("track", "--run", "P-1", at_limit, str(data))
    assert accepted.returncode == 0, accepted.stderr
    assert cli("hash", "P-1", at_limit, check=True).stdout.strip()


def write_export(root: Path, run_id: str) -> None:
    entry = {
        "filePath": "x",
        "fileHash": "0" * 40,
        "type": "Local",
        "size": 1,
        "metadata": [{"key": "file_path", "value": "file:///x"}],
    }
    target = root / "w" / "proj" / run_id / "f" / "files_list.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([entry]))


@pytest.mark.store_backends
def test_run_numbers_beyond_32_bits_are_refused_alike_on_both_backends(
    cli, tmp_path: Path, data: Path
) -> None:
    too_big = tmp_path / "too-big"
    write_export(too_big, "ZZ-9999999999")
    Store().close()
    counts = Store().counts()
    result = cli("import-neptune", str(too_big))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result
    # The import's report: a line per failed file, then the summary.
    failed, summary = result.stderr.strip().splitlines()
    assert "ZZ-9999999999" in failed and f"run numbers go up to {MAX_RUN_NUMBER}" in failed
    assert summary == "artifactfs: error: 0 field(s) imported, 0 unchanged, 0 skipped, 1 failed"
    assert Store().counts() == counts

    # The largest number is imported; the project then has no next number, and says so.
    at_limit = tmp_path / "at-limit"
    write_export(at_limit, f"ZZ-{MAX_RUN_NUMBER}")
    imported = cli("import-neptune", str(at_limit))
    assert imported.returncode == 0, imported
    counts = Store().counts()
    refused = cli("--project", "w/proj", "track", "f", str(data))
    assert_one_line_error(refused, "w/proj", "used every run number")
    assert Store().counts() == counts
    assert cli("hash", f"ZZ-{MAX_RUN_NUMBER}", "f").returncode == 0


def test_a_tree_lookup_or_listing_the_database_refuses_is_one_line_naming_the_store(
    cli, tmp_path: Path, data: Path
) -> None:
    """The mount's lookups and listings run on the driver's own cursor: its errors are said
    as every other read's are (the mount answers them with EIO and logs the line)."""
    path = tmp_path / "store.db"
    make_store(cli, path, data)
    store = Store(str(path), create=False)
    try:
        artifact_id = store.field_artifact(store.get_run("P-1"), "f").id
        assert store.artifact_lookup(artifact_id, "sub", "b.csv")[0] is not None
        assert store.artifact_children(artifact_id, "") == (["sub"], store.entries(artifact_id)[:1])
        sqlite_edit(path, "DROP TABLE artifact_dirs")  # behind the open store's back
        for call in (
            lambda: store.artifact_lookup(artifact_id, "sub", "b.csv"),
            lambda: store.artifact_children(artifact_id, ""),
        ):
            with pytest.raises(artifactfs.ArtifactfsError) as refused:
                call()
            expected = f"cannot read store {store.uri}: no such table: artifact_dirs"
            assert str(refused.value) == expected
        # A connection that cannot be made (the pool's checkout raises the driver's errors).
        store.engine.dispose()
        path.unlink()
        path.mkdir()
        with pytest.raises(artifactfs.ArtifactfsError) as unopened:
            store.artifact_lookup(artifact_id, "sub", "b.csv")
        expected = f"cannot read store {store.uri}: unable to open database file"
        assert str(unopened.value) == expected
    finally:
        store.close()
