"""Custom run ids (Neptune's `init_run(custom_run_id=...)`): every process of a distributed job
that passes the same id gets the same run, created once. And the schema upgrade that brought
their table: version-1 stores keep working, upgraded where they may be written, read as they
are where they may not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from artifactfs.entries import ArtifactFileData
from artifactfs.errors import ArtifactfsError
from artifactfs.naming import ProjectName, derive_project_key, parse_project
from artifactfs.store import Store, resolve_store_uri
from tests.conftest import make_tree
from tests.integration.test_store_errors import (
    database_snapshot,
    engine_for,
    make_store,
    run_sql,
    sqlite_edit,
)
from tests.support.concurrent import processes_at_once
from tests.support.mounts import mounted
from tests.support.postgres import PostgresServer

PROJECT = ProjectName("ml", "job")
KEY = derive_project_key("job")
SEEDED = parse_project("p")  # the project `make_store` and `seed` track into: run P-1
ENTRY = ArtifactFileData("a.txt", "0" * 40, "Local", 1, {"file_path": "file:///a.txt"})
PROCESSES = 8
ROUNDS = 10


def one_line(exc: pytest.ExceptionInfo[ArtifactfsError], *words: str) -> str:
    message = str(exc.value)
    assert message and "\n" not in message, repr(message)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def schema_version_of(uri: str) -> str:
    engine = engine_for(uri)
    try:
        with engine.connect() as conn:
            query = "SELECT value FROM artifactfs_meta WHERE key = 'schema_version'"
            return str(conn.execute(text(query)).scalar_one())
    finally:
        engine.dispose()


def make_version_1(uri: str) -> None:
    """A store as artifactfs wrote it before custom run ids: no table for them, version 1."""
    run_sql(
        uri,
        "DROP TABLE custom_run_ids",
        "UPDATE artifactfs_meta SET value = '1' WHERE key = 'schema_version'",
    )
    if uri.startswith("sqlite:///"):
        sqlite_edit(Path(uri.removeprefix("sqlite:///")))  # checkpointed: the file is complete


def seed(cli: Any, data: Path) -> None:
    """The test's store (SQLite file or PostgreSQL database) with run P-1, field f."""
    cli("--project", "p", "track", "f", str(data), check=True)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {"a.csv": b"a\n", "sub/b.csv": b"bb\n"})


# -- get or create ----------------------------------------------------------------------------


@pytest.mark.store_backends
def test_a_custom_id_gets_its_run_created_once_then_found() -> None:
    store, other = Store(), Store()  # two pools on one store, as two processes would have
    try:
        first = store.run_for_custom_id(PROJECT, "job-42")
        assert (first.run_id, first.project) == (f"{KEY}-1", PROJECT)
        again = other.run_for_custom_id(PROJECT, "job-42")
        assert (again.id, again.run_id, again.created_at) == (
            first.id,
            first.run_id,
            first.created_at,
        )
        store.update_field(first, "data", lambda old: [ENTRY])
        assert other.run_for_custom_id(PROJECT, "job-42").fields == ("data",)
        # A plain new run takes the next number: finding the run took none.
        assert store.create_run(PROJECT).run_id == f"{KEY}-2"
        assert store.run_for_custom_id(PROJECT, "job-42").run_id == f"{KEY}-1"
        counts = store.counts()
        assert (counts["runs"], counts["custom_run_ids"]) == (2, 1)
    finally:
        store.close()
        other.close()


