"""The store's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

Artifacts are content-addressed by their hash and immutable; a field points a run at one.
Entries and directories carry `parent`/`name` columns with an index on them so that the mount
can look up one name or list one directory without reading a whole artifact.
"""

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from artifactfs.naming import MAX_CUSTOM_RUN_ID_CHARS, MAX_FIELD_PATH_CHARS

# Bump when the tables change, and add the new tables to ADDED_IN: `Store` uses an older
# store at its own version and upgrades it when something first needs the new tables; it
# refuses a newer one.
SCHEMA_VERSION = 2

metadata = MetaData()

meta = Table(
    "artifactfs_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("workspace", String(128), nullable=False),
    Column("name", String(128), nullable=False),
    Column("key", String(16), nullable=False, unique=True),
    # The number the next run gets minus one; bumped by one atomic UPDATE ... RETURNING.
    # Run numbers are INTEGER: naming.MAX_RUN_NUMBER keeps both backends within it.
    Column("last_number", Integer, nullable=False, default=0),
    Column("created_at", String(32), nullable=False),
    UniqueConstraint("workspace", "name"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("project_id", Integer, ForeignKey("projects.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("run_key", String(32), nullable=False, unique=True),
    Column("created_at", String(32), nullable=False),
    UniqueConstraint("project_id", "number"),
)

# `id` covers entries *and* their metadata (where the bytes live); `hash` is Neptune's artifact
# hash, over content only. Same content tracked from two places: one hash, two artifacts.
artifacts = Table(
    "artifacts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("hash", String(64), nullable=False, index=True),
    Column("file_count", Integer, nullable=False),
    Column("total_size", BigInteger, nullable=False),
    Column("created_at", String(32), nullable=False),
)

artifact_entries = Table(
    "artifact_entries",
    metadata,
    Column("artifact_id", String(64), ForeignKey("artifacts.id"), primary_key=True),
    Column("file_path", Text, primary_key=True),
    Column("parent", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("file_hash", Text, nullable=False),
    Column("type", String(16), nullable=False),
    Column("size", BigInteger, nullable=True),
    Column("metadata_json", Text, nullable=False),
    Index("ix_entries_parent_name", "artifact_id", "parent", "name"),
)

# Every directory below an artifact's root, so listings need no scan of all entries.
artifact_dirs = Table(
    "artifact_dirs",
    metadata,
    Column("artifact_id", String(64), ForeignKey("artifacts.id"), primary_key=True),
    Column("path", Text, primary_key=True),
    Column("parent", Text, nullable=False),
    Column("name", Text, nullable=False),
    Index("ix_dirs_parent_name", "artifact_id", "parent", "name"),
)

fields = Table(
    "fields",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id"), primary_key=True),
    Column("path", String(MAX_FIELD_PATH_CHARS), primary_key=True),  # validated in naming
    Column("artifact_id", String(64), ForeignKey("artifacts.id"), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

# Neptune's `init_run(custom_run_id=...)`: the processes of one distributed job share one run.
custom_run_ids = Table(
    "custom_run_ids",
    metadata,
    Column("project_id", Integer, ForeignKey("projects.id"), primary_key=True),
    Column("custom_id", String(MAX_CUSTOM_RUN_ID_CHARS), primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id"), nullable=False, unique=True),
)

# The schema version that added each table; tables not named here are version 1's.
ADDED_IN: dict[str, int] = {custom_run_ids.name: 2}


def tables_of_version(version: int) -> list[Table]:
    """The tables a store of `version` has, in creation order."""
    return [table for table in metadata.sorted_tables if ADDED_IN.get(table.name, 1) <= version]
