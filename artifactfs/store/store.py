"""The metadata store: projects, runs, fields and immutable artifacts.

One code path for SQLite (the embedded default) and PostgreSQL (a team's shared store). Writes
that must not race run in one transaction each. On SQLite it starts with `BEGIN IMMEDIATE`, so
concurrent writers queue on the database lock instead of failing half-way. On PostgreSQL, run
ids come from a single `UPDATE ... RETURNING` (which locks the project row), project creation,
schema set-up and upgrade, and a custom run id's get-or-create take a transaction-scoped
advisory lock, and a field update locks its run row (`SELECT ... FOR UPDATE`), so no
read-then-write can interleave with another host's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Inspector, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError

from artifactfs.entries import ArtifactFileData, artifact_id_and_hash, format_time
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.naming import (
    MAX_RUN_NUMBER,
    ProjectName,
    derive_project_key,
    parse_run_id,
    refuse_field_namespace_conflict,
    validate_custom_run_id,
    validate_project_key,
)
from artifactfs.store import schema
from artifactfs.store.driver_query import DriverQuery
from artifactfs.store.schema import SCHEMA_VERSION
from artifactfs.store.slow_wait import said_if_slow

_INSERT_BATCH = 5000
SQLITE_BUSY_SECONDS = 120  # how long a write waits for another process's before it fails

_e, _d = schema.artifact_entries, schema.artifact_dirs
# What an ArtifactFileData is made of (`_entry_from_row`), in this order.
_ENTRY_COLUMNS = (_e.c.file_path, _e.c.file_hash, _e.c.type, _e.c.size, _e.c.metadata_json)
# The mount's per-name lookup and per-directory listing (see driver_query).
_LOOKUP_ENTRY = DriverQuery(
    select(*_ENTRY_COLUMNS).where(
        _e.c.artifact_id == bindparam("artifact_id"),
        _e.c.parent == bindparam("parent"),
        _e.c.name == bindparam("name"),
    )
)
_LOOKUP_DIR = DriverQuery(
    select(_d.c.path).where(
        _d.c.artifact_id == bindparam("artifact_id"),
        _d.c.parent == bindparam("parent"),
        _d.c.name == bindparam("name"),
    )
)
_LIST_DIRS = DriverQuery(
    select(_d.c.path)
    .where(_d.c.artifact_id == bindparam("artifact_id"), _d.c.parent == bindparam("parent"))
    .order_by(_d.c.name)
)
_LIST_ENTRIES = DriverQuery(
    select(*_ENTRY_COLUMNS)
    .where(_e.c.artifact_id == bindparam("artifact_id"), _e.c.parent == bindparam("parent"))
    .order_by(_e.c.name)
)
_METADATA_JSON = json.JSONEncoder(sort_keys=True)  # one encoder: json.dumps makes one per call


def default_store_path() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(data_home) / "artifactfs" / "store.db"


def resolve_store_uri(store: str | None) -> str:
    """`--store` / ARTIFACTFS_STORE as a SQLAlchemy URL; a plain path means an SQLite file."""
    store = store or os.environ.get("ARTIFACTFS_STORE") or str(default_store_path())
    if "://" in store:
        return store
    return "sqlite:///" + os.path.abspath(os.path.expanduser(store))


def _redact(uri: str) -> str:
    """The URI without its password, for messages and logs."""
    try:
        url = make_url(uri)
    except ArgumentError:
        return uri
    # libpq takes a password as a query parameter too (`?password=...`).
    hidden = {key: "***" for key in url.query if key.lower() == "password"}
    if url.password is None and not hidden:
        return uri  # rendering quotes other characters (`:memory:`): only to hide one
    rendered = url.update_query_dict(hidden).render_as_string(hide_password=True)
    return rendered.replace("=%2A%2A%2A", "=***")  # as the hidden user password shows


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory lock number for a name."""
    digest = hashlib.blake2b(f"artifactfs:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def now_text() -> str:
    return format_time(datetime.now(timezone.utc))


@dataclass(frozen=True)
class ProjectRecord:
    id: int
    project: ProjectName
    key: str


@dataclass(frozen=True)
class RunRecord:
    id: int
    run_id: str
    project: ProjectName
    created_at: str
    fields: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ArtifactRecord:
    id: str  # the store's key: content and metadata
    hash: str  # Neptune's artifact hash: content only
    file_count: int
    total_size: int
    created_at: str = ""  # when it was first stored ("" on a record not read back)


class FieldArtifact(NamedTuple):
    """What a run's field points at: the artifact, and when that artifact was first stored."""

    artifact_id: str
    created_at: str


def _select_artifact() -> Select[Any]:
    """The columns of an `ArtifactRecord`, to select (`_artifact_record` reads the row)."""
    a = schema.artifacts
    return select(a.c.id, a.c.hash, a.c.file_count, a.c.total_size, a.c.created_at)


def _artifact_record(row: Any) -> ArtifactRecord:
    return ArtifactRecord(row.id, row.hash, row.file_count, row.total_size, row.created_at)


def _split_parent(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


class Store:
    """A connection pool on one store database, with the queries artifactfs needs."""

    def __init__(self, uri: str | None = None, create: bool = True) -> None:
        """Open the store at `uri`; an SQLite file that does not exist is made, unless not
        `create` (for commands that only read: a mistyped path must not leave a store, and
        directories, behind)."""
        real_uri = resolve_store_uri(uri)
        self.uri = _redact(real_uri)  # for messages and logs: never the password
        self.engine = self._make_engine(real_uri, create)
        self._version: int  # the store's schema version: older than ours until it is upgraded
        try:
            self._ensure_schema()
        except BaseException:  # a refused store: no pooled connection stays open on it
            self.engine.dispose()
            raise

    # -- set-up -----------------------------------------------------------------------------

    @staticmethod
    def _make_engine(uri: str, create: bool) -> Engine:
        try:
            url = make_url(uri)
        except ArgumentError:
            raise ArtifactfsError(f"invalid store URI {_redact(uri)!r}") from None
        backend = url.get_backend_name()
        if backend == "postgresql":
            if url.drivername == "postgresql":
                url = url.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
            try:
                return create_engine(
                    url,
                    pool_pre_ping=True,  # a database that went away and came back: reconnect
                    # Few connections per process: a team may run a mount on every host.
                    pool_size=2,
                    max_overflow=6,
                    pool_timeout=30,
                    connect_args={"connect_timeout": 10},
                )
            except Exception as exc:  # a missing driver
                raise ArtifactfsError(f"cannot use store {_redact(uri)!r}: {exc}") from None
        if backend != "sqlite":
            raise ArtifactfsError(
                f"unsupported store {_redact(uri)!r}: use a file path, sqlite:/// or postgresql://"
            )
        database = url.database or ""
        # The file, also of an SQLite URI filename (`file:/abs/path.db?mode=ro&uri=true`).
        path = database.removeprefix("file:") if _is_sqlite_uri(url) else database
        if path in ("", ":memory:") or url.query.get("mode") == "memory":
            raise ArtifactfsError(
                f"store {_redact(uri)!r} is in memory and would keep nothing: give a file path "
                "or sqlite:////abs/path.db"
            )
        if not create and not os.path.exists(path):
            raise NotFoundError(
                f"no store at {path}: nothing was tracked into it yet "
                "(check --store or ARTIFACTFS_STORE)"
            )
        if not _is_sqlite_uri(url):
            _make_parent_directory(Path(database), uri)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transactions out of the sqlite3 module's hands so we can say BEGIN IMMEDIATE.
            # No journal_mode here: setting it writes, and this file may be read-only, or
            # another application's (WAL is set when artifactfs creates a store).
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_SECONDS * 1000}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            if mode:  # "": no transaction, for a PRAGMA that cannot run inside one
                conn.exec_driver_sql(f"BEGIN {mode}")

        return engine

    @contextmanager
    def _transaction(
        self, write: bool, lock: str | None = None, snapshot: bool = False
    ) -> Iterator[Connection]:
        """A transaction, errors untranslated. A write one on SQLite holds the database's write
        lock from its first statement; on PostgreSQL, with `lock`, it first takes that advisory
        lock. A read one never waits for a writer (SQLite in WAL mode, PostgreSQL's MVCC).
        `snapshot`: every statement sees the database as the first one did (SQLite's read
        transactions always do; PostgreSQL's READ COMMITTED takes a new snapshot each time)."""
        with self.engine.connect() as conn:
            if write:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            if snapshot and self.engine.dialect.name == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            sqlite_write = write and self.engine.dialect.name == "sqlite"
            # BEGIN IMMEDIATE, in begin(), waits here for another process's write.
            with said_if_slow(self._waiting_notice) if sqlite_write else nullcontext():
                transaction = conn.begin()
            with transaction:
                if write and lock is not None and self.engine.dialect.name == "postgresql":
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:key)"), {"key": _lock_key(lock)}
                    )
                yield conn

    @property
    def _waiting_notice(self) -> str:
        return (
            f"store {_redact(self.uri)} is locked by another writer (a process or thread): "
            f"waiting for it (up to {SQLITE_BUSY_SECONDS} s)"
        )

    @contextmanager
    def _write(self, lock: str | None = None) -> Iterator[Connection]:
        with self._translated("write to"), self._transaction(True, lock) as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._translated("read"), self._transaction(False) as conn:
            yield conn

    @contextmanager
    def _driver_cursor(self) -> Iterator[Any]:
        """A cursor of a pooled connection's driver, for `DriverQuery`s; errors as `_read`'s.

        On SQLite each statement is its own transaction, so a lookup's or a listing's two
        queries may see two states of the store: harmless, since an artifact's rows are
        written in one transaction and never changed. A PostgreSQL transaction is rolled back
        when the connection goes back to the pool; a connection the server dropped is
        invalidated first, so that the pool neither reuses it nor fails to roll it back."""
        dialect = self.engine.dialect
        driver_error = dialect.loaded_dbapi.Error
        connection = cursor = None
        try:
            # The pool's checkout (a connect, a pre-ping) raises the driver's own errors.
            connection = self.engine.raw_connection()
            cursor = connection.cursor()
            yield cursor
        except (DBAPIError, driver_error) as exc:
            failure: Any = _driver_error(exc)  # SQLAlchemy's wraps it where the pool connects
            if connection is not None and dialect.is_disconnect(
                failure, connection.dbapi_connection, cursor
            ):
                connection.invalidate(failure)
            raise _store_error(self.uri, "read", failure) from None
        finally:
            if cursor is not None:
                with suppress(driver_error):  # of a connection the server dropped
                    cursor.close()
            if connection is not None:
                connection.close()

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        """The database's errors as one line naming the store and the reason (the mount
        answers them with EIO: only NotFoundError means "no such run" there)."""
        try:
            yield
        except DBAPIError as exc:
            raise _store_error(self.uri, doing, _driver_error(exc)) from None

    def _ensure_schema(self) -> None:
        """Refuse anything but an empty database or a store of a schema version this
        artifactfs knows, and create the tables in an empty one. The check is a read: it never
        waits for a writer, and works on a store this user may only read."""
        with self._translated("open"):
            # One snapshot: a store upgraded by another process between reading its tables
            # and its version would otherwise look like a version without its tables.
            with self._transaction(write=False, snapshot=True) as conn:
                version = self._store_version(conn)
            # WAL where it can be set: on a store of ours switched out of it (a copy, a
            # restore), or one being made. Not always: a store this user may only read stays
            # as it is, and so does one another process is making at this moment (SQLite
            # answers "locked" at once there; that process sets it).
            with suppress(DBAPIError):
                self._use_wal()
            if version is None:
                version = self._create_tables()
        # An older store is used at its own version, and upgraded only by what needs the new
        # tables (`_require_upgrade`): opening stays a read (no wait for writers), a store this
        # user cannot write opens, and older clients keep the store until a feature needs it.
        self._version = version

    def _create_tables(self) -> int:
        """Make an empty database a store of this version; the version of the store found
        instead when another process made one meanwhile (possibly an older artifactfs)."""
        with self._transaction(write=True, lock="schema") as conn:
            version = self._store_version(conn)
            if version is not None:
                return version
            schema.metadata.create_all(conn, checkfirst=False)
            conn.execute(
                schema.meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
            )
            return SCHEMA_VERSION

    def _upgrade(self) -> None:
        """Bring an older store to this version: its new tables and version number in one
        write transaction, under the schema lock (on SQLite the write lock), so of several
        processes needing it at once one upgrades and the others find it done. Errors come
        untranslated (`_require_upgrade` says them in one line)."""
        with self._transaction(write=True, lock="schema") as conn:
            version = self._store_version(conn)
            if version is not None and version < SCHEMA_VERSION:
                have = set(schema.tables_of_version(version))
                new = [t for t in schema.metadata.sorted_tables if t not in have]
                # checkfirst: a table the layout check found complete stays as it is.
                schema.metadata.create_all(conn, tables=new, checkfirst=True)
                m = schema.meta
                conn.execute(
                    update(m).where(m.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
                )
        self._version = SCHEMA_VERSION

    def _require_upgrade(self, needed_for: str) -> None:
        """Upgrade a store opened at an older version now, or say in one line why not."""
        if self._version >= SCHEMA_VERSION:
            return
        try:
            self._upgrade()
        except DBAPIError as exc:
            reason = _store_error(self.uri, "upgrade", _driver_error(exc))
            raise ArtifactfsError(
                f"{reason} ({needed_for} need schema version {SCHEMA_VERSION}; this store has "
                f"version {self._version} and upgrading it writes to it)"
            ) from None

    def _store_version(self, conn: Connection) -> int | None:
        """None for an empty database (or a PostgreSQL one that others share: its tables are
        left as they are, ours go beside them), else the store's schema version. Anything
        else is refused (an SQLite file of another application, an unknown schema version, a
        pre-release layout, some of a version's tables without the rest)."""
        inspector = inspect(conn)
        names = set(inspector.get_table_names()) | set(inspector.get_view_names())
        if schema.meta.name not in names:
            ours = names & {table.name for table in schema.metadata.sorted_tables}
            shared = self.engine.dialect.name == "postgresql" and not ours
            if not names or shared:
                return None
            shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
            raise ArtifactfsError(
                f"store {self.uri} is not an artifactfs store: the database has other tables "
                f"({shown}) and no {schema.meta.name}; pass another --store"
            )
        version = self._schema_version(conn)
        problem = _layout_problem(inspector, names, version)
        if problem is not None:
            raise ArtifactfsError(
                f"store {self.uri} says schema version {version} but has {problem}: it was "
                "written by a pre-release artifactfs; move it away or pass another --store"
            )
        return version

    def _schema_version(self, conn: Connection) -> int:
        """The store's schema version, refused unless this artifactfs can use it."""
        m = schema.meta
        value = conn.execute(select(m.c.value).where(m.c.key == "schema_version")).scalar()
        text_value = str(value).strip() if value is not None else ""
        if not (text_value.isascii() and text_value.isdigit()):
            found = "no schema version" if value is None else f"schema version {value!r}"
            raise ArtifactfsError(
                f"store {self.uri} has {found} in {m.name}: it is damaged or was not made by "
                "artifactfs; pass another --store"
            )
        version = int(text_value)
        if version > SCHEMA_VERSION:
            raise ArtifactfsError(
                f"store {self.uri} has schema version {version}, newer than this artifactfs "
                f"understands ({SCHEMA_VERSION}): upgrade artifactfs"
            )
        if version < 1:  # there never was one: the first store was version 1
            raise ArtifactfsError(
                f"store {self.uri} has schema version {version}, older than this artifactfs "
                f"can use ({SCHEMA_VERSION}): move it away or pass another --store"
            )
        return version

    def _use_wal(self) -> None:
        """Put an SQLite store in WAL mode (it stays so), where readers never wait for a
        writer. Only on a file known to be a store (ours, or one being made): a write."""
        if self.engine.dialect.name != "sqlite":
            return
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_begin="")  # cannot change inside a transaction
            if conn.exec_driver_sql("PRAGMA journal_mode").scalar() != "wal":
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
            conn.commit()

    def close(self) -> None:
        self.engine.dispose()

    # -- projects and runs ------------------------------------------------------------------

    def find_project(self, project: ProjectName) -> ProjectRecord | None:
        with self._read() as conn:
            return self._find_project(conn, project)

    @staticmethod
    def _find_project(conn: Connection, project: ProjectName) -> ProjectRecord | None:
        p = schema.projects
        row = conn.execute(
            select(p.c.id, p.c.key).where(
                p.c.workspace == project.workspace, p.c.name == project.name
            )
        ).first()
        return ProjectRecord(row.id, project, row.key) if row else None

    def ensure_project(self, project: ProjectName, key: str | None = None) -> ProjectRecord:
        """The project, created with `key` (or one derived from its name) if it is new."""
        if key is not None:
            validate_project_key(key)
        with self._write(lock="projects") as conn:
            found = self._find_project(conn, project)
            if found is not None:
                if key is not None and key != found.key:
                    raise ArtifactfsError(f"project {project} already has the key {found.key!r}")
                return found
            if key is None:
                key = self._free_key(conn, derive_project_key(project.name))
            elif self._key_taken(conn, key):
                raise ArtifactfsError(f"project key {key!r} is already used by another project")
            result = conn.execute(
                schema.projects.insert().values(
                    workspace=project.workspace,
                    name=project.name,
                    key=key,
                    last_number=0,
                    created_at=now_text(),
                )
            )
            assert result.inserted_primary_key is not None
            return ProjectRecord(int(result.inserted_primary_key[0]), project, key)

    @staticmethod
    def _key_taken(conn: Connection, key: str) -> bool:
        p = schema.projects
        return conn.execute(select(p.c.id).where(p.c.key == key)).first() is not None

    def _free_key(self, conn: Connection, base: str) -> str:
        if not self._key_taken(conn, base):
            return base
        suffix = 2
        while self._key_taken(conn, f"{base}{suffix}"):
            suffix += 1
        return f"{base}{suffix}"

    def create_run(self, project: ProjectName, key: str | None = None) -> RunRecord:
        """A new run with the next number of its project: unique and gap-free under concurrency."""
        record = self.ensure_project(project, key)
        with self._write() as conn:
            return self._insert_next_run(conn, record)

    @staticmethod
    def _insert_next_run(conn: Connection, record: ProjectRecord) -> RunRecord:
        """Insert the project's next run; the number comes from one atomic UPDATE ... RETURNING
        (which also locks the project row on PostgreSQL)."""
        p = schema.projects
        number = conn.execute(
            update(p)
            .where(p.c.id == record.id, p.c.last_number < MAX_RUN_NUMBER)
            .values(last_number=p.c.last_number + 1)
            .returning(p.c.last_number)
        ).scalar_one_or_none()
        if number is None:  # the same refusal on both backends, before INTEGER overflows
            raise ArtifactfsError(f"project {record.project} has used every run number")
        run_id = f"{record.key}-{number}"
        created = now_text()
        result = conn.execute(
            schema.runs.insert().values(
                project_id=record.id, number=number, run_key=run_id, created_at=created
            )
        )
        assert result.inserted_primary_key is not None
        return RunRecord(int(result.inserted_primary_key[0]), run_id, record.project, created)

    def run_for_custom_id(
        self, project: ProjectName, custom_id: str, key: str | None = None
    ) -> RunRecord:
        """The run of `project` known by `custom_id` (Neptune's `custom_run_id`), created as
        `create_run` creates one if no run has it yet: the processes of one distributed job
        that pass the same id share one run, and exactly one is created.

        Refused in one line: an id that is not a string of 1 to 36 characters without NUL; a
        store of an older schema that cannot be upgraded (one this user may only read)."""
        validate_custom_run_id(custom_id)
        self._require_upgrade("custom run ids")
        record = self.ensure_project(project, key)  # idempotent, and atomic on its own
        # One transaction looks the id up and, if it is new, inserts the run and the id. On
        # SQLite its write lock serialises it with every other writer. On PostgreSQL the
        # advisory lock on (project, id) does, only among callers with that id: the second
        # one waits, then finds the first one's run. A lock rather than inserting and
        # retrying on the primary key's conflict: no failed statement to recover from, and a
        # caller that finds the run never takes a run number (which would leave a gap).
        with self._write(lock=f"custom-run-id:{record.id}:{custom_id}") as conn:
            found = self._run_of_custom_id(conn, record, custom_id)
            if found is not None:
                return found
            run = self._insert_next_run(conn, record)
            conn.execute(
                schema.custom_run_ids.insert().values(
                    project_id=record.id, custom_id=custom_id, run_id=run.id
                )
            )
            return run

    def _run_of_custom_id(
        self, conn: Connection, record: ProjectRecord, custom_id: str
    ) -> RunRecord | None:
        r, c = schema.runs, schema.custom_run_ids
        row = conn.execute(
            select(r.c.id, r.c.run_key, r.c.created_at)
            .join(c, c.c.run_id == r.c.id)
            .where(c.c.project_id == record.id, c.c.custom_id == custom_id)
        ).first()
        if row is None:
            return None
        names = self._field_names(conn, row.id)
        return RunRecord(row.id, row.run_key, record.project, row.created_at, names)

    def custom_run_id_of(self, run_id: str) -> str | None:
        """The custom run id the run was created for (`run_for_custom_id`), if it has one."""
        added_in = schema.ADDED_IN[schema.custom_run_ids.name]
        r, c = schema.runs, schema.custom_run_ids
        with self._read() as conn:
            # Opened older: another process may have upgraded it since (and given ids).
            if self._version < added_in and (self._store_version(conn) or 0) < added_in:
                return None
            found = conn.execute(
                select(c.c.custom_id).join(r, r.c.id == c.c.run_id).where(r.c.run_key == run_id)
            ).scalar_one_or_none()
        return None if found is None else str(found)

    def ensure_run(self, project: ProjectName, run_id: str) -> tuple[RunRecord, bool]:
        """The run `run_id` of `project`, created with exactly that id if it is new.

        For imports: the project gets the run id's key if it is new; later new runs continue
        after the highest number. Returns (run, created).
        """
        key, number = parse_run_id(run_id)
        record = self.ensure_project(project, key)
        r, p = schema.runs, schema.projects
        with self._write(lock="projects") as conn:
            row = conn.execute(
                select(r.c.id, r.c.project_id, r.c.created_at).where(r.c.run_key == run_id)
            ).first()
            if row is not None:
                if row.project_id != record.id:
                    raise ArtifactfsError(f"run {run_id} exists in another project")
                return RunRecord(row.id, run_id, project, row.created_at), False
            conn.execute(
                update(p)
                .where(p.c.id == record.id, p.c.last_number < number)
                .values(last_number=number)
            )
            created = now_text()
            result = conn.execute(
                r.insert().values(
                    project_id=record.id, number=number, run_key=run_id, created_at=created
                )
            )
            assert result.inserted_primary_key is not None
            return RunRecord(int(result.inserted_primary_key[0]), run_id, project, created), True

    def get_run(self, run_id: str) -> RunRecord:
        parse_run_id(run_id)
        r, p = schema.runs, schema.projects
        with self._read() as conn:
            row = conn.execute(
                select(r.c.id, r.c.run_key, r.c.created_at, p.c.workspace, p.c.name)
                .join(p, p.c.id == r.c.project_id)
                .where(r.c.run_key == run_id.strip())
            ).first()
            if row is None:
                raise NotFoundError(f"no run {run_id.strip()!r} in store {self.uri}")
            names = self._field_names(conn, row.id)
        return RunRecord(
            row.id, row.run_key, ProjectName(row.workspace, row.name), row.created_at, names
        )

    def list_runs(self, project: ProjectName | None = None) -> list[RunRecord]:
        r, p, f = schema.runs, schema.projects, schema.fields
        query = (
            select(r.c.id, r.c.run_key, r.c.created_at, p.c.workspace, p.c.name)
            .join(p, p.c.id == r.c.project_id)
            .order_by(p.c.workspace, p.c.name, r.c.number)
        )
        if project is not None:
            query = query.where(p.c.workspace == project.workspace, p.c.name == project.name)
        fields_query = select(f.c.run_id, f.c.path).order_by(f.c.path)
        if project is not None:  # only this project's runs' fields
            fields_query = fields_query.where(f.c.run_id.in_(query.with_only_columns(r.c.id)))
        with self._read() as conn:
            rows = conn.execute(query).all()
            field_rows = conn.execute(fields_query).all()
        names: dict[int, list[str]] = {}
        for run_pk, path in field_rows:
            names.setdefault(run_pk, []).append(path)
        return [
            RunRecord(
                row.id,
                row.run_key,
                ProjectName(row.workspace, row.name),
                row.created_at,
                tuple(names.get(row.id, ())),
            )
            for row in rows
        ]

    # -- fields and artifacts ---------------------------------------------------------------

    @staticmethod
    def _field_names(conn: Connection, run_pk: int) -> tuple[str, ...]:
        f = schema.fields
        rows = conn.execute(select(f.c.path).where(f.c.run_id == run_pk).order_by(f.c.path))
        return tuple(row.path for row in rows)

    def field_artifact(self, run: RunRecord, field_path: str) -> ArtifactRecord:
        f, a = schema.fields, schema.artifacts
        with self._read() as conn:
            row = conn.execute(
                _select_artifact()
                .join(f, f.c.artifact_id == a.c.id)
                .where(f.c.run_id == run.id, f.c.path == field_path)
            ).first()
        if row is None:
            raise NotFoundError(f"run {run.run_id} has no artifact field {field_path!r}")
        return _artifact_record(row)

    def iter_entries(self, artifact_id: str) -> Iterator[ArtifactFileData]:
        """The artifact's entries in file_path order, as stored (callers validate paths)."""
        e = schema.artifact_entries
        query = (
            select(*_ENTRY_COLUMNS).where(e.c.artifact_id == artifact_id).order_by(e.c.file_path)
        )
        with self._read() as conn:
            for row in conn.execution_options(yield_per=2000).execute(query):
                yield _entry_from_row(row)

    def entries(self, artifact_id: str) -> list[ArtifactFileData]:
        # Sort in Python too: database collations need not match Python string order.
        return sorted(self.iter_entries(artifact_id), key=lambda e: e.file_path)

    def update_field(
        self,
        run: RunRecord,
        field_path: str,
        make_entries: Callable[[list[ArtifactFileData]], list[ArtifactFileData]],
        unchanged_if: str | None = None,
    ) -> ArtifactRecord:
        """Point the run's field at a new artifact built from the current one, atomically.

        `make_entries` gets the field's current entries (empty for a new field) and returns the
        new artifact's entries; it runs inside the write transaction, so concurrent
        `track_files` calls on one field never lose each other's entries. When the field already
        points at artifact id `unchanged_if`, nothing is read or written (an unchanged re-track).
        """
        with self._write() as conn:
            # Serialises updates of one run's fields across hosts (a no-op on SQLite, whose
            # write transaction is exclusive already).
            r = schema.runs
            conn.execute(select(r.c.id).where(r.c.id == run.id).with_for_update())
            self._check_field_conflict(conn, run, field_path)
            f = schema.fields
            current = conn.execute(
                select(f.c.artifact_id).where(f.c.run_id == run.id, f.c.path == field_path)
            ).scalar_one_or_none()
            if current is not None and current == unchanged_if:
                found = self._artifact_in(conn, current)
                assert found is not None
                return found
            old_entries = self._entries_in(conn, current) if current else []
            entries = make_entries(old_entries)
            record = self._insert_artifact(conn, entries)
            if current is None:
                self._insert_field(conn, run, field_path, record)
            elif current != record.id:
                conn.execute(
                    update(f)
                    .where(f.c.run_id == run.id, f.c.path == field_path)
                    .values(artifact_id=record.id, updated_at=now_text())
                )
            return record

    def create_run_with_field(
        self, project: ProjectName, field_path: str, entries: Sequence[ArtifactFileData]
    ) -> tuple[RunRecord, ArtifactRecord]:
        """A new run holding one field, both written in one transaction (`artifactfs track`
        without --run): a process killed before it ends leaves no run, not an empty one that
        has taken a run number."""
        project_record = self.ensure_project(project)
        with self._write() as conn:
            # The artifact first: taking the run number locks the project's row (PostgreSQL)
            # until the commit, and other runs of the project wait for it meanwhile.
            record = self._insert_artifact(conn, entries)
            run = self._insert_next_run(conn, project_record)
            self._insert_field(conn, run, field_path, record)
        return run, record

    @staticmethod
    def _insert_field(
        conn: Connection, run: RunRecord, field_path: str, record: ArtifactRecord
    ) -> None:
        conn.execute(
            schema.fields.insert().values(
                run_id=run.id, path=field_path, artifact_id=record.id, updated_at=now_text()
            )
        )

    @staticmethod
    def _entries_in(conn: Connection, artifact_id: str) -> list[ArtifactFileData]:
        e = schema.artifact_entries
        rows = conn.execute(select(*_ENTRY_COLUMNS).where(e.c.artifact_id == artifact_id))
        return [_entry_from_row(row) for row in rows]

    def _check_field_conflict(self, conn: Connection, run: RunRecord, field_path: str) -> None:
        refuse_field_namespace_conflict(field_path, self._field_names(conn, run.id), run.run_id)

    @staticmethod
    def _artifact_in(conn: Connection, artifact_id: str) -> ArtifactRecord | None:
        row = conn.execute(_select_artifact().where(schema.artifacts.c.id == artifact_id)).first()
        return None if row is None else _artifact_record(row)

    def _insert_artifact(
        self, conn: Connection, entries: Sequence[ArtifactFileData]
    ) -> ArtifactRecord:
        """Store the artifact unless an identical one (same id) is stored already."""
        record = ArtifactRecord(
            *artifact_id_and_hash(entries),
            len(entries),
            sum(e.size or 0 for e in entries),
        )
        if self._artifact_in(conn, record.id) is not None:
            return record
        try:
            # In a savepoint: on PostgreSQL a failed statement would abort the transaction.
            with conn.begin_nested():
                conn.execute(
                    schema.artifacts.insert().values(
                        id=record.id,
                        hash=record.hash,
                        file_count=record.file_count,
                        total_size=record.total_size,
                        created_at=now_text(),
                    )
                )
        except IntegrityError:  # another host stored the same artifact first
            return record
        rows = []
        dirs: set[str] = set()
        for entry in entries:
            parent, name = _split_parent(entry.file_path)
            rows.append(
                (
                    record.id,
                    entry.file_path,
                    parent,
                    name,
                    entry.file_hash,
                    entry.type,
                    entry.size,
                    _METADATA_JSON.encode(entry.metadata),
                )
            )
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = _split_parent(parent)[0]
        _insert_rows(conn, schema.artifact_entries, rows)
        dir_rows = [(record.id, d, *_split_parent(d)) for d in sorted(dirs)]
        _insert_rows(conn, schema.artifact_dirs, dir_rows)
        return record

    # -- browsing, for the mount -----------------------------------------------------------

    def list_projects(self) -> list[ProjectName]:
        p = schema.projects
        with self._read() as conn:
            rows = conn.execute(select(p.c.workspace, p.c.name).order_by(p.c.workspace, p.c.name))
            return [ProjectName(row.workspace, row.name) for row in rows]

    def run_fields(self, run_id: str) -> dict[str, FieldArtifact] | None:
        """field path -> what it points at, for the run; None when there is no such run."""
        r, f, a = schema.runs, schema.fields, schema.artifacts
        with self._read() as conn:
            run_pk = conn.execute(select(r.c.id).where(r.c.run_key == run_id)).scalar()
            if run_pk is None:
                return None
            rows = conn.execute(
                select(f.c.path, f.c.artifact_id, a.c.created_at)
                .outerjoin(a, a.c.id == f.c.artifact_id)  # a field is listed even so
                .where(f.c.run_id == run_pk)
            )
            return {row.path: FieldArtifact(row.artifact_id, row.created_at or "") for row in rows}

    def artifact(self, artifact_id: str) -> ArtifactRecord | None:
        with self._read() as conn:
            return self._artifact_in(conn, artifact_id)

    def artifact_lookup(
        self, artifact_id: str, parent: str, name: str
    ) -> tuple[ArtifactFileData | None, str | None]:
        """The file entry and the directory path named `name` in directory `parent`.

        Tracking never stores both; a store written by hand may, and callers must not guess."""
        names = {"artifact_id": artifact_id, "parent": parent, "name": name}
        dialect = self.engine.dialect
        with self._driver_cursor() as cursor:
            row = _LOOKUP_ENTRY.run(cursor, dialect, names).fetchone()
            entry = _entry_from_row(row) if row is not None else None
            found = _LOOKUP_DIR.run(cursor, dialect, names).fetchone()
        return entry, str(found[0]) if found is not None else None

    def artifact_children(
        self, artifact_id: str, parent: str
    ) -> tuple[list[str], list[ArtifactFileData]]:
        """Sub-directory paths and file entries directly in `parent` ('' for the root)."""
        names = {"artifact_id": artifact_id, "parent": parent}
        dialect = self.engine.dialect
        with self._driver_cursor() as cursor:
            dir_paths = [str(row[0]) for row in _LIST_DIRS.run(cursor, dialect, names)]
            rows = _LIST_ENTRIES.run(cursor, dialect, names).fetchall()
        return dir_paths, [_entry_from_row(row) for row in rows]

    # -- used by tests and diagnostics ------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row counts of every table: tests assert a refused command changed none of them."""
        with self._read() as conn:
            return {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in schema.tables_of_version(self._version)
            }