@pytest.mark.store_backends
def test_different_ids_and_projects_get_different_runs() -> None:
    other_project = ProjectName("ml", "other")
    store = Store()
    try:
        asked = [
            (PROJECT, "job-42"),
            (PROJECT, "job-43"),
            (PROJECT, "JOB-42"),  # case matters, on both backends
            (PROJECT, "job-42 "),  # so do trailing spaces
            (other_project, "job-42"),  # the same id in another project
        ]
        got = [store.run_for_custom_id(project, custom_id).run_id for project, custom_id in asked]
        other_key = derive_project_key("other")
        assert got == [f"{KEY}-1", f"{KEY}-2", f"{KEY}-3", f"{KEY}-4", f"{other_key}-1"]
        assert [store.run_for_custom_id(p, c).run_id for p, c in reversed(asked)] == got[::-1]
        # A new project gets the key asked for, as with create_run.
        keyed = store.run_for_custom_id(ProjectName("ml", "keyed"), "job-42", key="KJ")
        assert keyed.run_id == "KJ-1"
        with pytest.raises(ArtifactfsError) as refused:
            store.run_for_custom_id(ProjectName("ml", "keyed"), "job-1", key="OTHER")
        one_line(refused, "already has the key 'KJ'")
        assert store.counts()["custom_run_ids"] == 6
    finally:
        store.close()


INVALID: dict[str, tuple[Any, str]] = {
    # case: (custom id, words of the error)
    "empty": ("", "empty"),
    "too long": ("x" * 37, "37 characters, at most 36"),
    "NUL": ("job\0" + "42", "NUL"),
    "not Unicode text": ("job-\ud800", "not valid Unicode"),
    "not a string": (42, "a string is needed, not int"),
}


@pytest.mark.store_backends
def test_invalid_custom_ids_are_refused_in_one_line_and_nothing_is_written() -> None:
    store = Store()
    try:
        before = store.counts()
        for case, (custom_id, words) in INVALID.items():
            with pytest.raises(ArtifactfsError) as refused:
                store.run_for_custom_id(PROJECT, custom_id)
            message = one_line(refused, "invalid custom run id", words)
            assert "\0" not in message, case
            assert store.counts() == before, case
        assert store.list_projects() == []  # not even the project
        # The limits are characters, alike on both backends: 36 of them, of any width.
        for custom_id in ("x" * 36, "é" * 36, "日本" * 18):
            assert store.run_for_custom_id(PROJECT, custom_id).project == PROJECT
        assert store.counts()["custom_run_ids"] == 3
    finally:
        store.close()


# -- many processes at once -------------------------------------------------------------------

# Imported before the start: importing takes longer than the work, and would spread it out.
PRELUDE = """
import sys
from artifactfs.naming import ProjectName, parse_project
from artifactfs.store import Store, schema
"""


# Each id on its own start line: without one, the first process to create a run is ahead,
# and the others only find the runs it made.
SHARE_RUNS = PRELUDE + textwrap.dedent(
    """
    wait_for_go(0)
    store = Store(sys.argv[1])  # a store no one has made yet: they race on that too
    for n in range({rounds}):
        wait_for_go(n + 1)
        run = store.run_for_custom_id(ProjectName("ml", "job"), f"job-{{n}}")
        print(f"job-{{n}}", run.run_id, flush=True)
    """
).format(rounds=ROUNDS)


def run_at_once(tmp_path: Path, script: str, barriers: int = 1) -> list[str]:
    """PROCESSES interpreters running `script STORE_URI`, released together from each start
    line: their outputs."""
    args = [resolve_store_uri(None)]
    return processes_at_once(tmp_path, script, args, PROCESSES, barriers)


@pytest.mark.store_backends
def test_processes_passing_one_custom_id_at_once_share_one_run(tmp_path: Path) -> None:
    outputs = run_at_once(tmp_path, SHARE_RUNS, barriers=ROUNDS + 1)
    # Every process got the same run for each id: job-0 is KEY-1, and so on, no gap.
    expected = [f"job-{n} {KEY}-{n + 1}" for n in range(ROUNDS)]
    for out in outputs:
        assert out.splitlines() == expected
    store = Store()
    try:
        counts = store.counts()
        assert (counts["runs"], counts["custom_run_ids"]) == (ROUNDS, ROUNDS)
        assert store.create_run(PROJECT).run_id == f"{KEY}-{ROUNDS + 1}"
    finally:
        store.close()


