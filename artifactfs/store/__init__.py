"""The metadata store (SQLAlchemy Core): SQLite by default, any SQLAlchemy URL for a team."""

from artifactfs.store.store import (
    ArtifactRecord,
    FieldArtifact,
    ProjectRecord,
    RunRecord,
    Store,
    default_store_path,
    resolve_store_uri,
)

__all__ = [
    "ArtifactRecord",
    "FieldArtifact",
    "ProjectRecord",
    "RunRecord",
    "Store",
    "default_store_path",
    "resolve_store_uri",
]
