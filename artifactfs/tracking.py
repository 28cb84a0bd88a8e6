"""Turning a location into artifact entries, and merging them into a field's artifact.

Everything that can fail (listing, hashing, path checks, conflicts) happens before anything is
written, so a refused `track_files` leaves the store exactly as it was.

Re-tracking an unchanged local tree is the common case (a training script tracks its data on
every run) and must cost little more than a `stat` per file: the scan's fingerprint maps, in the
local hash cache, to the id of the entries last made from it; when the field already holds
exactly those entries, nothing is hashed, built or written.
"""

from __future__ import annotations

import threading

from artifactfs.entries import (
    ArtifactFileData,
    artifact_id,
    find_file_dir_conflict,
    join_destination,
    normal_destination,
    validate_path,
)
from artifactfs.errors import ArtifactfsError, NotFoundError
from artifactfs.naming import ProjectName
from artifactfs.progress import progress_bar
from artifactfs.sources import source_for_location
from artifactfs.sources.local import LocalScan, LocalSource
from artifactfs.store import ArtifactRecord, RunRecord, Store
from artifactfs.worker_pool import interruptible


class PendingTrack:
    """One `track_files(location, destination)`: listed when made, recorded by `record`."""

    def __init__(
        self, location: str, destination: str | None = None, show_progress: bool | None = None
    ) -> None:
        destination = normal_destination(destination)  # no trailing or doubled '/' left
        if destination is not None:
            validate_path(destination)  # refuse before hashing a large tree
        self.location = location
        self.destination = destination
        self.show_progress = show_progress
        self.source = source_for_location(location)
        self._scan: LocalScan | None = None
        self._entries: dict[str, ArtifactFileData] | None = None
        if isinstance(self.source, LocalSource):
            self._scan = self.source.scan(location)  # a missing path fails here, at once
            if not self._scan.files:
                raise self._nothing_there()

    @property
    def file_count(self) -> int:
        return len(self._scan.files) if self._scan is not None else len(self.entries())

    def entries(self) -> dict[str, ArtifactFileData]:
        """Entries for every file at the location, keyed by their path in the artifact."""
        if self._entries is None:
            self._entries = self._collect()
        return self._entries

    def record(self, store: Store, run: RunRecord, field_path: str) -> ArtifactRecord:
        """Merge the entries into the run's field; returns the field's new artifact."""
        current = _field_artifact_or_none(store, run, field_path)
        fingerprint = None
        if self._scan is not None and isinstance(self.source, LocalSource):
            fingerprint = self._scan.fingerprint(self.destination)
            known = self.source.hash_cache.entries_id(fingerprint)
            if current is not None and current.id == known:
                return current  # unchanged files, and the field holds exactly them
        new_entries = self.entries()
        record = store.update_field(
            run,
            field_path,
            lambda old: merged_entries(old, new_entries),
            # The field already holding exactly these entries makes the merge a no-op.
            unchanged_if=artifact_id(new_entries.values()) if current is not None else None,
        )
        self._remember_entries_id(fingerprint, record)
        return record

    def record_in_new_run(
        self, store: Store, project: ProjectName, field_path: str
    ) -> tuple[RunRecord, ArtifactRecord]:
        """A new run of `project` holding the entries in its field, made in one transaction."""
        new_entries = self.entries()
        run, record = store.create_run_with_field(
            project, field_path, merged_entries([], new_entries)
        )
        if self._scan is not None:
            self._remember_entries_id(self._scan.fingerprint(self.destination), record)
        return run, record

    def _remember_entries_id(self, fingerprint: str | None, record: ArtifactRecord) -> None:
        """Which artifact id the scanned local files make, so that tracking them unchanged
        again is a no-op without hashing."""
        if fingerprint is None or not isinstance(self.source, LocalSource):
            return
        new_entries = self.entries()
        # A merge that kept no old entry is exactly the new entries: its id is theirs.
        same = record.file_count == len(new_entries)
        new_id = record.id if same else artifact_id(new_entries.values())
        self.source.hash_cache.remember_entries_id(fingerprint, new_id)

    def _collect(self) -> dict[str, ArtifactFileData]:
        entries = interruptible(self._listed_entries)
        if not entries:
            raise self._nothing_there()
        # Here, not only when merging: a location refused for its own paths is refused
        # before a transaction is begun (the CLI's new run would begin one).
        _refuse_file_dir_conflict(entries)
        return entries

    def _listed_entries(self, stop: threading.Event) -> dict[str, ArtifactFileData]:
        """The location's entries by their path in the field (some only, once `stop` is set)."""
        entries: dict[str, ArtifactFileData] = {}
        with progress_bar(None, f"tracking {self.location}", enabled=self.show_progress) as bar:

            def on_progress(done: int) -> None:
                bar.update(done - bar.n)

            if self._scan is not None and isinstance(self.source, LocalSource):
                listed = self.source.entries_of(self._scan, on_progress, stop)
            else:
                listed = self.source.list_location(self.location, on_progress)
            for entry in listed:
                if stop.is_set():
                    break
                path = join_destination(self.destination, entry.file_path)
                entries[path] = entry.with_path(path) if path != entry.file_path else entry
        return entries

    def _nothing_there(self) -> ArtifactfsError:
        return ArtifactfsError(f"nothing to track at {self.location}: no files there")


def _field_artifact_or_none(store: Store, run: RunRecord, field_path: str) -> ArtifactRecord | None:
    try:
        return store.field_artifact(run, field_path)
    except NotFoundError:
        return None


def merged_entries(
    old_entries: list[ArtifactFileData], new_entries: dict[str, ArtifactFileData]
) -> list[ArtifactFileData]:
    """The old entries plus the new ones (a new one replaces an old one of the same path)."""
    merged = {entry.file_path: entry for entry in old_entries}
    merged.update(new_entries)
    _refuse_file_dir_conflict(merged)
    return sorted(merged.values(), key=lambda e: e.file_path)


def _refuse_file_dir_conflict(entries: dict[str, ArtifactFileData]) -> None:
    conflict = find_file_dir_conflict(entries)
    if conflict is not None:
        file_path, below = conflict
        raise ArtifactfsError(
            f"{file_path!r} would be both a file and a directory (because of {below!r})"
        )
