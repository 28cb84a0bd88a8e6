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
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from artifactfs.entries import ArtifactFileData, parse_time
from artifactfs.errors import ArtifactfsError, NotFoundError, NotKeptError
from artifactfs.naming import (
    RESERVED_NAMESPACE,
    parse_project,
    parse_run_id,
    validate_custom_run_id,
    validate_field_path,
    validate_project_key,
)
from artifactfs.store import ArtifactRecord, RunRecord, Store
from artifactfs.tracking import PendingTrack

log = logging.getLogger(__name__)

# Neptune's modes that record (there is no server: "offline" records here, as the others do).
# A mode of None is Neptune's default: NEPTUNE_MODE, else "async".
WRITE_MODES = ("async", "sync", "offline")
READ_ONLY_MODE = "read-only"
# Neptune has it only for a run created with custom_run_id=.
_CUSTOM_RUN_ID_FIELD = "sys/custom_run_id"
_SYSTEM_FIELDS = ("sys/id", "sys/creation_time", "sys/project", _CUSTOM_RUN_ID_FIELD)
_NOT_KEPT = (
    "artifactfs keeps Neptune's artifact fields only (track_files, fetch_hash, "
    "fetch_files_list, download, fetch): log other metadata elsewhere"
)


def project_from_environment(project: str | None) -> str | None:
    """The project given, else the environment's. One given empty is not "none given": it is
    refused as the invalid name it is, not replaced by the environment's."""
    if project is not None:
        return project
    return os.environ.get("ARTIFACTFS_PROJECT") or os.environ.get("NEPTUNE_PROJECT")


def run_in_project(store: Store, run_id: str, project: str | None) -> RunRecord:
    """Run `run_id`; when a project is named with it (not from the environment), the run
    must be in that project."""
    record = store.get_run(run_id)
    if project is not None and parse_project(project) != record.project:
        raise NotFoundError(f"run {run_id} is not in project {parse_project(project)}")
    return record


def init_run(
    with_id: str | None = None,
    *,
    project: str | None = None,
    api_token: str | None = None,  # accepted so Neptune code runs unchanged; there is no server
    custom_run_id: str | None = None,
    mode: str | None = None,
    store: str | Store | None = None,
    project_key: str | None = None,
    # Neptune's other options: no meaning without a server.
    name: str | None = None,
    description: str | None = None,
    tags: Any = None,
    source_files: Any = None,
    capture_stdout: bool | None = None,
    capture_stderr: bool | None = None,
    capture_hardware_metrics: bool | None = None,
    fail_on_exception: bool = True,
    monitoring_namespace: str | None = None,
    flush_period: float = 5.0,
    proxies: dict[str, str] | None = None,
    capture_traceback: bool = True,
    git_ref: Any = None,
    dependencies: Any = None,
    async_lag_callback: Any = None,
    async_lag_threshold: float | None = None,
    async_no_progress_callback: Any = None,
    async_no_progress_threshold: float | None = None,
    run: str | None = None,  # Neptune 0.x's name for with_id
) -> Run:
    """Open run `with_id`, or create one in `project` (else ARTIFACTFS_PROJECT, NEPTUNE_PROJECT).

    The signature is Neptune 1.x's: the one positional argument is the run id (`init_run("CLS-1")`);
    an argument Neptune did not have is a TypeError, not silently ignored.
    """
    if run is not None:
        if with_id is not None:
            raise ArtifactfsError("pass the run id once: with_id (run is its old name)")
        log.warning("init_run(run=...) is deprecated in Neptune: use with_id")
        with_id = run
    if with_id is not None and custom_run_id is not None:
        raise ArtifactfsError("pass with_id or custom_run_id, not both: each names the run")
    mode = _mode(mode)
    # Every refusal before the store is opened: a refused call makes or changes no store.
    if with_id is not None:
        _check_run_id(with_id)
        if project is not None:
            parse_project(project)
        # No store there: no such run either (and nothing is made for a read).
        the_store = store if isinstance(store, Store) else Store(store, create=False)
        # A run named by its id: NEPTUNE_CUSTOM_RUN_ID, set for the whole job, does not apply.
        return Run(the_store, run_in_project(the_store, with_id, project), mode == READ_ONLY_MODE)
    if mode == READ_ONLY_MODE:
        raise ArtifactfsError("mode='read-only' needs with_id: a new run cannot be read-only")
    project_name = project_from_environment(project)
    if project_name is None:
        raise ArtifactfsError("no project: pass project='workspace/name' or set ARTIFACTFS_PROJECT")
    parsed = parse_project(project_name)
    if project_key is not None:
        validate_project_key(project_key)
    custom_id = custom_run_id
    if custom_id is None:
        custom_id = os.environ.get("NEPTUNE_CUSTOM_RUN_ID") or None
    if custom_id is not None:
        validate_custom_run_id(custom_id)
    the_store = store if isinstance(store, Store) else Store(store)
    if custom_id is not None:
        # The processes of one job share the run their id names: the first one makes it.
        return Run(the_store, the_store.run_for_custom_id(parsed, custom_id, project_key))
    return Run(the_store, the_store.create_run(parsed, project_key))


def _check_run_id(run_id: object) -> None:
    """Refuse a run id that is not KEY-N, saying that it is init_run's first argument (Neptune
    0.x code passed the project there)."""
    try:
        if not isinstance(run_id, str):
            raise ArtifactfsError(f"invalid run id {run_id!r}: expected KEY-N, like 'CLS-4'")
        parse_run_id(run_id)
    except ArtifactfsError as exc:
        raise ArtifactfsError(
            f"{exc} (init_run's first argument is with_id, as in Neptune 1.x; pass a project "
            "by name: project='workspace/name')"
        ) from None