UPGRADE_AT_ONCE = PRELUDE + textwrap.dedent(
    """
    create_all = schema.metadata.create_all
    def creating(*args, **kwargs):  # says which process made the new table
        print("upgrading", flush=True)
        return create_all(*args, **kwargs)
    schema.metadata.create_all = creating
    wait_for_go(0)
    store = Store(sys.argv[1])
    print(store.run_for_custom_id(parse_project("p"), "job-42").run_id, flush=True)
    print(len(store.list_runs()), flush=True)
    """
)


@pytest.mark.store_backends
def test_processes_opening_a_version_1_store_at_once_upgrade_it_once(
    cli: Any, data: Path, tmp_path: Path
) -> None:
    seed(cli, data)
    uri = resolve_store_uri(None)
    make_version_1(uri)
    outputs = run_at_once(tmp_path, UPGRADE_AT_ONCE)
    lines = [out.split() for out in outputs]
    assert sum(line.count("upgrading") for line in lines) == 1, outputs
    assert sorted(line[-2:] for line in lines) == [["P-2", "2"]] * PROCESSES
    assert schema_version_of(uri) == "2"
    store = Store()
    try:
        counts = store.counts()
        assert (counts["runs"], counts["custom_run_ids"]) == (2, 1)
    finally:
        store.close()


@pytest.mark.store_backends
def test_opening_a_version_1_store_leaves_it_at_version_1(cli: Any, data: Path) -> None:
    """Only what needs the new table upgrades a store: reading (`runs`, a mount) leaves it to
    older clients, and takes no write lock."""
    seed(cli, data)
    uri = resolve_store_uri(None)
    make_version_1(uri)
    assert cli("runs").returncode == 0
    store = Store(uri)
    try:
        assert [run.run_id for run in store.list_runs()] == ["P-1"]
        assert schema_version_of(uri) == "1"
        assert store.run_for_custom_id(parse_project("p"), "job").run_id == "P-2"
        assert schema_version_of(uri) == "2"
    finally:
        store.close()


@pytest.mark.store_backends
def test_a_store_upgraded_while_another_process_checks_it_opens(
    cli: Any, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving made certain: this open has read the store's tables (version 1's),
    then another process upgrades the store, then this open reads the version. Reading both
    in one snapshot, it sees version 1 and its tables (PostgreSQL's READ COMMITTED gave a
    new snapshot per statement: "version 2 but no table custom_run_ids")."""
    seed(cli, data)
    uri = resolve_store_uri(None)
    make_version_1(uri)
    real = Store._schema_version
    others: list[Store] = []
    not_yet = [True]  # cleared before the other open, whose own check must not recurse

    def upgraded_meanwhile(self: Store, conn: Any) -> int:
        if not_yet:
            not_yet.clear()
            other = Store(uri)  # another process, which upgrades the store now
            others.append(other)
            assert other.run_for_custom_id(parse_project("p"), "first").run_id == "P-2"
        return real(self, conn)

    monkeypatch.setattr(Store, "_schema_version", upgraded_meanwhile)
    store = Store(uri)
    try:
        assert schema_version_of(uri) == "2"
        assert [run.run_id for run in store.list_runs()] == ["P-1", "P-2"]
        # Opened at version 1, it still finds the ids given since the upgrade.
        assert store.custom_run_id_of("P-2") == "first"
        assert store.run_for_custom_id(parse_project("p"), "first").run_id == "P-2"
        assert store.run_for_custom_id(parse_project("p"), "job").run_id == "P-3"
    finally:
        store.close()
        others[0].close()


def test_a_read_only_version_1_store_is_read_and_mounted_and_refuses_only_custom_ids(
    cli: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "store.db"
    make_store(cli, path, data)
    make_version_1(f"sqlite:///{path}")
    before = path.read_bytes()
    uri = f"sqlite:///file:{path}?mode=ro&uri=true"

    store = Store(uri)
    try:
        [run] = store.list_runs()
        assert (run.run_id, run.fields) == ("P-1", ("f",))
        files = store.entries(store.field_artifact(run, "f").id)
        assert [entry.file_path for entry in files] == ["a.csv", "sub/b.csv"]
        assert store.counts()["runs"] == 1  # the tables a version-1 store has
        assert store.custom_run_id_of("P-1") is None  # none before the table, and no error
        with pytest.raises(ArtifactfsError) as refused:
            store.run_for_custom_id(SEEDED, "job-42")
        one_line(refused, str(path), "read-only", "schema version 2", "version 1")
    finally:
        store.close()

    listing = cli("--store", uri, "runs")
    assert listing.returncode == 0, listing.stderr
    assert "P-1" in listing.stdout
    assert cli("--store", uri, "hash", "P-1", "f").returncode == 0
    monkeypatch.setenv("ARTIFACTFS_STORE", uri)  # the daemon's store
    mount_args = ("--run", "P-1", "--field", "f", "--cache-dir", str(tmp_path / "cache"))
    with mounted(tmp_path / "mnt", *mount_args) as mount:
        assert (mount.path / "sub" / "b.csv").read_bytes() == b"bb\n"
    assert path.read_bytes() == before
    assert schema_version_of(f"sqlite:///{path}") == "1"


READ_UNPRIVILEGED = """
import sys
from artifactfs.errors import ArtifactfsError
from artifactfs.naming import parse_project
from artifactfs.store import Store
store = Store(sys.argv[1])
print(" ".join(f"{run.run_id}:{','.join(run.fields)}" for run in store.list_runs()))
try:
    store.run_for_custom_id(parse_project("p"), "job-42")
