"""Neptune's run API for artifacts, with an embedded store instead of a server.

    run = artifactfs.init_run(project="ml-team/classification")
    run["data_versions"].track_files("datasets/")
    run["sys/id"].fetch()                      # "CLS-1"

A `Run` is a handle on one run record; `run[path]` is a `FieldHandle`. Nothing is buffered:
every call reads or writes the store directly, so `stop()` only closes the handle.
"""

from __future__ import annotations

import logging
import os
from types import TracebackType
from typing import Any

from artifactfs.download import download_entries
from artifactfs.entries import ArtifactFileData
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.naming import RESERVED_NAMESPACE, parse_project, validate_field_path
from artifactfs.store import ArtifactRecord, RunRecord, Store
from artifactfs.tracking import PendingTrack

log = logging.getLogger(__name__)

# Neptune's modes that record (there is no server: "offline" records here, as the others do).
# A mode of None is Neptune's default: NEPTUNE_MODE, else "async".
WRITE_MODES = ("async", "sync", "offline")
READ_ONLY_MODE = "read-only"


def project_from_environment(project: str | None) -> str | None:
    return project or os.environ.get("ARTIFACTFS_PROJECT") or os.environ.get("NEPTUNE_PROJECT")


def run_in_project(store: Store, run_id: str, project: str | None) -> RunRecord:
    """Run `run_id`; when a project is named with it (not from the environment), the run
    must be in that project."""
    record = store.get_run(run_id)
    if project is not None and parse_project(project) != record.project:
        raise NotFoundError(f"run {run_id} is not in project {parse_project(project)}")
    return record


def init_run(
    project: str | None = None,
    *,
    with_id: str | None = None,
    mode: str | None = None,
    api_token: str | None = None,  # accepted so Neptune code runs unchanged; there is no server
    store: str | Store | None = None,
    project_key: str | None = None,
    **_neptune_options: Any,  # name, tags, capture_stdout, ...: no meaning without a server
) -> Run:
    """Open run `with_id`, or create one in `project` (else ARTIFACTFS_PROJECT, NEPTUNE_PROJECT)."""
    del api_token
    if mode is None:
        mode = os.environ.get("NEPTUNE_MODE") or "async"
        if mode not in (*WRITE_MODES, READ_ONLY_MODE):
            # Set for Neptune ("debug": record nothing), which it was written for: code that
            # ran with it before must not break here; it records, as it did before.
            log.warning("NEPTUNE_MODE=%s has no meaning here: recording as mode 'async'", mode)
            mode = "async"
    if mode not in (*WRITE_MODES, READ_ONLY_MODE):
        raise ArtifactfsError(
            f"unsupported mode {mode!r}: use 'async', 'sync', 'offline' or 'read-only'"
        )
    the_store = store if isinstance(store, Store) else Store(store)
    project_name = project_from_environment(project)
    if with_id is not None:
        record = run_in_project(the_store, with_id, project)
    else:
        if mode == READ_ONLY_MODE:
            raise ArtifactfsError("mode='read-only' needs with_id: a new run cannot be read-only")
        if project_name is None:
            raise ArtifactfsError(
                "no project: pass project='workspace/name' or set ARTIFACTFS_PROJECT"
            )
        record = the_store.create_run(parse_project(project_name), project_key)
    return Run(the_store, record, read_only=mode == READ_ONLY_MODE)


class Run:
    def __init__(self, store: Store, record: RunRecord, read_only: bool = False) -> None:
        self._store = store
        self._record = record
        self.read_only = read_only
        self._stopped = False

    @property
    def id(self) -> str:
        return self._record.run_id

    @property
    def store(self) -> Store:
        return self._store

    def __getitem__(self, path: str) -> FieldHandle:
        return FieldHandle(self, path)

    def __repr__(self) -> str:
        return f"<Run {self.id} of {self._record.project}>"

    def _check_writable(self) -> None:
        if self._stopped:
            raise ArtifactfsError(f"run {self.id} was stopped: open it again with init_run")
        if self.read_only:
            raise ArtifactfsError(f"run {self.id} is open read-only: cannot track files")

    def stop(self) -> None:
        self._stopped = True

    def wait(self) -> None:
        """Neptune's flush: writes here are synchronous, so there is nothing to wait for."""

    sync = wait

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- system fields ----------------------------------------------------------------------

    def _system_value(self, path: str) -> str:
        values = {
            "sys/id": self._record.run_id,
            "sys/creation_time": self._record.created_at,
            "sys/project": str(self._record.project),
        }
        if path not in values:
            raise NotFoundError(f"unknown system field {path!r}: known are {', '.join(values)}")
        return values[path]

    @property
    def record(self) -> RunRecord:
        return self._record


class FieldHandle:
    """`run["path"]`: an artifact field (or a `sys/` value, for `fetch()`)."""

    def __init__(self, run: Run, path: str) -> None:
        self._run = run
        self.path = path.strip("/")

    def __getitem__(self, sub_path: str) -> FieldHandle:
        return FieldHandle(self._run, f"{self.path}/{sub_path.strip('/')}")

    def __repr__(self) -> str:
        return f"<Field {self.path!r} of run {self._run.id}>"

    def fetch(self) -> str:
        if self.path.split("/")[0] == RESERVED_NAMESPACE:
            return self._run._system_value(self.path)
        return self.fetch_hash()

    def track_files(self, path: str, destination: str | None = None, wait: bool = False) -> None:
        """Record every file at `path` (local path, file://, s3://, gs://) in this field."""
        del wait  # tracking is synchronous already
        self._run._check_writable()
        validate_field_path(self.path)
        PendingTrack(path, destination).record(self._run.store, self._run.record, self.path)

    def fetch_hash(self) -> str:
        return self._artifact().hash

    def fetch_files_list(self) -> list[ArtifactFileData]:
        return self._run.store.entries(self._artifact().id)

    def download(
        self,
        destination: str | None = None,
        progress_bar: bool | None = None,
        symlink_local: bool = False,
    ) -> None:
        """Write every file under `destination` (default: the current directory), verified."""
        download_entries(
            self.fetch_files_list(),
            destination or os.getcwd(),
            symlink_local=symlink_local,
            show_progress=progress_bar,
        )

    def _artifact(self) -> ArtifactRecord:
        validate_field_path(self.path)
        return self._run.store.field_artifact(self._run.record, self.path)