def _entry_from_row(row: Sequence[Any]) -> ArtifactFileData:
    """An entry from the values of `_ENTRY_COLUMNS`, in order (a Row or a driver's tuple)."""
    file_path, file_hash, type_, size, metadata_json = row
    try:
        metadata = json.loads(metadata_json)
    except ValueError:
        metadata = {}
    if not isinstance(metadata, dict):
        metadata = {}
    return ArtifactFileData(
        file_path, file_hash, type_, size, {str(k): str(v) for k, v in metadata.items()}
    )


def _insert_rows(conn: Connection, table: Table, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert rows (values in the table's column order) with the driver's own executemany.

    An artifact of a million entries is a million rows: SQLAlchemy's per-row parameter
    processing would cost more than the database's work, so the statement is compiled once for
    the dialect and handed to the driver as it stands.
    """
    if not rows:
        return
    columns = [column.name for column in table.columns]
    compiled = table.insert().compile(dialect=conn.dialect, column_keys=columns)
    sql = str(compiled)
    # SQLite takes positional parameters in the compiled order; psycopg takes named ones.
    order = [columns.index(name) for name in compiled.positiontup or ()]
    for start in range(0, len(rows), _INSERT_BATCH):
        batch = rows[start : start + _INSERT_BATCH]
        params: list[Any]
        if not compiled.positional:
            params = [dict(zip(columns, row, strict=True)) for row in batch]
        elif order == list(range(len(columns))):
            params = list(batch)
        else:
            params = [tuple(row[i] for i in order) for row in batch]
        conn.exec_driver_sql(sql, params)


def _layout_problem(inspector: Inspector, names: set[str], version: int) -> str | None:
    """The first column or table schema `version` needs that the database lacks, if any: a
    store made by a development build under the same version number is refused clearly, not
    met with SQL errors later (nor "repaired" with tables it never had). Tables of later
    versions are missing legitimately; where present they must be complete."""
    for table in schema.metadata.sorted_tables:
        if table.name in names:
            found = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in found:
                    return f"no column {table.name}.{column.name}"
    for table in schema.tables_of_version(version):
        if table.name not in names:
            return f"no table {table.name}"
    return None


def _is_sqlite_uri(url: URL) -> bool:
    """`sqlite:///file:...?uri=true`: the database is an SQLite URI, not a path to make."""
    return str(url.query.get("uri", "")).lower() in ("true", "1", "yes", "on", "t", "y")


def _make_parent_directory(path: Path, uri: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a directory must be
        raise ArtifactfsError(
            f"cannot open store {_redact(uri)}: {exc.filename} is not a directory"
        ) from None
    except OSError as exc:
        raise ArtifactfsError(
            f"cannot open store {_redact(uri)}: cannot create {exc.filename or path.parent}: "
            f"{exc.strerror or exc}"
        ) from None


def _driver_error(exc: BaseException) -> BaseException:
    """The database driver's own error: as raised, or as SQLAlchemy wrapped it."""
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def _store_error(uri: str, doing: str, driver_error: BaseException) -> ArtifactfsError:
    """One line: the store, and the database driver's reason (read-only ones said plainly)."""
    reason = " ".join(str(driver_error).split())
    code = getattr(driver_error, "sqlite_errorname", None) or ""
    if code == "SQLITE_READONLY_DIRECTORY":
        return ArtifactfsError(
            f"store {uri} is in a directory this user cannot write, where SQLite must create "
            f"its journal files (for a store in WAL mode, even to read it): {reason}"
        )
    if (
        code.startswith("SQLITE_READONLY")
        or getattr(driver_error, "sqlstate", None) == "25006"  # read_only_sql_transaction
        or "readonly database" in reason
    ):
        return ArtifactfsError(f"store {uri} is read-only: {reason}")
    return ArtifactfsError(f"cannot {doing} store {uri}: {reason}")