except ArtifactfsError as exc:
    print(exc)
"""


def test_a_version_1_store_in_a_read_only_file_and_directory_is_read(
    cli: Any, data: Path, tmp_path: Path
) -> None:
    """File modes, where they apply (as root: without CAP_DAC_OVERRIDE). A rollback-journal
    store, since SQLite cannot read a WAL one in a directory it may not write."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    if os.geteuid() != 0:
        prefix = []
    directory = tmp_path / "shared"
    directory.mkdir()
    path = directory / "store.db"
    make_store(cli, path, data)
    make_version_1(f"sqlite:///{path}")
    sqlite_edit(path, "PRAGMA journal_mode = DELETE")
    before = path.read_bytes()
    path.chmod(0o444)
    directory.chmod(0o555)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-c", READ_UNPRIVILEGED, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        directory.chmod(0o755)
        path.chmod(0o644)
    assert result.returncode == 0, result.stderr
    listed, refused = result.stdout.splitlines()
    assert listed == "P-1:f"
    assert "read-only" in refused and "schema version 2" in refused, refused
    assert path.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["store.db"]


def test_a_version_1_postgresql_store_a_role_may_only_read_is_read(
    cli: Any, data: Path, postgres: PostgresServer
) -> None:
    database = postgres.create_database()
    role = f"reader_{uuid.uuid4().hex[:12]}"
    uri = postgres.uri(database)
    try:
        cli("--store", uri, "--project", "p", "track", "f", str(data), check=True)
        make_version_1(uri)
        postgres.sql(f"CREATE ROLE {role} LOGIN")
        run_sql(
            uri,
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
            f"GRANT USAGE ON SCHEMA public TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
        )
        before = database_snapshot(uri)
        store = Store(f"postgresql://{role}@127.0.0.1:{postgres.port}/{database}")
        try:
            [run] = store.list_runs()
            assert (run.run_id, run.fields) == ("P-1", ("f",))
            assert len(store.entries(store.field_artifact(run, "f").id)) == 2
            with pytest.raises(ArtifactfsError) as refused:
                store.run_for_custom_id(SEEDED, "job-42")
            one_line(refused, "permission denied", "schema version 2")
        finally:
            store.close()
        assert database_snapshot(uri) == before
        assert schema_version_of(uri) == "1"
    finally:
        postgres.drop_database(database)
        postgres.sql(f"DROP ROLE IF EXISTS {role}")