def _mode(mode: str | None) -> str:
    """The mode asked for, else NEPTUNE_MODE's, else "async"; refused if unknown."""
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
    return mode


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
        return FieldHandle(self, _field_path(path))

    def __setitem__(self, path: str, value: object) -> None:
        raise NotKeptError(f"run[{path!r}] = ...: {_NOT_KEPT}")

    def __repr__(self) -> str:
        return f"<Run {self.id} of {self._record.project}>"

    def _check_writable(self) -> None:
        if self._stopped:
            raise ArtifactfsError(f"run {self.id} was stopped: open it again with init_run")
        if self.read_only:
            raise ArtifactfsError(f"run {self.id} is open read-only: cannot track files")

    def stop(self, *, seconds: float | None = None) -> None:
        del seconds  # Neptune's wait for queued writes: there are none
        self._stopped = True

    def wait(self, *, disk_only: bool = False) -> None:
        """Neptune's flush: writes here are synchronous, so there is nothing to wait for."""

    def sync(self, *, wait: bool = True) -> None:
        """Neptune's refresh from the server: every read here goes to the store already."""

    def exists(self, path: str) -> bool:
        """Whether `path` is a field of this run or a namespace holding one (`sys/id`...)."""
        path = _field_path(path).strip("/")
        if path == _CUSTOM_RUN_ID_FIELD:
            return self._store.custom_run_id_of(self.id) is not None
        if path in _SYSTEM_FIELDS or path == RESERVED_NAMESPACE:
            return True
        fields = self._store.get_run(self.id).fields
        return any(field == path or field.startswith(path + "/") for field in fields)

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

    def _system_value(self, path: str) -> str | datetime:
        if path not in _SYSTEM_FIELDS:
            shown = ", ".join(_SYSTEM_FIELDS)
            raise NotFoundError(f"unknown system field {path!r}: known are {shown}")
        if path == "sys/id":
            return self._record.run_id
        if path == "sys/project":
            return str(self._record.project)
        if path == _CUSTOM_RUN_ID_FIELD:
            custom_id = self._store.custom_run_id_of(self.id)
            if custom_id is None:
                raise NotFoundError(f"run {self.id} has no {path}: it was not created with one")
            return custom_id
        created = parse_time(self._record.created_at)  # a datetime, as Neptune's fetch() gives
        if created is None:  # not written by artifactfs
            raise ArtifactfsError(
                f"run {self.id} has an unreadable creation time {self._record.created_at!r}"
            )
        return created

    @property
    def record(self) -> RunRecord:
        return self._record


class ArtifactValue(str):
    """An artifact field's `fetch()`: its hash, with Neptune's `.hash` attribute."""

    @property
    def hash(self) -> str:
        return str(self)


def _field_path(path: object) -> str:
    if not isinstance(path, str):
        raise ArtifactfsError(
            f"a field path is a string like 'data_versions', not {type(path).__name__}"
        )
    return path


def _text_argument(name: str, value: object) -> str:
    """A path argument as text: a str or os.PathLike (pathlib.Path), else refused."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ArtifactfsError(f"{name} must be a string or a path, not {type(value).__name__}")
    return value


class FieldHandle:
    """`run["path"]`: an artifact field (or a `sys/` value, for `fetch()`)."""

    def __init__(self, run: Run, path: str) -> None:
        self._run = run
        self.path = path.strip("/")

    def __getitem__(self, sub_path: str) -> FieldHandle:
        return FieldHandle(self._run, f"{self.path}/{_field_path(sub_path).strip('/')}")

    def __repr__(self) -> str:
        return f"<Field {self.path!r} of run {self._run.id}>"

    if not TYPE_CHECKING:  # a type checker still flags names a field does not have

        def __getattr__(self, name: str) -> Any:
            # Only for names not defined here: Neptune's append, log, upload, assign, ...
            if name.startswith("_"):
                raise AttributeError(name)
            raise NotKeptError(f"run[{self.path!r}].{name}: {_NOT_KEPT}")

    def fetch(self) -> str | datetime:
        """A `sys/` value; for an artifact field its hash, as a string that also has Neptune's
        `.hash` (`run["data"].fetch().hash`)."""
        if self.path.split("/")[0] == RESERVED_NAMESPACE:
            return self._run._system_value(self.path)
        return ArtifactValue(self.fetch_hash())

    def track_files(
        self,
        path: str | os.PathLike[str],
        destination: str | os.PathLike[str] | None = None,
        wait: bool = False,
    ) -> None:
        """Record every file at `path` (local path, file://, s3://, gs://) in this field."""
        del wait  # tracking is synchronous already
        self._run._check_writable()
        validate_field_path(self.path)
        location = _text_argument("path", path)
        prefix = None if destination is None else _text_argument("destination", destination)
        PendingTrack(location, prefix).record(self._run.store, self._run.record, self.path)

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
        # Here: the reader and the cache it brings took a fifth of `import artifactfs`.
        from artifactfs.download import download_entries

        download_entries(
            self.fetch_files_list(),
            destination or os.getcwd(),
            symlink_local=symlink_local,
            show_progress=progress_bar,
        )

    def _artifact(self) -> ArtifactRecord:
        validate_field_path(self.path)
        return self._run.store.field_artifact(self._run.record, self.path)
